"""Residual-MLP denoiser, the paper's default network: a flattened trajectory window through residual blocks.

The whole window is one flat vector: steps are interleaved step-major, [x_0, a_0, x_1, a_1, ...].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..cpu_packed import PackedLinear
from .base import Denoiser


@dataclass(frozen=True)
class MLPDenoiserConfig:
    """Sizes of ``ResidualMLPDenoiser``; defaults are the paper's (Hopper/Walker/Cheetah, H=10)."""

    embed_dim: int = 128  # minimum width of the input projection: E = max(H*(D+A), embed_dim)
    hidden_dim: int = 1024
    num_layers: int = 6
    dropout: float = 0.0
    n_fourier: int = 8  # fixed random frequencies of the time embedding -> 2*n_fourier+1 features


class RandomFourierTimeEmbedding(nn.Module):
    """t [B] int -> [B, 1 + 2n] fp32 features [t, sin(2 pi t w), cos(2 pi t w)] with fixed w ~ N(0, 1)^n.

    ``w`` is a buffer (saved in the state dict, never trained). t is the raw integer step, not rescaled.
    """

    def __init__(self, n_fourier: int):
        super().__init__()
        self.register_buffer("weights", torch.randn(n_fourier))

    @property
    def out_dim(self) -> int:
        return 2 * self.weights.numel() + 1

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Always fp32: with t up to T-1 the phases reach thousands of radians, far beyond bf16 precision.
        t = t.to(torch.float32)[:, None]
        phase = t * self.weights.to(torch.float32)[None, :] * (2 * math.pi)
        return torch.cat([t, phase.sin(), phase.cos()], dim=-1)


class ResidualBlock(nn.Module):
    """Pre-norm residual block: h + dropout(Linear(relu(LayerNorm(h)))).

    ``norm`` then ``act`` (a parameter-free ReLU module) is the pair that ``cpu_layer_norm.fuse_layer_norm_acts``
    fuses in inference copies."""

    PACKED_RESIDUAL = "linear"  # the child that gets the skip connection when packed (cpu_packed.prepack_linears)

    def __init__(self, width: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.act = nn.ReLU()
        self.linear = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.act(self.norm(h))
        if isinstance(self.linear, PackedLinear) and isinstance(self.dropout, nn.Identity):
            return self.linear(z, residual=h)  # the skip connection added in the GEMM's epilogue
        return h + self.dropout(self.linear(z))


class ResidualMLP(nn.Module):
    """[B, in] -> [B, out]: Linear(in, width), depth residual blocks, LayerNorm, relu, Linear(width, out)."""

    def __init__(self, in_dim: int, width: int, depth: int, out_dim: int, dropout: float):
        super().__init__()
        self.input = nn.Linear(in_dim, width)
        self.blocks = nn.Sequential(*(ResidualBlock(width, dropout) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.act = nn.ReLU()  # with norm: a fusable pair (see ResidualBlock)
        self.output = nn.Linear(width, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.act(self.norm(self.blocks(self.input(h)))))


class ResidualMLPDenoiser(Denoiser):
    """x [B,H,D], actions [B,H,A], t [B] -> x0 (or eps) prediction [B,H,D]. Default PyTorch init."""

    def __init__(self, horizon: int, transition_dim: int, action_dim: int,
                 config: MLPDenoiserConfig = MLPDenoiserConfig()):
        super().__init__(horizon, transition_dim, action_dim)
        if config.hidden_dim < 1 or config.num_layers < 0 or config.n_fourier < 1:
            raise ValueError(f"invalid MLPDenoiserConfig {config}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {config.dropout}")
        self.config = config
        in_dim = horizon * (transition_dim + action_dim)
        embed = max(in_dim, config.embed_dim)
        self.input_proj = nn.Linear(in_dim, embed)
        self.time_features = RandomFourierTimeEmbedding(config.n_fourier)
        self.time_mlp = nn.Sequential(
            nn.Linear(self.time_features.out_dim, embed), nn.SiLU(), nn.Linear(embed, embed))
        self.trunk = ResidualMLP(embed, config.hidden_dim, config.num_layers, horizon * transition_dim,
                                 config.dropout)

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] -> [N, E]: the time MLP on the random Fourier features (computed in fp32, then cast)."""
        return self.time_mlp(self.time_features(t).to(self.input_proj.weight.dtype))

    def _forward(self, x: torch.Tensor, actions: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        flat = torch.cat([x, actions], dim=-1).reshape(B, -1)
        h = self.input_proj(flat) + time_emb
        return self.trunk(h).view(B, self.horizon, self.transition_dim)
