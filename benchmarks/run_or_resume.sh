# Sourced by the benchmark scripts: `run_or_resume OUTPUT EDITOR ARGS...` runs `python -m bench run --editor EDITOR
# ARGS... --output OUTPUT` unless OUTPUT already holds a run of EDITOR: a complete one is kept, and an unfinished
# one (killed, timed out, interrupted) is continued with `bench run --resume`. Calling a script again with the
# same OUTPUT therefore finishes what a time limit cut off. $PYTHON runs it (default python).

run_folder() {  # the status and folder of EDITOR's run under OUTPUT, if there is one
  ${PYTHON:-python} - "$1" "$2" <<'PY'
import json, sys
from pathlib import Path
for manifest in sorted(Path(sys.argv[1]).glob("*/manifest.json")):
    try:
        state = json.loads(manifest.read_text())
    except ValueError:
        continue
    if state.get("editor") == sys.argv[2]:
        print(state.get("status", "running"), manifest.parent)
        break
PY
}

run_or_resume() {
  local output=$1 editor=$2 found status folder
  shift 2
  found=$(run_folder "$output" "$editor")
  status=${found%% *} folder=${found#* }
  if [ "$status" = complete ]; then
    echo "$editor: already complete in $folder"
  elif [ -n "$found" ]; then
    ${PYTHON:-python} -m bench run --resume "$folder"
  else
    ${PYTHON:-python} -m bench run --editor "$editor" "$@" --output "$output"
  fi
}
