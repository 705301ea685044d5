#!/usr/bin/env bash
# The GPU figures of the README's Performance section, in ONE call of a lent machine:
#
#   bash bench/gpu.sh                  # on the GPU: every part, in order, within $GPU_BUDGET seconds
#   bash bench/gpu.sh exit profile     # some parts only (names below), in the order below
#   bash bench/gpu.sh --cpu            # the same python at toy sizes on the CPU (a check of the script)
#
# A loan is 15 minutes of device time in all, the machine's start (a minute or more) included, and
# one command runs for at most 10 minutes: the parts run in the order of what issue #13 asks
# first, each within its own limit and within what is left of $GPU_BUDGET (default 540 s: call
# the device tool with timeout_s 590). A part that no longer fits is reported as skipped, one that
# fails or runs out of time is reported and the next one runs; where JAX sees no GPU it stops at once.
# The issue's figures (train, exit, exit-torch) come first:
#
# train:      training throughput at BERT-base, batch 128 x seq 128, bfloat16 compute with float32
#             parameters: our CE and GAML steps and HF PyTorch's PABEE-style CE step (autocast bf16,
#             fused AdamW), model FLOPs utilisation against the chip's dense bf16 peak (H100/H200:
#             989 TFLOP/s), ours / PyTorch and GAML / CE.
# exit:       early exit's clock speed-up over its layer speed-up at batch 1 and 32 (a threshold for
#             2x fewer layers): our runner, and early exit as one device program at every batch size.
# exit-torch: PyTorch's layer-by-layer early exit on the same weights.
# Then what tells where to look next:
# variants:   what-if forms of our step raced beside it at batch 128 (bench_vs_torch.py --variants:
#             the last layer for every row rather than [CLS] only, dropout bits from RngBitGenerator,
#             the optimizer per tensor, the residual stream in float32, matrix products without
#             Triton's kernels, GAML's two pull-backs batched).
# profile:    bench/profile_step.py: the CE step's GPU kernel time by pass and kind, its top kernels.
# checks:     bench/gpu_checks.py: float32 parity with HF PyTorch on the GPU, whether the bfloat16
#             forward really calls cuDNN's fused attention (and how close it stays to XLA's), and
#             how far ours and PyTorch's autocast each stray from float32 in bfloat16.
# graphs:     `exit` again with while loops and conditionals recorded into CUDA graphs
#             (--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL).
#
# The parts share a persistent compilation cache ($JAX_COMPILATION_CACHE_DIR, default a fresh
# folder under /tmp): a program one part compiled, the next loads. Our steps compile several at
# once (bench_vs_torch.compile_contenders): on the H200 each BERT-base step compiled for 30-45 s.
# The python is $PYTHON, else .venv/bin/python, else python3 (the GPU image's, with JAX and torch).
# With $OUT set, the full log is also written to $OUT/gpu.log.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_PARTS=(train exit exit-torch variants profile checks graphs)
mode=gpu
parts=()
for arg in "$@"; do
  case "$arg" in
    --cpu|--quick) mode=cpu ;;
    train|exit|exit-torch|variants|profile|checks|graphs) parts+=("$arg") ;;
    *) echo "usage: bash bench/gpu.sh [--cpu] [${ALL_PARTS[*]}]" >&2; exit 2 ;;
  esac
done
((${#parts[@]})) || parts=("${ALL_PARTS[@]}")
want() { [[ " ${parts[*]} " == *" $1 "* ]]; }
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
cache_made=
if [[ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/gaml-gpu-xla.XXXXXX") && cache_made=1
  export JAX_COMPILATION_CACHE_DIR
fi
trap '[[ -z $cache_made ]] || rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
log=/dev/null
if [[ -n "${OUT:-}" ]]; then mkdir -p "$OUT" && log="$OUT/gpu.log"; fi

start=$SECONDS
budget=${GPU_BUDGET:-540}
[[ $mode == cpu ]] && budget=${GPU_BUDGET:-3600}
failed=0
skipped=()
run() {  # run NAME SECONDS CMD...: runs CMD for at most SECONDS and what is left of the budget
  local name=$1 limit=$2
  shift 2
  local left=$((budget - (SECONDS - start)))
  if ((left < 30)); then
    skipped+=("$name")
    echo "-- $name skipped: ${left} s of the ${budget} s budget left" | tee -a "$log"
    return
  fi
  ((limit > left)) && limit=$left
  echo "+ [$name, at $((SECONDS - start)) s, limit ${limit} s] $*" | tee -a "$log"
  local part_start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log"  # KILL 10 s after TERM: a process stuck in a GPU call
  local rc=${PIPESTATUS[0]}
  echo "-- $name took $((SECONDS - part_start)) s" | tee -a "$log"
  if ((rc != 0)); then
    failed=$((failed + 1))
    if ((rc == 124)); then what="ran past its ${limit} s"; else what="exited with $rc"; fi
    echo "!! $name $what" | tee -a "$log"
  fi
  return "$rc"
}

if [[ $mode == gpu ]]; then
  # JAX takes 75% of the GPU's memory at start by default; leave PyTorch, in the same process, room.
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
  run versions 60 "$PYTHON" -c "import jax, flax, optax, torch, transformers; d = jax.devices()[0]; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, d.device_kind, '| torch', torch.__version__, torch.cuda.is_available(), '| transformers', transformers.__version__); assert d.platform == 'gpu', 'JAX sees no GPU: ' + str(d)" || {
    echo "!! stopping: without JAX on the GPU the other parts would time the CPU" | tee -a "$log"
    exit 1
  }
  vs=(bench/bench_vs_torch.py --shape bert-base --seq 128 --dtype bfloat16 --batch 128 --no-forward --repeats 10)
  variants=all-rows-last,rbg,tree,f32-stream,xla:xla_gpu_enable_triton_gemm=false,vmap
  ee=(-m bench.bench_early_exit --shapes=bert-base --seq-len 128 --examples 64 --repeats 3 --dtype bfloat16)
  profile=(bench/profile_step.py --shape bert-base --dtype bfloat16 --batch 128 --seq 128 --top 15)
  checks=(bench/gpu_checks.py --shape bert-base --batch 8 --seq 128)
  limits=(200 240 120 240 90 80 100)  # seconds, in the order of ALL_PARTS (exit compiles dozens of small programs)
else
  export JAX_PLATFORMS=cpu
  vs=(bench/bench_vs_torch.py --quick --batch 4 --seq 16 --repeats 2 --dtype bfloat16 --no-forward)
  variants=all-rows-last,rbg,tree,f32-stream,vmap
  ee=(-m bench.bench_early_exit --quick --examples 8 --seq-len 16 --batch-sizes 1,4 --repeats 1)
  profile=(bench/profile_step.py --batch 4 --seq 16 --steps 1 --top 5)
  checks=(bench/gpu_checks.py --shape tiny --batch 4 --seq 32)
  limits=(600 600 600 600 600 600 600)
  want graphs && skipped+=(graphs)  # CUDA graphs: nothing to run on the CPU
  parts=("${parts[@]/graphs/}")
fi
limit() {  # the limit of part $1
  local i
  for i in "${!ALL_PARTS[@]}"; do [[ ${ALL_PARTS[$i]} == "$1" ]] && echo "${limits[$i]}"; done
}
for part in "${ALL_PARTS[@]}"; do
  want "$part" || continue
  case $part in
    train) run train "$(limit train)" "$PYTHON" "${vs[@]}" ;;
    exit) run exit "$(limit exit)" "$PYTHON" "${ee[@]}" --one-program ;;
    exit-torch) run exit-torch "$(limit exit-torch)" "$PYTHON" "${ee[@]}" --torch-only ;;
    variants) run variants "$(limit variants)" "$PYTHON" "${vs[@]}" --variants "$variants" ;;
    profile) run profile "$(limit profile)" "$PYTHON" "${profile[@]}" ;;
    checks) run checks "$(limit checks)" "$PYTHON" "${checks[@]}" ;;
    graphs)
      XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
        run graphs "$(limit graphs)" "$PYTHON" "${ee[@]}" --one-program ;;
  esac
done
echo "parts failed: $failed; skipped: ${skipped[*]:-none}; $((SECONDS - start)) s in all" | tee -a "$log"
exit $((failed > 0))
