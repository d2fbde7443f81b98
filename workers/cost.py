"""What a network spec costs, counted layer by layer from the spec: parameters, multiply-adds
and activations for one image. Pure arithmetic (no torch), so the search can count thousands
of candidates in the time the meta device counts one (~0.3 s each there, microseconds here).

It walks the same layers ``workers.model.EfficientNet`` (and ``workers.baselines``' ResNet-50
and MobileNetV2) build, in the same order; the tests
check that it equals ``workers.flops.measure`` (torch's FlopCounterMode on the meta device)
exactly, over many specs. Counted as there: a convolution or linear layer costs
``k·k·(cin/groups)·cout`` multiply-adds per output position; element-wise work (BatchNorm,
SiLU, the SE gate, pooling) costs none; activations are the elements every convolution and
linear layer outputs (they predict memory traffic and run time better than FLOPs: Dollár,
Singh, Girshick 2021).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Count:
    params: int
    macs: int  # multiply-adds, one image
    activations: int  # output elements of every conv and linear layer, one image


def _out(size: int, kernel: int, stride: int) -> int:
    """Output side of a conv with padding kernel//2 (PyTorch's formula)."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def count(spec: dict) -> Count:
    """Parameters, multiply-adds and activations of ``spec`` at its resolution."""
    params = macs = acts = 0
    side = int(spec["resolution"])

    def conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, bn: bool = True,
             bias: bool = False) -> None:
        nonlocal params, macs, acts, side
        side = _out(side, kernel, stride)
        params += kernel * kernel * (cin // groups) * cout + (cout if bias else 0) + (2 * cout if bn else 0)
        macs += kernel * kernel * (cin // groups) * cout * side * side
        acts += cout * side * side

    def linear(cin: int, cout: int) -> None:
        nonlocal params, macs, acts
        params += cin * cout + cout
        macs += cin * cout
        acts += cout

    network = spec.get("network", "efficientnet-b0")
    if network == "resnet-50":  # workers.baselines.ResNet
        conv(3, spec["stem"], 7, 2)
        side = _out(side, 3, 2)  # the max pool
        cin = spec["stem"]
        for stage in spec["stages"]:
            for r in range(stage["repeats"]):
                stride = stage["stride"] if r == 0 else 1
                conv(cin, stage["mid"])
                conv(stage["mid"], stage["mid"], 3, stride)
                conv(stage["mid"], stage["out"])
                if stride != 1 or cin != stage["out"]:  # the projection shortcut, on the block's output grid
                    params += cin * stage["out"] + 2 * stage["out"]
                    macs += cin * stage["out"] * side * side
                    acts += stage["out"] * side * side
                cin = stage["out"]
        linear(cin, spec["num_classes"])
        return Count(params, macs, acts)
    if network == "mobilenet-v2":  # workers.baselines.MobileNetV2
        conv(3, spec["stem"], 3, 2)
        cin = spec["stem"]
        for stage in spec["stages"]:
            for r in range(stage["repeats"]):
                mid = int(round(cin * stage["expand"]))
                if stage["expand"] != 1:
                    conv(cin, mid)
                conv(mid, mid, 3, stage["stride"] if r == 0 else 1, groups=mid)
                conv(mid, stage["out"])
                cin = stage["out"]
        conv(cin, spec["head"])
        linear(spec["head"], spec["num_classes"])
        return Count(params, macs, acts)
    if network != "efficientnet-b0":
        raise ValueError(f"no arithmetic count for {network!r}; measure it (workers.flops.measure)")

    conv(3, spec["stem"], 3, 2)
    cin = spec["stem"]
    for stage in spec["stages"]:
        for r in range(stage["repeats"]):
            mid = cin * stage["expand"]
            if stage["expand"] != 1:
                conv(cin, mid)
            conv(mid, mid, stage["kernel"], stage["stride"] if r == 0 else 1, groups=mid)
            if stage["se"] > 0:  # two 1x1 convs with bias on the pooled 1x1 map
                reduced = max(1, int(cin * stage["se"]))
                params += mid * reduced + reduced + reduced * mid + mid
                macs += 2 * mid * reduced
                acts += reduced + mid
            conv(mid, stage["out"])
            cin = stage["out"]
    conv(cin, spec["head"])
    params += spec["head"] * spec["num_classes"] + spec["num_classes"]
    macs += spec["head"] * spec["num_classes"]
    acts += spec["num_classes"]
    return Count(params, macs, acts)
