"""FLOPs and parameter counts, measured on the meta device (no memory, no compute).

``torch.utils.flop_counter`` counts 2 FLOPs per multiply-add for convolutions and matmuls;
the paper's "FLOPs" are multiply-adds, so GMACs = counted FLOPs / 2 / 1e9. Element-wise work
(activations, BN, SE gating) is not counted, as in the paper and timm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from workers.model import build_model


@dataclass(frozen=True)
class Cost:
    params: int
    macs: int  # multiply-adds for one image at the spec's resolution

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def measure(spec: dict, resolution: int | None = None) -> Cost:
    """Parameters and multiply-adds of one forward pass of one image."""
    res = int(resolution or spec["resolution"])
    with torch.device("meta"):
        model = build_model(spec).eval()
        x = torch.empty(1, 3, res, res)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return Cost(params=model.num_params(), macs=counter.get_total_flops() // 2)
