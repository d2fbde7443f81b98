"""Networks of a user's own, for ``--baseline tests.usernets:NAME`` (tests/test_baselines.py).
``tiny`` is a good one; the others are the mistakes orch must name in one line."""

import math

from torch import nn


def tiny(depth: float, width: float, resolution: int, num_classes: int) -> nn.Module:
    """A small plain ConvNet: three stages of ceil(depth·n) 3x3 blocks (n = 1, 2, 3), 8/16/24·width
    channels rounded to 4."""
    layers, cin = [], 3
    for n, c in ((1, 8), (2, 16), (3, 24)):
        c = max(4, int(round(c * width / 4)) * 4)
        for r in range(math.ceil(n * depth)):
            layers += [nn.Conv2d(cin, c, 3, 2 if r == 0 else 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


def no_depth(depth: float, width: float, resolution: int, num_classes: int) -> nn.Module:
    """Ignores depth: a FLOPs budget cannot be spent on it."""
    return tiny(1.0, width, resolution, num_classes)


def not_a_module(depth: float, width: float, resolution: int, num_classes: int):
    return {"layers": 3}


def wrong_signature(width: float) -> nn.Module:
    return tiny(1.0, width, 32, 10)


def raises(depth: float, width: float, resolution: int, num_classes: int) -> nn.Module:
    raise RuntimeError("out of ideas")


def bad_forward(depth: float, width: float, resolution: int, num_classes: int) -> nn.Module:
    """Its head expects 5 input channels: the forward pass fails on an image."""
    return nn.Sequential(nn.Conv2d(5, 8, 3), nn.Flatten(), nn.LazyLinear(num_classes))


NOT_CALLABLE = 42
