"""Batch times from Vidur's GPU operator profiles (derived data; docs/real_engine.md).

Source: ``shared/data/vidur_profiles`` (microsoft/vidur, commit 7d47513, MIT; see its
README).  A batch of P prefill tokens (one chunk of a fresh prompt) and D decode tokens at
context K takes, on one GPU (tensor parallel 1)::

    t = emb(P+D) + layers · [Σ non-attention ops(P+D) + attn_prefill(P, kv 0) + attn_decode(D, K)]

with the non-attention ops (``mlp.csv`` medians, interpolated in the token count) measured on
the device, and attention from the two formulas the data's README fits to 64 real A100
Llama-2-7B FlashAttention samples (the full attention files were not available):

* decode  0.00651 + 0.001094·b + 7.816e-6·b·kv + 3.618e-5·kv·min(1, b/9.67) ms;
* prefill 0.01681 + 1.0376e-5·kv + 1.1005e-7·c·(kv + 1.9935·c) ms.

Derived assumptions, stated in the docs: Llama-3-8B reads 8 KV heads instead of 32, so its
decode KV term ``b·kv`` is scaled by 8/32; on the H100 the A100 attention formula is used
(no H100 attention profile here), which overstates attention time.  Not included: CPU
overheads (scheduling, input preparation, sampling) and the LM head, which these files do
not profile.  numpy only.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmqueue.errors import LlmqueueError
from llmqueue.real.fit import Samples

#: name -> (folder under compute/<device>/, layers, query heads, KV heads)
MODELS = {
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", 32, 32, 32),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", 32, 32, 8),
}
DEVICES = ("a100", "h100")
MLP_OPS = ("input_layernorm", "attn_pre_proj", "attn_rope", "attn_post_proj", "post_attention_layernorm",
           "mlp_up_proj", "mlp_act", "mlp_down_proj", "add")
ATTENTION_SOURCE = "A100 Llama-2-7B FlashAttention formulas fitted to attention_real_samples.csv (README)"


def attn_decode_ms(batch: np.ndarray, kv: np.ndarray, kv_ratio: float = 1.0) -> np.ndarray:
    """Decode attention of ``batch`` requests at context ``kv`` (ms per layer); 0 for no requests."""
    b, k = np.asarray(batch, dtype=float), np.asarray(kv, dtype=float)
    t = 0.00651 + 0.001094 * b + kv_ratio * 7.816e-6 * b * k + 3.618e-5 * k * np.minimum(1.0, b / 9.67)
    return np.where(b > 0, t, 0.0)


def attn_prefill_ms(chunk: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """Prefill attention of one chunk of ``chunk`` tokens after ``kv`` cached ones (ms per layer)."""
    c, k = np.asarray(chunk, dtype=float), np.asarray(kv, dtype=float)
    t = 0.01681 + 1.0376e-5 * k + 1.1005e-7 * c * (k + 1.9935 * c)
    return np.where(c > 0, t, 0.0)


@dataclass(frozen=True)
class Profile:
    """One model on one device: the summed non-attention ops per layer against the token count."""

    model: str
    device: str
    num_layers: int
    kv_ratio: float
    tokens: np.ndarray          # the profiled token counts (sorted, unique)
    layer_ms: np.ndarray        # Σ non-attention ops of one layer (medians)
    emb_ms: np.ndarray          # the embedding lookup (once per batch)
    source: str

    def batch_seconds(self, prefill: np.ndarray, decode: np.ndarray, context: np.ndarray) -> np.ndarray:
        p, d, k = (np.asarray(x, dtype=float) for x in (prefill, decode, context))
        tokens = p + d
        if tokens.max(initial=0) > self.tokens[-1]:
            raise LlmqueueError(f"{self.model} on {self.device}: profiles go up to {int(self.tokens[-1])} tokens, "
                                f"asked for {int(tokens.max())}")
        layer = (np.interp(tokens, self.tokens, self.layer_ms) + attn_prefill_ms(p, 0.0)
                 + attn_decode_ms(d, k, self.kv_ratio))
        return (np.interp(tokens, self.tokens, self.emb_ms) + self.num_layers * layer) / 1e3


def load_profile(root: str | Path, model: str, device: str, tensor_parallel: int = 1) -> Profile:
    """Read ``compute/<device>/<org>/<model>/mlp.csv`` under ``root`` (medians, TP rows only)."""
    if model not in MODELS:
        raise LlmqueueError(f"--vidur-model: {model!r} is not profiled here; allowed: {', '.join(MODELS)}")
    if device not in DEVICES:
        raise LlmqueueError(f"--device: {device!r} is not allowed; allowed: {', '.join(DEVICES)}")
    folder, layers, heads, kv_heads = MODELS[model]
    if not Path(root).is_dir():
        raise LlmqueueError(f"--vidur-root: {root} not found: Vidur's GPU profiles are data outside the package "
                            f"(microsoft/vidur's data/profiling); pass --vidur-root PATH, or use the fits shipped "
                            f"in docs/batch_time/vidur_*.toml")
    path = Path(root) / "compute" / device / folder / "mlp.csv"
    if not path.exists():
        raise LlmqueueError(f"{path}: no Vidur profile of {model} on {device} (see the profiles' README)")
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["num_tensor_parallel_workers"]) == tensor_parallel]
    if not rows:
        raise LlmqueueError(f"{path}: no rows with num_tensor_parallel_workers = {tensor_parallel}")
    tokens = np.array([int(r["num_tokens"]) for r in rows])
    layer = np.array([sum(float(r[f"time_stats.{op}.median"]) for op in MLP_OPS) for r in rows])
    emb = np.array([float(r["time_stats.emb.median"]) for r in rows])
    grid = np.unique(tokens)
    # Duplicate token counts (a few rows were profiled twice): average them.
    layer_ms = np.array([layer[tokens == t].mean() for t in grid])
    emb_ms = np.array([emb[tokens == t].mean() for t in grid])
    source = (f"vidur_profiles/compute/{device}/{folder}/mlp.csv (TP {tensor_parallel}, medians); "
              f"attention: {ATTENTION_SOURCE}" + ("" if kv_heads == heads else f", KV term x {kv_heads}/{heads}"))
    return Profile(model, device, layers, kv_heads / heads, grid, layer_ms, emb_ms, source)


def profile_samples(profile: Profile, prefill: list[int], decode: list[int], context: list[int],
                    max_tokens: int) -> Samples:
    """Batch times on the calibration grid (P + D <= max_tokens), as :class:`Samples`."""
    rows = []
    for p in prefill:
        for d in decode:
            if not 1 <= p + d <= max_tokens:
                continue
            for k in context if d else [0]:
                rows.append((p, d, k, p * (p + 1) // 2 + d * (k + 1)))
    arr = np.array(rows, dtype=float)
    secs = profile.batch_seconds(arr[:, 0], arr[:, 1], arr[:, 2])
    return Samples(arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3], secs)
