"""The other baselines orch scales, as ``nn.Module``s built from a resolved spec: ResNet-50,
MobileNetV2, and a user's own network (``module.path:callable``). EfficientNet-B0's family is
``workers.model``; ``workers.model.build_model`` picks the builder by the spec's ``network``.

Like B0's, these specs hold resolved integers (per-stage repeats and channels; the rounding is
``orchestrator.baselines``'), so the builders never see a multiplier and a network key names
what is built. At multiplier 1 the two built-in ones are torchvision's ``resnet50`` and
``mobilenet_v2`` layer for layer (same parameter count and multiply-adds; the tests hold them
to the reference figures). One training departure, as in orch's B0: each ResNet block's last
BatchNorm starts at zero (torchvision's ``zero_init_residual=True``; its default is False), so a
deeper network starts as trainable as a shallow one on short budgets. A user's callable is the exception: it gets the multipliers
themselves (``depth``, ``width``, ``resolution``, ``num_classes``) and rounds as it likes; its
network is identified by what it builds (``structure``, a digest of its parameter shapes).

This module imports torch only, so it runs on a bare GPU box; a user's module must be
importable on every node that trains it.
"""

from __future__ import annotations

import importlib
import inspect
import sys

import torch
from torch import nn

RESNET_STAGE_KEYS = {"repeats", "mid", "out", "stride"}
MOBILENET_STAGE_KEYS = {"repeats", "expand", "out", "stride"}
SPEC_KEYS = {
    "resnet-50": {"network", "stem", "stages", "resolution", "num_classes", "dropout"},
    "mobilenet-v2": {"network", "stem", "head", "stages", "resolution", "num_classes", "dropout"},
}
CALLABLE_KEYS = {"network", "depth", "width", "resolution", "num_classes", "structure"}


from workers.defaults import BaselineError  # noqa: F401 - raised here, caught by the orchestrator


def check_spec(spec: dict) -> None:
    """Unknown or missing keys are errors, never silently ignored."""
    name = spec["network"]
    want = SPEC_KEYS.get(name, CALLABLE_KEYS)
    stage_keys = {"resnet-50": RESNET_STAGE_KEYS, "mobilenet-v2": MOBILENET_STAGE_KEYS}.get(name)
    if set(spec) != want:
        raise ValueError(f"bad {name} spec: unknown keys {sorted(set(spec) - want)}, missing {sorted(want - set(spec))}")
    for i, stage in enumerate(spec.get("stages", []) if stage_keys else []):
        if set(stage) != stage_keys:
            raise ValueError(f"bad stage {i} in {name} spec: keys {sorted(stage)}, expected {sorted(stage_keys)}")


# --------------------------------------------------------------------------- ResNet-50


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: 1x1 reduce, 3x3 (carries the stride), 1x1 expand;
    a 1x1 strided projection on the shortcut when the shape changes."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(cin, mid, 1), nn.ReLU(inplace=True), *_conv_bn(mid, mid, 3, stride),
                                  nn.ReLU(inplace=True), *_conv_bn(mid, cout, 1))
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        check_spec(spec)
        self.spec = spec
        stem = spec["stem"]
        self.stem = nn.Sequential(*_conv_bn(3, stem, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], stem
        for stage in spec["stages"]:
            for r in range(stage["repeats"]):
                blocks.append(Bottleneck(cin, stage["mid"], stage["out"], stage["stride"] if r == 0 else 1))
                cin = stage["out"]
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(spec["dropout"])
        self.classifier = nn.Linear(cin, spec["num_classes"])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for b in self.blocks:  # zero γ on each block's last BN: every block starts as the identity
            nn.init.zeros_(b.body[-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x)).mean((2, 3))
        return self.classifier(self.dropout(x))


# --------------------------------------------------------------------------- MobileNetV2


def _conv_bn_relu6(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = int(round(cin * expand))
        layers = [_conv_bn_relu6(cin, mid)] if expand != 1 else []
        layers += [_conv_bn_relu6(mid, mid, 3, stride, groups=mid), nn.Conv2d(mid, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, spec: dict):
        super().__init__()
        check_spec(spec)
        self.spec = spec
        layers, cin = [_conv_bn_relu6(3, spec["stem"], 3, 2)], spec["stem"]
        for stage in spec["stages"]:
            for r in range(stage["repeats"]):
                layers.append(InvertedResidual(cin, stage["out"], stage["stride"] if r == 0 else 1, stage["expand"]))
                cin = stage["out"]
        layers.append(_conv_bn_relu6(cin, spec["head"]))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(spec["dropout"])
        self.classifier = nn.Linear(spec["head"], spec["num_classes"])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):  # torchvision's init
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(x).mean((2, 3))))


# --------------------------------------------------------------------------- a user's network


def load_callable(ref: str):
    """The callable ``module.path:name`` names, or BaselineError saying what is wrong."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise BaselineError(f"--baseline {ref!r}: a network of your own is named 'module.path:callable' "
                            f"(e.g. 'mynets:build'), or use efficientnet-b0, resnet-50, mobilenet-v2")
    if "" not in sys.path and "." not in sys.path:  # the working directory, as `python -m` has it
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix, said in one line
        raise BaselineError(f"--baseline {ref!r}: cannot import {module_name!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); make it importable (PYTHONPATH, or "
                            f"run orch from its folder) on this machine and every node") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise BaselineError(f"--baseline {ref!r}: {module_name} has no {attr!r}")
    if not callable(fn):
        raise BaselineError(f"--baseline {ref!r}: {attr} is a {type(fn).__name__}, not a callable")
    try:
        inspect.signature(fn).bind(depth=1.0, width=1.0, resolution=224, num_classes=10)
    except TypeError:
        shown = ", ".join(inspect.signature(fn).parameters)
        raise BaselineError(f"--baseline {ref!r}: {attr}({shown}) must accept the keywords "
                            f"depth, width, resolution, num_classes (depth and width are multipliers ≥ 1)") from None
    except ValueError:  # no signature to read (a builtin): the call below says whether it works
        pass
    return fn


def call_user(spec: dict) -> nn.Module:
    """The user's network for ``spec`` (multipliers as they were given)."""
    fn = load_callable(spec["network"])
    try:
        model = fn(depth=float(spec["depth"]), width=float(spec["width"]), resolution=int(spec["resolution"]),
                   num_classes=int(spec["num_classes"]))
    except Exception as e:  # noqa: BLE001 - the user's code failed: one line, with where
        raise BaselineError(f"--baseline {spec['network']!r} raised {type(e).__name__} for depth={spec['depth']:g}, "
                            f"width={spec['width']:g}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(model, nn.Module):
        raise BaselineError(f"--baseline {spec['network']!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def build(spec: dict) -> nn.Module:
    """The module a non-B0 spec describes."""
    name = spec["network"]
    if name == "resnet-50":
        return ResNet(spec)
    if name == "mobilenet-v2":
        return MobileNetV2(spec)
    check_spec(spec)
    return call_user(spec)
