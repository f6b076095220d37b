"""Causal transformer denoiser, nanoGPT-style (the paper's transformer alternative to the residual MLP).

One token per step, cat(x_k, a_k); step k attends to steps <= k only, also when used as a diffusion denoiser.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import Denoiser


@dataclass(frozen=True)
class TransformerDenoiserConfig:
    """Sizes of ``TransformerDenoiser``; defaults are the paper's."""

    n_embd: int = 312
    n_head: int = 4
    num_layers: int = 6
    dropout: float = 0.0
    bias: bool = True


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [B] -> [B, dim] fp32: [sin(t f_i), cos(t f_i)], f_i = 10000^(-i/(dim/2 - 1)), i < dim/2."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1)))
    phase = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([phase.sin(), phase.cos()], dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: TransformerDenoiserConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, H, C = h.shape
        q, k, v = (z.view(B, H, self.n_head, C // self.n_head).transpose(1, 2)
                   for z in self.c_attn(h).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, H, C)))


class MLP(nn.Module):
    def __init__(self, config: TransformerDenoiserConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(h))))


class Block(nn.Module):
    """Pre-LayerNorm GPT block."""

    def __init__(self, config: TransformerDenoiserConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h))
        return h + self.mlp(self.ln_2(h))


class TransformerDenoiser(Denoiser):
    """x [B,H,D], actions [B,H,A], t [B] -> [B,H,D]; learned positions, sinusoidal time MLP, no final LayerNorm.

    Init: every Linear and Embedding N(0, 0.02), biases 0, residual projections (``c_proj``)
    N(0, 0.02/sqrt(2*num_layers)).
    """

    def __init__(self, horizon: int, transition_dim: int, action_dim: int,
                 config: TransformerDenoiserConfig = TransformerDenoiserConfig()):
        super().__init__(horizon, transition_dim, action_dim)
        if config.n_embd % config.n_head or config.n_embd % 2 or config.n_embd < 4:
            raise ValueError(f"n_embd must be even, >= 4 and divisible by n_head; got {config}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        n = config.n_embd
        self.wte = nn.Linear(transition_dim + action_dim, n)
        self.wpe = nn.Embedding(horizon, n)
        self.time_mlp = nn.Sequential(nn.Linear(n, n), nn.SiLU(), nn.Linear(n, n))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.head = nn.Linear(n, transition_dim)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.num_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] -> [N, n_embd]: the time MLP on the sinusoidal embedding."""
        return self.time_mlp(sinusoidal_embedding(t, self.config.n_embd).to(self.wte.weight.dtype))

    def _forward(self, x: torch.Tensor, actions: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        tokens = self.wte(torch.cat([x, actions], dim=-1)) + self.wpe.weight[None]
        h = self.drop(tokens + time_emb[:, None, :])
        for block in self.blocks:
            h = block(h)
        return self.head(h)
