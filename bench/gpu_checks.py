"""What CI (a CPU) cannot check: the model on a CUDA GPU against HF PyTorch on the same GPU.

Run by ``bench/gpu.sh``; on a CPU it runs too (the cuDNN lines then say "not on a GPU").

1. Float32 parity: a random BERT (every weight random, biases and LayerNorm too) made in PyTorch,
   loaded with ``load_pretrained``; our hidden states against ``BertModel``'s on padded pairs, with
   JAX's default matmul precision (TF32 on the GPU, as PyTorch allows with
   ``allow_tf32``) and with ``jax.default_matmul_precision("highest")`` against PyTorch in
   full float32. The CPU tests hold the second to 1e-4.
2. cuDNN attention: whether the bfloat16 forward's compiled program calls cuDNN's fused
   attention (``MultiExitBert`` asks for it on a GPU), and how far its last hidden states are
   from XLA's attention on the same weights (bf16 rounding, relative to the largest value).
3. bfloat16 against float32, ours (the residual stream in bfloat16, the default, and in float32,
   ``float32_residual``) and PyTorch's autocast, on the same weights (those of
   ``bench_early_exit``: classifiers whose confidence varies across inputs): each exit's largest
   logit error relative to its largest float32 logit, and how often the argmax stays the same.
   Two bfloat16 models differ from each other by about the sum of their errors.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gaml_jax import model as model_lib  # noqa: E402
from gaml_jax.weights import load_pretrained  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def random_bert(shape: str, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    hf = transformers.BertConfig(vocab_size=1000, max_position_embeddings=256, **SHAPES[shape])
    model = transformers.BertModel(hf).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random: HF's init (zero biases) would hide a swap
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            scale = 0.02 if p.ndim == 2 else 0.1
            p.copy_(base + scale * torch.randn(p.shape, generator=generator))
    return model


def pair_batch(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[CLS] a [SEP] b [SEP] [PAD]...: random pair lengths, so that padding and segments both show."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((batch, seq), np.int32) for k in ("input_ids", "token_type_ids", "attention_mask")}
    for row in range(batch):
        total = int(rng.integers(seq // 3, seq + 1))
        a = int(rng.integers(1, max(total - 3, 1) + 1))
        b = max(total - a - 3, 0)
        ids = [2, *rng.integers(5, 1000, a), 3, *rng.integers(5, 1000, b), 3]
        out["input_ids"][row, : len(ids)] = ids
        out["token_type_ids"][row, a + 2 : len(ids)] = 1
        out["attention_mask"][row, : len(ids)] = 1
    return out


def torch_hidden(model, batch, device) -> list[np.ndarray]:
    import torch

    model = model.to(device)
    with torch.no_grad():
        out = model(
            **{k: torch.from_numpy(v).long().to(device) for k, v in batch.items()}, output_hidden_states=True
        )
    return [h.float().cpu().numpy() for h in out.hidden_states]


def max_error(ours, theirs, mask) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - theirs)[mask.astype(bool)].max())


def parity(shape: str, batch_size: int, seq: int) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_model = random_bert(shape)
    batch = pair_batch(batch_size, seq)
    with tempfile.TemporaryDirectory() as folder:
        torch_model.save_pretrained(folder)
        model, params = load_pretrained(folder)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, **b, output_hidden_states=True).hidden_states)
    args = (params, {k: jnp.asarray(v) for k, v in batch.items()})
    for precision, tf32 in (("default", True), ("highest", False)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        theirs = torch_hidden(torch_model, batch, device)
        with jax.default_matmul_precision(None if precision == "default" else precision):
            ours = apply(*args)
        error = max(max_error(o, t, batch["attention_mask"]) for o, t in zip(ours, theirs, strict=True))
        print(
            f"  float32 {shape} {batch_size} x {seq}, JAX precision {precision} vs torch allow_tf32={tf32}: "
            f"max |hidden state error| {error:.2e}"
        )


def cudnn_attention(shape: str, batch_size: int, seq: int) -> None:
    on_gpu = jax.default_backend() == "gpu"
    config = model_lib.ModelConfig(
        vocab_size=1000, max_position_embeddings=256, **SHAPES[shape], dtype="bfloat16"
    )
    model = model_lib.MultiExitBert(config)
    batch = {k: jnp.asarray(v) for k, v in pair_batch(batch_size, seq, seed=1).items()}
    params = model.init(jax.random.key(0), batch["input_ids"])["params"]
    forward = jax.jit(
        lambda p, b: model.apply({"params": p}, **b, output_hidden_states=True).hidden_states[-1]
    )
    text = forward.lower(params, batch).compile().as_text()
    calls = sorted(
        {
            line.split('custom_call_target="')[1].split('"')[0]
            for line in text.splitlines()
            if 'custom_call_target="' in line and ("cudnn" in line or "fmha" in line)
        }
    )
    print(
        f"  bf16 {shape} {batch_size} x {seq} forward: cuDNN attention calls in the compiled program: "
        f"{calls or ('none' if on_gpu else 'none (not on a GPU)')}"
    )
    ours = np.asarray(forward(params, batch), np.float32)
    fused = model_lib.BertSelfAttention.__dict__["_fused"]  # the staticmethod itself, to restore
    try:  # the same weights through XLA's attention
        model_lib.BertSelfAttention._fused = staticmethod(
            lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="xla")
        )
        xla = jax.jit(  # a function of its own: jit would reuse the trace of `forward`'s
            lambda p, b: model.apply({"params": p}, **b, output_hidden_states=True).hidden_states[-1]
        )
        reference = np.asarray(xla(params, batch), np.float32)
    finally:
        model_lib.BertSelfAttention._fused = fused
    mask = np.asarray(batch["attention_mask"], bool)
    error, scale = np.abs(ours - reference)[mask].max(), float(np.abs(reference)[mask].max())
    print(
        f"  bf16 last hidden states, our path vs XLA attention: max error {error:.2e} "
        f"({error / scale:.1%} of the largest value, {scale:.2f})"
    )


def bf16_against_float32(shape: str, batch_size: int, seq: int) -> None:
    from bench.bench_early_exit import TorchEarlyExit, make_inputs, make_params

    config = model_lib.ModelConfig(**SHAPES[shape])  # BERT's vocabulary: make_inputs draws from it
    data = make_inputs(batch_size, seq, config.vocab_size, seed=2)
    params = make_params(model_lib.MultiExitBert(config), data, seed=2)
    inputs = [jnp.asarray(data[k]) for k in ("input_ids", "attention_mask", "token_type_ids")]

    def ours(dtype: str, float32_residual: bool = False) -> np.ndarray:
        model = model_lib.MultiExitBert(config.replace(dtype=dtype, float32_residual=float32_residual))
        forward = jax.jit(lambda p, *x: model.apply({"params": p}, *x).logits)
        return np.asarray(forward(params, *inputs), np.float32)

    reference = ours("float32")  # [exits, batch, labels]
    scale = np.abs(reference).max(axis=(1, 2))
    for name, logits in (
        ("PyTorch float32", TorchEarlyExit(config, params, "float32").full(data)),
        ("ours bfloat16", ours("bfloat16")),
        ("ours bf16, f32 stream", ours("bfloat16", float32_residual=True)),  # model.float32_residual
        ("PyTorch bfloat16", TorchEarlyExit(config, params, "bfloat16").full(data)),
    ):
        error = np.abs(logits - reference).max(axis=(1, 2)) / scale
        same = (logits.argmax(-1) == reference.argmax(-1)).mean(axis=1)
        print(
            f"  {name:<21} against our float32, per exit: max error / max logit "
            f"{error.min():.1e}-{error.max():.1e}, same argmax {same.min():.1%}-{same.max():.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="bert-base", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--examples", type=int, default=64, help="Inputs of the bfloat16 check.")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
    parity(args.shape, args.batch, args.seq)
    cudnn_attention(args.shape, args.batch, args.seq)
    bf16_against_float32(args.shape, args.examples, args.seq)


if __name__ == "__main__":
    main()
