"""FLOPs, activations and parameter counts, measured on the meta device (no memory, no compute).
``workers.cost.count`` gets the same figures by arithmetic on the spec, fast enough for the
search's solver; the tests hold the two equal.

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
    activations: int = 0  # elements output by every conv and linear layer, one image

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9


def measure(spec: dict, resolution: int | None = None) -> Cost:
    """Parameters, multiply-adds and activations of one forward pass of one image."""
    res = int(resolution or spec["resolution"])
    try:
        return _measure(spec, res, "meta")
    except Exception:  # noqa: BLE001 - a user's network that cannot run on the meta device runs for real
        if spec.get("network", "efficientnet-b0") in ("efficientnet-b0", "resnet-50", "mobilenet-v2"):
            raise
        return _measure(spec, res, "cpu")


def _measure(spec: dict, res: int, device: str) -> Cost:
    with torch.device(device):
        model = build_model(spec).eval()
        x = torch.empty(1, 3, res, res)
    acts = []
    hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o.numel()))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return Cost(params=sum(p.numel() for p in model.parameters()), macs=counter.get_total_flops() // 2, activations=sum(acts))
