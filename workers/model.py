"""The EfficientNet family as ``nn.Module``s built from a resolved network spec.

A spec is a plain dict of integers (see ``orchestrator.scaling.network_spec``)::

    {"stem": 32, "head": 1280, "resolution": 224, "num_classes": 1000,
     "dropout": 0.2, "drop_path": 0.2,
     "stages": [{"repeats": 1, "kernel": 3, "stride": 1, "expand": 1,
                 "in": 32, "out": 16, "se": 0.25}, ...]}

The model never sees a multiplier: scaling happens before, in pure Python. This module
imports torch only, so it runs on a bare GPU box.

Layer choices follow the TF reference (``efficientnet_model.py``): MBConv = 1x1 expansion
(skipped when the ratio is 1) -> depthwise kxk -> squeeze-and-excitation whose bottleneck is
``se * block input channels`` -> 1x1 projection without activation; residual + stochastic depth
when stride is 1 and channels match; SiLU; BatchNorm with TF momentum 0.99 (PyTorch 0.01) and
eps 1e-3; drop-path rate growing linearly with block index. One departure, for short budgets: a
residual block's projection BatchNorm starts at zero (see ``_init_weights``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

BN_MOMENTUM = 0.01  # TF's 0.99 decay in PyTorch's convention
BN_EPS = 1e-3  # TF reference value; 1e-5 is PyTorch's default

_SPEC_KEYS = {"stem", "head", "stages", "resolution", "num_classes", "dropout", "drop_path"}
_STAGE_KEYS = {"repeats", "kernel", "stride", "expand", "in", "out", "se"}

#: A tiny member for fast CPU tests: B0's topology with 1 block per stage and narrow channels.
TINY_SPEC = {
    "stem": 8,
    "head": 32,
    "resolution": 32,
    "num_classes": 10,
    "dropout": 0.1,
    "drop_path": 0.1,
    "stages": [
        {"repeats": 1, "kernel": 3, "stride": 1, "expand": 1, "in": 8, "out": 8, "se": 0.25},
        {"repeats": 1, "kernel": 3, "stride": 2, "expand": 4, "in": 8, "out": 8, "se": 0.25},
        {"repeats": 2, "kernel": 5, "stride": 2, "expand": 4, "in": 8, "out": 16, "se": 0.25},
        {"repeats": 1, "kernel": 3, "stride": 2, "expand": 4, "in": 16, "out": 16, "se": 0.25},
        {"repeats": 1, "kernel": 5, "stride": 1, "expand": 4, "in": 16, "out": 24, "se": 0.25},
        {"repeats": 1, "kernel": 5, "stride": 2, "expand": 4, "in": 24, "out": 24, "se": 0.25},
        {"repeats": 1, "kernel": 3, "stride": 1, "expand": 4, "in": 24, "out": 32, "se": 0.25},
    ],
}


def check_spec(spec: dict) -> None:
    """Unknown or missing keys are errors, never silently ignored."""
    if set(spec) - {"network"} != _SPEC_KEYS:
        raise ValueError(
            f"bad network spec: unknown keys {sorted(set(spec) - _SPEC_KEYS)}, "
            f"missing keys {sorted(_SPEC_KEYS - set(spec))}"
        )
    for i, stage in enumerate(spec["stages"]):
        if set(stage) != _STAGE_KEYS:
            raise ValueError(f"bad stage {i} in network spec: keys {sorted(stage)}, expected {sorted(_STAGE_KEYS)}")


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=BN_EPS, momentum=BN_MOMENTUM),
            nn.SiLU(inplace=True) if act else nn.Identity(),
        )


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> 1x1 reduce (SiLU) -> 1x1 expand -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        s = self.expand(F.silu(self.reduce(s)))
        return x * s.sigmoid()


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation (MBConv-k, expansion e)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, se: float, drop_path: float):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBNAct(cin, mid) if expand != 1 else nn.Identity()
        self.dw = ConvBNAct(mid, mid, kernel, stride, groups=mid)
        # TF reference: the SE bottleneck is a fraction of the block's *input* channels.
        self.se = SqueezeExcite(mid, max(1, int(cin * se))) if se > 0 else nn.Identity()
        self.project = ConvBNAct(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.dw(self.expand(x))))
        if not self.residual:
            return out
        if self.training and self.drop_path > 0:
            # Stochastic depth: drop the whole residual branch per sample, rescale the rest.
            keep = 1.0 - self.drop_path
            mask = torch.empty((out.shape[0], 1, 1, 1), dtype=out.dtype, device=out.device).bernoulli_(keep)
            out = out * mask.div_(keep)
        return x + out


class EfficientNet(nn.Module):
    """One member of the family, from a resolved spec (see module docstring)."""

    def __init__(self, spec: dict):
        super().__init__()
        check_spec(spec)
        self.spec = spec
        self.stem = ConvBNAct(3, spec["stem"], 3, 2)
        total = sum(s["repeats"] for s in spec["stages"])
        blocks, idx, cin = [], 0, spec["stem"]
        for stage in spec["stages"]:
            for r in range(stage["repeats"]):
                blocks.append(
                    MBConv(
                        cin,
                        stage["out"],
                        stage["kernel"],
                        stage["stride"] if r == 0 else 1,
                        stage["expand"],
                        stage["se"],
                        spec["drop_path"] * idx / total,  # TF: rate grows linearly with depth
                    )
                )
                cin = stage["out"]
                idx += 1
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(cin, spec["head"])
        self.dropout = nn.Dropout(spec["dropout"])
        self.classifier = nn.Linear(spec["head"], spec["num_classes"])
        self._init_weights()

    def _init_weights(self) -> None:
        # Convs: TF reference (fan-out normal). Classifier: uniform(±1/sqrt(in)), not TF's
        # ±1/sqrt(out): with 10 classes TF's range gives initial logits large enough to make
        # the first steps of a short proxy run diverge (measured: initial loss 5 vs ln 10).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / m.in_features**0.5
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)
        # The last BatchNorm of every residual block starts at zero (Goyal et al., 2017, "zero γ";
        # timm's ResNets call it zero_init_last): each block starts as the identity, so a deeper
        # member trains as fast early on as a shallow one. Measured on the synthetic task (B0/B1/B2 at 40 px and
        # up, 2 CPU epochs, batch 16, lr 0.03, seeds 1 and 2): 0.55/0.41/0.49 and 0.65/0.50/0.36
        # val top-1 without, 0.98/0.94/0.82 and 0.96/0.95/0.99 with; without it B2's train loss
        # stalled (2.5 against B0's 1.2 at batch 32).
        for block in self.blocks:
            if block.residual:
                nn.init.zeros_(block.project[1].weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x).mean((2, 3))
        return self.classifier(self.dropout(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(spec: dict) -> nn.Module:
    """Build the network ``spec`` describes: an EfficientNet member (see the module docstring),
    or, when the spec names another ``network``, that baseline (``workers.baselines``)."""
    if spec.get("network", "efficientnet-b0") != "efficientnet-b0":
        from workers import baselines

        return baselines.build(spec)
    return EfficientNet(spec)
