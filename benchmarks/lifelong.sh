#!/usr/bin/env bash
# Lifelong editing curves on CounterFact (issue 14): one `bench run --sequential` per editor, the edits
# accumulating in one model, a curve point every EVAL_EVERY edits on a fixed sample of EVAL_SAMPLE edited
# cases, with the weight norms and held-out perplexity that flag collapse. Batched editors edit sequential
# batches of BATCH cases (AlphaEdit's setting: 100); the others one case at a time. Each case's record keeps
# its immediate pre/post scores but not the free-generation family (--no-generation), which the curve does not use.
#
#   bash benchmarks/lifelong.sh                       # the full stream: 1,000 edits, batches of 100, on cuda
#   N=200 BATCH=10 EVAL_EVERY=40 EVAL_SAMPLE=50 DEVICE=cpu JOBS=2 bash benchmarks/lifelong.sh   # the CPU curve
#
# Calling the script again with the same OUTPUT continues every unfinished run from its last curve point
# (`python -m bench run --resume RUN_DIR`) and keeps the complete ones. JOBS runs that many editors at once (one
# torch thread each on the CPU; on one GPU they share the device). MODEL picks the model (default SmolLM2).
# Then: python -m bench leaderboard --runs "$OUTPUT" --include-partial --output LB.md --plots PLOTS
set -uo pipefail
N=${N:-1000} BATCH=${BATCH:-100} EVAL_EVERY=${EVAL_EVERY:-100} EVAL_SAMPLE=${EVAL_SAMPLE:-200}
DEVICE=${DEVICE:-cuda} JOBS=${JOBS:-1} OUTPUT=${OUTPUT:-runs/lifelong} LOGS=${LOGS:-$OUTPUT/logs}
MODEL=${MODEL:-smollm2-135m}
BATCHED=${BATCHED-"ultraedit memit alphaedit encore"}  # one apply() per batch (BATCHED= for none)
SINGLE=${SINGLE-"wise r-rome"}                        # one edit at a time (SINGLE= for none)
PYTHON=${PYTHON:-python}
[ "$DEVICE" = cpu ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUTPUT" "$LOGS"
source "$(dirname "$0")/run_or_resume.sh"

stream() {  # editor, batch size
  local every=$EVAL_EVERY
  [ "$2" -gt 1 ] && [ $((every % $2)) -ne 0 ] && every=$2
  echo "$(date -u +%H:%M:%S) $1: $N edits, batch $2, a curve point every $every"
  run_or_resume "$OUTPUT" "$1" --model "$MODEL" --dataset counterfact --n "$N" --sequential --batch-size "$2" \
    --eval-every "$every" --eval-sample "$EVAL_SAMPLE" --no-circuits --no-generation --device "$DEVICE" \
    >> "$LOGS/$1.log" 2>&1
  local rc=$?
  echo "$(date -u +%H:%M:%S) $1: exit $rc ($(tail -n 1 "$LOGS/$1.log"))"
}

jobs_list=$(for editor in $BATCHED; do echo "$editor:$BATCH"; done; for editor in $SINGLE; do echo "$editor:1"; done)
for job in $jobs_list; do  # editor:batch size
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  stream "${job%:*}" "${job##*:}" &
done
wait
