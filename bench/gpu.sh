#!/usr/bin/env bash
# The GPU figures of the README's Performance section, in one run on a machine with a CUDA GPU:
#
#   bash bench/gpu.sh                 # on the GPU: BERT-base, bfloat16, every part
#   bash bench/gpu.sh train           # some parts only: train, checks, profile, exit (a lent
#   bash bench/gpu.sh profile checks exit   # machine's call is limited to 10 minutes)
#   bash bench/gpu.sh --cpu           # the same python parts on the CPU at small sizes (a check of the script)
#
# train:   training throughput at BERT-base, batch 128 x seq 128, bfloat16 compute with float32
#          parameters: our CE and GAML steps and HF PyTorch's PABEE-style CE step (autocast bf16,
#          fused AdamW), with model FLOPs utilisation against the chip's dense bf16 peak
#          (H100/H200: 989 TFLOP/s), and what-if forms of our CE step raced beside it
#          (bench_vs_torch.py --variants: the last layer for every row rather than [CLS] only,
#          dropout bits from RngBitGenerator, the optimizer per tensor, the residual stream in
#          float32, matrix products without Triton's kernels). Then batch 32 x seq 128, with GAML's
#          two pull-backs batched (--variants vmap) beside the GAML step.
# checks:  bench/gpu_checks.py: float32 parity with HF PyTorch on the GPU, whether the bfloat16
#          forward really calls cuDNN's fused attention (and how close it stays to XLA's), and how
#          far ours and PyTorch's autocast each stray from float32 in bfloat16.
# profile: bench/profile_step.py: the CE step's GPU kernel time by pass and kind, and its top kernels.
# exit:    early exit's clock speed-up over its layer speed-up at batch 1 and 32 (a threshold for
#          2x fewer layers): ours (the runner, and one device program at every batch size), ours
#          again with while loops and conditionals recorded into CUDA graphs
#          (--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL), and PyTorch's layer-by-layer
#          early exit on the same weights, each in a process of its own.
# About 12 minutes on an H200 (each BERT-base step compiles for 30-45 s there).
# Each part has its own time limit, and a part that fails or runs out of time is reported and
# the next one runs: a lent GPU is held for minutes, not for a rerun.
# The python is $PYTHON, else .venv/bin/python, else python3 (the GPU image's, with JAX and torch).
# With $OUT set, the full log is also written to $OUT/gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=gpu
parts=()
for arg in "$@"; do
  case "$arg" in
    --cpu|--quick) mode=cpu ;;
    train|checks|profile|exit) parts+=("$arg") ;;
    *) echo "usage: bash bench/gpu.sh [--cpu] [train] [checks] [profile] [exit]" >&2; exit 2 ;;
  esac
done
((${#parts[@]})) || parts=(train checks profile exit)
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
log=/dev/null
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && log="$OUT/gpu.log"; fi

failed=0
run() {  # run SECONDS CMD...: prints the command, runs it for at most SECONDS, to the screen and the log
  local limit=$1
  shift
  echo "+ $*" | tee -a "$log"
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  if ((rc != 0)); then
    failed=$((failed + 1))
    if ((rc == 124)); then what="ran past its ${limit} s"; else what="exited with $rc"; fi
    echo "!! this part $what; going on with the next" | tee -a "$log"
  fi
}

if [[ $mode == gpu ]]; then
  # JAX takes 75% of the GPU's memory at start by default; leave PyTorch, in the same process, room.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
  run 60 "$PYTHON" -c "import jax, flax, optax, torch, transformers; d = jax.devices()[0]; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, d.device_kind, '| torch', torch.__version__, torch.cuda.is_available(), '| transformers', transformers.__version__); assert d.platform == 'gpu', 'JAX sees no GPU: ' + str(d)"
  bert=(--shape bert-base --seq 128 --dtype bfloat16)
  ee=(-m bench.bench_early_exit --shapes=bert-base --seq-len 128 --examples 64 --repeats 3 --dtype bfloat16)
  if want train; then
    run 360 "$PYTHON" bench/bench_vs_torch.py "${bert[@]}" --batch 128 --repeats 10 --no-forward \
      --variants all-rows-last,rbg,tree,f32-stream,xla:xla_gpu_enable_triton_gemm=false
    run 170 "$PYTHON" bench/bench_vs_torch.py "${bert[@]}" --batch 32 --repeats 20 --no-forward --variants vmap
  fi
  want checks && run 80 "$PYTHON" bench/gpu_checks.py --shape bert-base --batch 8 --seq 128
  want profile && run 90 "$PYTHON" bench/profile_step.py --shape bert-base --dtype bfloat16 --batch 128 --seq 128 --top 15
  if want exit; then
    run 100 "$PYTHON" "${ee[@]}" --one-program
    XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
      run 80 "$PYTHON" "${ee[@]}" --one-program
    run 100 "$PYTHON" "${ee[@]}" --torch-only
  fi
else
  export JAX_PLATFORMS=cpu
  ee=(-m bench.bench_early_exit --quick --examples 8 --seq-len 16 --batch-sizes 1,4 --repeats 1)
  if want train; then
    run 600 "$PYTHON" bench/bench_vs_torch.py --quick --batch 4 --seq 16 --repeats 1 --dtype bfloat16 --no-forward --variants all-rows-last,rbg,tree,vmap,f32-stream
  fi
  want checks && run 600 "$PYTHON" bench/gpu_checks.py --shape tiny --batch 4 --seq 32
  want profile && run 600 "$PYTHON" bench/profile_step.py --batch 4 --seq 16 --steps 1 --top 5
  if want exit; then
    run 600 "$PYTHON" "${ee[@]}" --one-program
    run 600 "$PYTHON" "${ee[@]}" --torch-only
  fi
fi
echo "parts failed: $failed" | tee -a "$log"
exit $((failed > 0))
