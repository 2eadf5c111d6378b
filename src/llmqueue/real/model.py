"""A Llama-style decoder-only transformer on the CPU that runs the schedulers' packed batches.

RMSNorm, rotary position embeddings (Hugging Face's rotate-half convention), grouped-query
attention and a SwiGLU MLP.  Weights are seeded random (no download) or read from a local
Hugging Face Llama folder.  :meth:`Transformer.forward` executes one packed batch: prefill
chunks of some requests and one decode token of others, concatenated into one token matrix for
every projection; attention runs per request against its KV run in the pool (causal within the
request, positions continuing across chunks; in a paged pool it gathers the request's slots
through its block table).  :meth:`Transformer.reference_logits` is a plain
unbatched forward pass without a cache, the baseline of the equivalence test.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llmqueue.checks import boolean, integer, number
from llmqueue.errors import ConfigError, InternalError

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the model (Hugging Face LlamaConfig names in comments)."""

    hidden_size: int = 512          # hidden_size
    num_layers: int = 6             # num_hidden_layers
    num_heads: int = 8              # num_attention_heads
    num_kv_heads: int = 8           # num_key_value_heads (< num_heads: grouped-query attention)
    intermediate_size: int = 1408   # intermediate_size (SwiGLU)
    vocab_size: int = 32000
    max_position: int = 4096        # longest context (prompt + output) a request may have
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "bfloat16"
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        return self.num_layers * layer + self.vocab_size * h * (1 if self.tie_embeddings else 2) + h

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPES[self.dtype].itemsize


PRESETS: dict[str, ModelConfig] = {
    # ~50 M parameters; the default of `engine run`.
    "default": ModelConfig(),
    # Grouped-query variant: 2 KV heads (4x less KV to read) and a wider MLP, so its batch time
    # depends more on the token count and less on the context length.
    "gqa": ModelConfig(num_kv_heads=2, intermediate_size=2048),
    # ~5 M parameters: the validation runs (docs/real_engine.md), fast enough for long horizons.
    "small": ModelConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688,
                         vocab_size=8192),
    # For tests: a few hundred thousand parameters, float32.
    "tiny": ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=172,
                        vocab_size=512, max_position=1024, dtype="float32"),
}
_INT_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size",
               "max_position", "seed")


def model_config(spec: Mapping | None, field: str = "real.model") -> ModelConfig:
    """A :class:`ModelConfig` from ``{"preset": "default", "num_layers": 4, ...}`` (checked)."""
    spec = dict(spec or {})
    preset = spec.pop("preset", "default")
    if preset not in PRESETS:
        raise ConfigError(f"{field}.preset", preset, f"one of {', '.join(PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    for key, value in spec.items():
        if key not in known:
            raise ConfigError(f"{field}.{key}", value, f"a model key: preset, {', '.join(sorted(known))}")
        if key in _INT_FIELDS:
            spec[key] = integer(value, f"{field}.{key}", 0 if key == "seed" else 1)
        elif key == "dtype":
            if value not in DTYPES:
                raise ConfigError(f"{field}.dtype", value, f"one of {', '.join(DTYPES)}")
        elif key == "tie_embeddings":
            boolean(value, f"{field}.{key}")
        else:
            spec[key] = number(value, f"{field}.{key}", above=0)
    config = replace(PRESETS[preset], **spec)
    if config.hidden_size % config.num_heads or config.head_dim % 2:
        raise ConfigError(f"{field}.num_heads", config.num_heads,
                          f"a divisor of hidden_size = {config.hidden_size} leaving an even head size")
    if config.num_heads % config.num_kv_heads:
        raise ConfigError(f"{field}.num_kv_heads", config.num_kv_heads,
                          f"a divisor of num_heads = {config.num_heads} (grouped-query attention)")
    return config


class Chunk(NamedTuple):
    """One request's part of a packed batch: ``context`` tokens of it are already computed,
    ``token_ids`` are the new tokens.  ``start``: where its KV lives in the pool, either the
    first slot of a contiguous run (an int) or, in a paged pool, the slot of each position
    0 .. context + len(token_ids) - 1 (a 1-D integer tensor, from the request's block table)."""

    start: int | torch.Tensor
    context: int
    token_ids: Sequence[int]


_HF_LAYER = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
             "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
             "w_down": "mlp.down_proj", "norm_attn": "input_layernorm", "norm_mlp": "post_attention_layernorm"}


class Transformer:
    """Weights plus the packed forward pass.  Build with :meth:`random` or :meth:`from_hf`."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, torch.Tensor]) -> None:
        self.config = config
        dtype = DTYPES[config.dtype]
        w = {k: v.to(dtype).contiguous() for k, v in weights.items()}
        self.embed = w["embed"]
        self.lm_head = w["embed"] if config.tie_embeddings else w["lm_head"]
        self.norm = w["norm"]
        self.layers = []
        for i in range(config.num_layers):
            p = {k: w[f"layers.{i}.{k}"] for k in _HF_LAYER}
            # perf: one fused QKV and one fused gate/up matmul per layer instead of three and two.
            self.layers.append((p["norm_attn"], torch.cat([p["wq"], p["wk"], p["wv"]]), p["wo"],
                                p["norm_mlp"], torch.cat([p["w_gate"], p["w_up"]]), p["w_down"]))
        self._weights = w
        d = config.head_dim
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles = torch.outer(torch.arange(config.max_position, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)

    # ---- construction ------------------------------------------------------------------

    @classmethod
    def random(cls, config: ModelConfig) -> Transformer:
        """Seeded random weights (normal, std 0.02; norms 1)."""
        g = torch.Generator().manual_seed(config.seed)
        h, d, inter = config.hidden_size, config.head_dim, config.intermediate_size

        def normal(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * 0.02

        w = {"embed": normal(config.vocab_size, h), "norm": torch.ones(h)}
        if not config.tie_embeddings:
            w["lm_head"] = normal(config.vocab_size, h)
        shapes = {"wq": (config.num_heads * d, h), "wk": (config.num_kv_heads * d, h),
                  "wv": (config.num_kv_heads * d, h), "wo": (h, config.num_heads * d),
                  "w_gate": (inter, h), "w_up": (inter, h), "w_down": (h, inter)}
        for i in range(config.num_layers):
            for k, shape in shapes.items():
                w[f"layers.{i}.{k}"] = normal(*shape)
            w[f"layers.{i}.norm_attn"] = torch.ones(h)
            w[f"layers.{i}.norm_mlp"] = torch.ones(h)
        return cls(config, w)

    @classmethod
    def from_hf(cls, folder: str | Path, dtype: str = "bfloat16", max_position: int | None = None) -> Transformer:
        """A Llama checkpoint from a local Hugging Face folder (config.json plus *.safetensors
        or pytorch_model*.bin); no network access."""
        folder = Path(folder)
        try:
            hf = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError("real.model.hf_path", str(folder), f"a folder with a readable config.json ({exc})") from None
        config = ModelConfig(
            hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            intermediate_size=hf["intermediate_size"], vocab_size=hf["vocab_size"],
            max_position=max_position or hf.get("max_position_embeddings", 4096),
            rope_theta=float(hf.get("rope_theta", 10000.0)), rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), dtype=dtype)
        state: dict[str, torch.Tensor] = {}
        files = sorted(folder.glob("*.safetensors"))
        if files:
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ConfigError("real.model.hf_path", str(folder),
                                  "a folder whose weights can be read: pip install safetensors") from None
            for f in files:
                state.update(load_file(str(f)))
        else:
            for f in sorted(folder.glob("pytorch_model*.bin")):
                state.update(torch.load(f, map_location="cpu", weights_only=True))
        if not state:
            raise ConfigError("real.model.hf_path", str(folder), "a folder with *.safetensors or pytorch_model*.bin")
        w = {"embed": state["model.embed_tokens.weight"], "norm": state["model.norm.weight"]}
        if "lm_head.weight" in state:
            w["lm_head"] = state["lm_head.weight"]
        elif not config.tie_embeddings:
            config = replace(config, tie_embeddings=True)
        for i in range(config.num_layers):
            for k, name in _HF_LAYER.items():
                w[f"layers.{i}.{k}"] = state[f"model.layers.{i}.{name}.weight"]
        return cls(config, w)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under Hugging Face Llama names (what :meth:`from_hf` reads)."""
        w = self._weights
        out = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"]}
        if not self.config.tie_embeddings:
            out["lm_head.weight"] = w["lm_head"]
        for i in range(self.config.num_layers):
            for k, name in _HF_LAYER.items():
                out[f"model.layers.{i}.{name}.weight"] = w[f"layers.{i}.{k}"]
        return out

    def hf_config(self) -> dict:
        c = self.config
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
                "num_key_value_heads": c.num_kv_heads, "intermediate_size": c.intermediate_size,
                "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position, "rope_theta": c.rope_theta,
                "rms_norm_eps": c.rms_eps, "tie_word_embeddings": c.tie_embeddings, "hidden_act": "silu"}

    def describe(self) -> dict:
        return {**asdict(self.config), "num_params": self.config.num_params}

    # ---- forward passes ----------------------------------------------------------------

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_eps)).to(x.dtype) * weight

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk], k_pool: torch.Tensor, v_pool: torch.Tensor,
                all_logits: bool = False) -> torch.Tensor:
        """Run one packed batch, writing its K/V into the pools ([layer, kv_head, slot, head_dim]).

        Returns float32 logits of each chunk's last token (rows in chunk order), or of every
        token with ``all_logits``.
        """
        c = self.config
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        gathers: list[torch.Tensor | None] = []   # paged chunks: the slots their attention reads
        for start, context, token_ids in chunks:
            n = len(token_ids)
            ids.extend(token_ids)
            positions.extend(range(context, context + n))
            if isinstance(start, torch.Tensor):
                index = start[: context + n]
                if len(index) != context + n:
                    raise InternalError(f"a paged chunk has {len(index)} slots for {context + n} positions")
                slots.extend(index[context:].tolist())
                gathers.append(index)
            else:
                slots.extend(range(start + context, start + context + n))
                gathers.append(None)
        num_tokens = len(ids)
        if max(positions) >= c.max_position:
            raise ConfigError("real.model.max_position", c.max_position,
                              f"more than the longest context in the batch ({max(positions) + 1} tokens)")
        pos = torch.tensor(positions)
        slot_index = torch.tensor(slots)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        x = self.embed[torch.tensor(ids)]
        h_q, h_kv, d = c.num_heads, c.num_kv_heads, c.head_dim
        gqa = h_q != h_kv
        masks = [None if len(t) == 1 else
                 torch.ones(len(t), ctx + len(t), dtype=torch.bool).tril(ctx) for _, ctx, t in chunks]
        attn = torch.empty(num_tokens, h_q, d, dtype=x.dtype)
        for layer, (norm_attn, w_qkv, w_o, norm_mlp, w_gate_up, w_down) in enumerate(self.layers):
            qkv = F.linear(self._rms(x, norm_attn), w_qkv)
            q = self._rope(qkv[:, : h_q * d].view(num_tokens, h_q, d), cos, sin)
            k = self._rope(qkv[:, h_q * d: (h_q + h_kv) * d].view(num_tokens, h_kv, d), cos, sin)
            v = qkv[:, (h_q + h_kv) * d:].view(num_tokens, h_kv, d)
            k_layer, v_layer = k_pool[layer], v_pool[layer]
            k_layer.index_copy_(1, slot_index, k.transpose(0, 1))
            v_layer.index_copy_(1, slot_index, v.transpose(0, 1))
            offset = 0
            for (start, context, token_ids), mask, index in zip(chunks, masks, gathers):
                n = len(token_ids)
                if index is None:   # a contiguous run: a view
                    end = start + context + n
                    keys, values = k_layer[:, start:end], v_layer[:, start:end]
                else:               # paged: gather the request's slots through its block table
                    keys, values = k_layer.index_select(1, index), v_layer.index_select(1, index)
                out = F.scaled_dot_product_attention(
                    q[offset: offset + n].transpose(0, 1).unsqueeze(0),
                    keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, enable_gqa=gqa)
                attn[offset: offset + n] = out[0].transpose(0, 1)
                offset += n
            x = x + F.linear(attn.view(num_tokens, h_q * d), w_o)
            gate, up = F.linear(self._rms(x, norm_mlp), w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        if not all_logits:
            # perf: only the tokens that emit an output need the vocabulary projection.
            last = torch.tensor(list(_cumsum(len(t) for _, _, t in chunks))) - 1
            x = x[last]
        return F.linear(self._rms(x, self.norm), self.lm_head).float()

    @torch.inference_mode()
    def reference_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits of every position of one sequence: a plain causal forward pass, no cache,
        attention written out (repeat K/V heads, masked softmax)."""
        c = self.config
        n, h_q, h_kv, d = len(token_ids), c.num_heads, c.num_kv_heads, c.head_dim
        pos = torch.arange(n)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
        x = self.embed[torch.tensor(list(token_ids))]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        for norm_attn, w_qkv, w_o, norm_mlp, w_gate_up, w_down in self.layers:
            qkv = F.linear(self._rms(x, norm_attn), w_qkv)
            q = self._rope(qkv[:, : h_q * d].view(n, h_q, d), cos, sin).transpose(0, 1)
            k = self._rope(qkv[:, h_q * d: (h_q + h_kv) * d].view(n, h_kv, d), cos, sin).transpose(0, 1)
            v = qkv[:, (h_q + h_kv) * d:].view(n, h_kv, d).transpose(0, 1)
            k = k.repeat_interleave(h_q // h_kv, dim=0)
            v = v.repeat_interleave(h_q // h_kv, dim=0)
            scores = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(d)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = (probs @ v.float()).to(x.dtype).transpose(0, 1).reshape(n, h_q * d)
            x = x + F.linear(out, w_o)
            gate, up = F.linear(self._rms(x, norm_mlp), w_gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, w_down)
        return F.linear(self._rms(x, self.norm), self.lm_head).float()


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total
