"""The paper's one-layer sequential-MNIST classifier: each pixel is one step of a 784-step EFLA or DeltaNet sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from efla import efla_final_state

METHODS = ("efla", "delta")


@dataclass
class ClassifierConfig:
    """Model size and operator settings; ``method`` is "efla" (exact step) or "delta" (DeltaNet's Euler step)."""

    method: str = "efla"
    d_model: int = 64
    seq_len: int = 28 * 28
    n_classes: int = 10
    beta_bias: float = -2.0  # sigmoid(-2) ~ 0.12: small initial steps, so the state starts by remembering
    backend: str = "auto"
    chunk_size: int = 64


class SequentialClassifier(nn.Module):
    """pixel -> Linear(1, d) + position embedding -> GELU -> one EFLA/DeltaNet layer -> LayerNorm -> linear, last step.

    EFLA normalises q only: the key norm is its implicit gate (alpha from beta and ||k||^2). DeltaNet normalises q and
    k, as it must to stay stable, and steps with alpha = beta.
    """

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        if config.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS} (got {config.method!r})")
        self.config = config
        d = config.d_model
        self.embed = nn.Linear(1, d)
        self.position = nn.Parameter(torch.randn(config.seq_len, d) * 0.02)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.beta_proj = nn.Linear(d, 1)
        nn.init.constant_(self.beta_proj.bias, config.beta_bias)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, config.n_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits [B, n_classes] for pixel intensities [B, seq_len] (1.0 = white; corrupted inputs may leave [0, 1])."""
        if pixels.dim() != 2 or pixels.shape[1] != self.config.seq_len:
            raise ValueError(f"pixels must be [B, {self.config.seq_len}] (got {list(pixels.shape)})")
        x = F.gelu(self.embed(pixels.unsqueeze(-1)) + self.position)  # [B, T, d]
        q = F.normalize(self.q_proj(x), dim=-1).unsqueeze(2)  # one head: [B, T, 1, d]
        k = self.k_proj(x).unsqueeze(2)
        if self.config.method == "delta":
            k = F.normalize(k, dim=-1)
        v = self.v_proj(x).unsqueeze(2)
        beta = torch.sigmoid(self.beta_proj(x))  # [B, T, 1]
        scale = self.config.d_model**-0.5
        state = efla_final_state(
            k, v, beta,
            mode=self.config.method,
            backend=self.config.backend,
            chunk_size=self.config.chunk_size,
            check_beta=False,  # beta comes out of a sigmoid
        )  # fmt: skip
        # The classifier reads only the last step, o_T = scale * S_T^T q_T: taken from the final state, the 783
        # outputs nobody reads are never formed (nor their backward)
        last = (q[:, -1, 0].unsqueeze(1) @ state[:, 0].to(q.dtype)).squeeze(1) * scale
        return self.head(self.norm(last))
