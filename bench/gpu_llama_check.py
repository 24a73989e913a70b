"""GPU check at LLM scale: a transformers Llama of about 1B parameters, built from a config.

Random weights (the TinyLlama-1.1B shape: hidden 2048, 22 layers, 32 heads, 4 key-value
heads, intermediate 5632, vocabulary 32,000), parameters and activations in bfloat16,
vectors and accumulation in float32 (``HessianOperator``'s mixed precision). No download,
no Ray. Measures, for one batch of ``--batch × --seq`` tokens:

1. gradient time, Hessian-vector product time (graph kept), products per second, tokens;
2. the same product with the chunked cross-entropy head (``probe.lm_head``) against plain
   double backward through the logits: time and peak memory;
3. peak CUDA memory of each (``torch.cuda.max_memory_allocated``).

The pipeline schedules with 2 stages on one device (sequential against overlapped) are
timed by ``bench/gpu_pipeline_check.py``, which ``bench/gpu_check.sh`` runs before this.

    python bench/gpu_llama_check.py --json out.json
    python bench/gpu_llama_check.py --tiny --device cpu     # the same code on a tiny config, any machine
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from probe.gpt import lm_loss  # noqa: E402
from probe.hessian import HessianOperator  # noqa: E402
from probe.model_operator import double_backward_attention  # noqa: E402

GiB = 1 << 30
SHAPES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
    ),
}


def build(shape: str, dtype: torch.dtype, device: torch.device):
    """The model on ``device`` in ``dtype``, initialized as transformers would (std 0.02), eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], tie_word_embeddings=False, attn_implementation="eager")
    with torch.device(device):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(dtype)
    model.eval()
    return model


def batch(vocab: int, b: int, t: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, t + 1), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None


def timed(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - t) / repeats


def product_row(model, data, device, repeats: int, head: str) -> dict:
    """Gradient and product timings, peak memory, for the plain head or the chunked one."""
    ctx = contextlib.nullcontext()
    loss = lm_loss
    if head == "chunked":
        from probe import lm_head  # the chunked cross-entropy head

        ctx, loss = lm_head.chunked_head(model), lm_head.chunked_lm_loss
    _peak_reset(device)
    with ctx, double_backward_attention():
        op = HessianOperator(model, loss, [data], accumulate_dtype=torch.float32)
        v = torch.randn(op.dim, 1, device=device, generator=torch.Generator(device).manual_seed(2))
        grad_s = timed(op.loss_and_gradient, device, repeats)
        hvp_s = timed(functools.partial(op.matmat, v), device, repeats)
    tokens = data[0].numel()
    row = {
        "head": head,
        "params": op.dim,
        "tokens": tokens,
        "grad_s": grad_s,
        "hvp_s": hvp_s,
        "hvp_per_s": 1 / hvp_s,
        "hvp_over_grad": hvp_s / grad_s,
        "peak_gib": _peak(device),
        "graph_gib": op.graph_bytes / GiB,
    }
    peak = "n/a" if row["peak_gib"] is None else f"{row['peak_gib']:.1f} GiB"
    print(
        f"[llama {head} head] {op.dim:,} params, {tokens} tokens: gradient {grad_s:.3f} s, HVP {hvp_s:.3f} s "
        f"({1 / hvp_s:.2f}/s, {hvp_s / grad_s:.2f}× gradient), peak {peak}",
        flush=True,
    )
    del op
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the summary here")
    parser.add_argument("--tiny", action="store_true", help="a tiny config (a check of the script itself)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: give --device cpu --tiny to check the script", file=sys.stderr)
        return 2
    shape = "tiny" if args.tiny else "1b"
    model = build(shape, getattr(torch, args.dtype), device)
    data = batch(SHAPES[shape]["vocab_size"], args.batch, args.seq, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    info = {"device": name, "torch": torch.__version__}
    rows = [product_row(model, data, device, args.repeats, head) for head in ("plain", "chunked")]
    plain, chunked = rows
    ratios = {"time": chunked["hvp_s"] / plain["hvp_s"]}
    if plain["peak_gib"]:
        ratios["peak_memory"] = chunked["peak_gib"] / plain["peak_gib"]
    print(f"[ratios] chunked/plain: {ratios}", flush=True)
    summary = {"info": info, "shape": shape, "dtype": args.dtype, "rows": rows, "chunked_over_plain": ratios}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
