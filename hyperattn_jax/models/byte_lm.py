"""A small byte-level decoder-only LM (RMSNorm, RoPE, GQA, SwiGLU) on `hyperattn_jax.nn.linen.HyperAttention`.

Needs flax (`pip install "hyperattn_jax[flax]"`). The attention kind is a module attribute, so one set of parameters
runs with exact attention ("exact"/"cudnn") or
HyperAttention ("hyper"): that is how `train_lm.py` trains both and cross-evaluates them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from hyperattn_jax.config import HyperAttentionConfig
from hyperattn_jax.nn import rope_qk
from hyperattn_jax.nn.linen import LSH_COLLECTION, RNG_STREAM, HyperAttention

VOCAB = 256  # bytes


@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Model shape and attention choice (frozen: hashable, so it can sit in a linen module attribute)."""

    num_layers: int = 4
    d_model: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    mlp_ratio: int = 4
    rope_theta: float = 10_000.0
    attention: str = "hyper"
    hyper: HyperAttentionConfig = dataclasses.field(default_factory=HyperAttentionConfig)
    implementation: str | None = None
    scan_layers: bool = True
    remat: bool = True
    dtype: Any = jnp.float32

    def replace(self, **changes) -> LMConfig:
        return dataclasses.replace(self, **changes)


class Block(nn.Module):
    """Pre-norm transformer block; `(x, None) -> (x, None)` so that `nn.scan` can stack it."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, x, _):
        cfg = self.cfg
        h = nn.RMSNorm(dtype=cfg.dtype, name="attn_norm")(x)
        h = HyperAttention(
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            config=cfg.hyper,
            causal=True,
            attention=cfg.attention,
            implementation=cfg.implementation,
            qk_transform=rope_qk(cfg.rope_theta),
            dtype=cfg.dtype,
            name="attn",
        )(h)
        x = x + h
        h = nn.RMSNorm(dtype=cfg.dtype, name="mlp_norm")(x)
        hidden = cfg.mlp_ratio * cfg.d_model
        gate = nn.Dense(hidden, use_bias=False, dtype=cfg.dtype, name="gate")(h)
        up = nn.Dense(hidden, use_bias=False, dtype=cfg.dtype, name="up")(h)
        h = nn.Dense(cfg.d_model, use_bias=False, dtype=cfg.dtype, name="down")(nn.silu(gate) * up)
        return x + h, None


class ByteLM(nn.Module):
    """tokens int `[B, T]` -> next-byte logits `[B, T, 256]` (float32)."""

    cfg: LMConfig

    @nn.compact
    def __call__(self, tokens):
        cfg = self.cfg
        embed = nn.Embed(VOCAB, cfg.d_model, name="embed")
        x = embed(tokens).astype(cfg.dtype)
        block = nn.remat(Block) if cfg.remat else Block
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, LSH_COLLECTION: 0},
                split_rngs={"params": True, RNG_STREAM: True},
                length=cfg.num_layers,
            )
            x, _ = stack(cfg, name="blocks")(x, None)
        else:
            for i in range(cfg.num_layers):
                x, _ = block(cfg, name=f"block_{i}")(x, None)
        x = nn.RMSNorm(dtype=cfg.dtype, name="final_norm")(x)
        return embed.attend(x.astype(jnp.float32))
