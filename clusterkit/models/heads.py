"""MLP heads shared by the BYOL-style methods (ProPos, DigPro, HaDis)."""

from __future__ import annotations

from torch import nn


class MLPHead(nn.Sequential):
    """Linear(in, hidden) - BatchNorm1d - ReLU - Linear(hidden, out): (B, in) -> (B, out).

    The projector and the predictor of ProPos/DigPro (hidden 4096, out 256).
    ``init_std``: when given, Linear weights ~ N(0, init_std) and biases 0 (the
    predictor's initialisation in the official code, std 0.01).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, init_std: float | None = None):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        if init_std is not None:
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=init_std)
                    nn.init.zeros_(m.bias)
