"""Rotary position embedding: the inverse frequencies (default and llama3 scaling), the
cos/sin tables, and their application to one forward's q and k."""

from __future__ import annotations

import math

import torch

from kvmesh.kernels.reference import rotate_half
from kvmesh.workers.models.config import ModelConfig
from kvmesh.workers.models.ops import FusedOps


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, llama3-scaled when configured."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    p = dict(cfg.rope_scaling)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) fp32 [max_positions, head_dim]: the same fp32 products as transformers'
    rotary embedding."""
    inv_freq = rope_inv_freq(cfg)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    emb = torch.cat((positions[:, None] * inv_freq[None],) * 2, dim=-1)
    return emb.cos(), emb.sin()


class Rope:
    """RoPE of one forward's positions: torch ops over gathered cos/sin rows, or one fused
    in-place kernel."""

    def __init__(self, positions: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor, dtype: torch.dtype, fused: FusedOps | None) -> None:
        self.fused = fused
        self.positions, self.cos_cache, self.sin_cache = positions, cos_cache, sin_cache
        if fused is None:
            # cos, sin: [num_tokens, 1, head_dim], broadcast over heads
            self.cos = cos_cache[positions].to(dtype)[:, None, :]
            self.sin = sin_cache[positions].to(dtype)[:, None, :]

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None:
            self.fused.rotary(q, k, self.positions, self.cos_cache, self.sin_cache)
            return q, k
        cos, sin = self.cos, self.sin
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
