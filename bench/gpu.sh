#!/usr/bin/env bash
# The GPU figures of README's Performance section, in one run on a machine with a CUDA GPU:
#
#   bash bench/gpu.sh          # on the GPU: BERT-base, bfloat16
#   bash bench/gpu.sh --cpu    # the same python parts on the CPU at small sizes (a check of the script)
#
# 1. Training throughput at BERT-base, batch 32 x seq 128, bfloat16 compute with float32 parameters:
#    our CE and GAML steps and HF PyTorch's PABEE-style CE step (autocast bf16, fused AdamW), with
#    model FLOPs utilisation against the chip's dense bf16 peak (H100/H200: 989 TFLOP/s).
# 2. Early exit's clock speed-up over its layer speed-up at batch 1 and 32 (a threshold for 2x
#    fewer layers), ours and PyTorch's layer-by-layer early exit on the same weights.
# The python is $PYTHON, else .venv/bin/python, else python3 (the GPU image's, with JAX and torch).
# With $OUT set, the full log is also written to $OUT/gpu.log.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu
case "${1:-}" in
  "") ;;
  --cpu|--quick) mode=cpu ;;
  *) echo "usage: bash bench/gpu.sh [--cpu]" >&2; exit 2 ;;
esac
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
log=/dev/null
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && log="$OUT/gpu.log"; fi

run() {  # prints the command, then runs it; its output goes to the screen and the log
  echo "+ $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
}

if [[ $mode == gpu ]]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
  run "$PYTHON" -c "import jax, torch; d = jax.devices()[0]; print('jax', jax.__version__, d.device_kind, '| torch', torch.__version__, torch.cuda.is_available()); assert d.platform == 'gpu', 'JAX sees no GPU: ' + str(d)"
  run "$PYTHON" bench/bench_vs_torch.py --shape bert-base --batch 32 --seq 128 --dtype bfloat16 --repeats 20
  run "$PYTHON" -m bench.bench_early_exit --shapes=bert-base --seq-len 128 --examples 256 --dtype bfloat16 --torch
else
  export JAX_PLATFORMS=cpu
  run "$PYTHON" bench/bench_vs_torch.py --quick --batch 4 --seq 16 --repeats 1 --dtype bfloat16 --no-forward
  run "$PYTHON" -m bench.bench_early_exit --quick --examples 8 --seq-len 16 --batch-sizes 1,4 --repeats 1 --torch
fi
