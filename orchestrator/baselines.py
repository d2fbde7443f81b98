"""The networks orch scales (``--baseline``): how each turns depth and width multipliers, a
resolution and a class count into a resolved spec, and how much that spec costs.

- ``efficientnet-b0`` (default): ``scaling.network_spec``'s B0 rules (TF reference).
- ``resnet-50``: torchvision's ``resnet50`` (v1.5 bottlenecks, stages of 3, 4, 6, 3 blocks of
  64/128/256/512 bottleneck channels, x4 out; stem 64).
- ``mobilenet-v2``: torchvision's ``mobilenet_v2`` (Sandler et al. 2018, Table 2: stem 32, seven
  stages of inverted residuals, head 1280).
- ``module.path:callable``: a user's builder, called as ``callable(depth=, width=, resolution=,
  num_classes=)`` and returning an ``nn.Module``.

Every built-in one rounds the same way as B0 (the TF reference rules, ``scaling``): a stage's
repeats are ``ceil(depth x repeats)``, channels ``round_filters(c, width)`` (multiples of 8,
never 10% below c·w), so equal networks get equal keys (``scaling.network_key``), and a search
trains each once. A user's network rounds as it likes; it is identified by what it builds: the
spec carries a digest of its parameter and buffer shapes (``structure``), measured on PyTorch's
meta device when the spec is made.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from workers.defaults import BaselineError

BUILTIN = ("efficientnet-b0", "resnet-50", "mobilenet-v2")
DEFAULT = "efficientnet-b0"

#: Short key prefixes of the built-in networks other than B0 (B0's keys have none: stored keys stay).
KEY_PREFIX = {"resnet-50": "rn50", "mobilenet-v2": "mbv2"}

# torchvision resnet50: (blocks, bottleneck channels, stride) per stage; out = 4 x bottleneck
RESNET50_STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))
RESNET50_STEM = 64
# torchvision mobilenet_v2: (expansion t, out c, blocks n, stride s) per stage
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                       (6, 160, 3, 2), (6, 320, 1, 1))
MOBILENET_V2_STEM, MOBILENET_V2_HEAD = 32, 1280


def check_name(name: str) -> str:
    """The name as orch stores it, or BaselineError. A user's callable is checked by
    ``check_user`` (it imports the user's code)."""
    name = (name or "").strip()
    if name.lower() in BUILTIN:
        return name.lower()
    if ":" in name:
        return name
    raise BaselineError(f"unknown baseline {name!r}; use one of {', '.join(BUILTIN)}, or 'module.path:callable' "
                        f"for a network of your own")


def is_builtin(name: str) -> bool:
    return name in BUILTIN


def spec(name: str, depth: float, width: float, resolution: int, *, num_classes: int, dropout: float) -> dict:
    """The resolved spec of network ``name`` scaled by (depth, width) at ``resolution``."""
    from orchestrator import scaling

    if depth < 1.0 or width < 1.0:
        raise ValueError(f"depth and width multipliers must be >= 1, got {depth!r}, {width!r}")
    if name == DEFAULT:
        return scaling.network_spec(depth, width, resolution, num_classes=num_classes, dropout=dropout)
    if name == "resnet-50":
        return {"network": name, "stem": scaling.round_filters(RESNET50_STEM, width),
                "stages": [{"repeats": scaling.round_repeats(n, depth), "mid": scaling.round_filters(c, width),
                            "out": scaling.round_filters(4 * c, width), "stride": s} for n, c, s in RESNET50_STAGES],
                "resolution": int(resolution), "num_classes": int(num_classes), "dropout": float(dropout)}
    if name == "mobilenet-v2":
        return {"network": name, "stem": scaling.round_filters(MOBILENET_V2_STEM, width),
                "head": scaling.round_filters(MOBILENET_V2_HEAD, max(1.0, width)),
                "stages": [{"repeats": scaling.round_repeats(n, depth), "expand": t,
                            "out": scaling.round_filters(c, width), "stride": s} for t, c, n, s in MOBILENET_V2_STAGES],
                "resolution": int(resolution), "num_classes": int(num_classes), "dropout": float(dropout)}
    d = {"network": name, "depth": float(depth), "width": float(width), "resolution": int(resolution),
         "num_classes": int(num_classes)}
    return d | {"structure": structure(name, float(depth), float(width), int(resolution), int(num_classes))}


@lru_cache(maxsize=4096)
def structure(name: str, depth: float, width: float, resolution: int, num_classes: int) -> str:
    """A digest of what a user's callable builds at (depth, width): its parameters' and
    buffers' names and shapes after one forward pass of an image (which also sizes lazy layers).
    Two multipliers that build the same network share it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from workers.baselines import call_user

    spec = {"network": name, "depth": depth, "width": width, "resolution": resolution, "num_classes": num_classes}
    error = None
    for device in ("meta", "cpu"):  # a network that cannot run on the meta device (.item(), …) runs for real
        with torch.device(device):
            model = call_user(spec)
            counter = FlopCounterMode(display=False)
            try:
                with torch.no_grad(), counter:
                    model.eval()(torch.zeros(1, 3, resolution, resolution))
                break
            except Exception as e:  # noqa: BLE001 - the user's forward pass: one line, with the input it got
                error = error or e
    else:
        raise BaselineError(f"--baseline {name!r}: its network does not run on a (1, 3, {resolution}, "
                            f"{resolution}) image ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})")
    # shapes and FLOPs: a network that loops a shared block by depth has its parameters' shapes at
    # every depth, not its FLOPs
    shapes = [f"{n}:{tuple(t.shape)}" for n, t in list(model.named_parameters()) + list(model.named_buffers())]
    shapes.append(f"flops:{counter.get_total_flops()}")
    return hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16]


#: Measured multiply-adds by network key and class count (a search measures each network once).
_MACS: dict[str, int] = {}


def macs(spec: dict) -> int:
    """Multiply-adds of one image through ``spec``'s network at its resolution: counted by
    arithmetic for the built-in networks (``workers.cost``, held equal to the meta device by the
    tests), measured on the meta device (and cached by network) for a user's."""
    if spec.get("network", DEFAULT) in BUILTIN:
        from workers.cost import count

        return count(spec).macs
    from orchestrator.scaling import network_key
    from workers.flops import measure

    key = network_key(spec) + f"/c{spec['num_classes']}"
    if key not in _MACS:
        _MACS[key] = measure(spec).macs
    return _MACS[key]


def check_user(name: str, *, base_resolution: int, num_classes: int) -> None:
    """A user's callable builds modules whose FLOPs grow with depth and with width (so a
    search can spend a FLOPs budget on them), or BaselineError in one line."""
    if is_builtin(name):
        return
    try:
        m1 = macs(spec(name, 1.0, 1.0, base_resolution, num_classes=num_classes, dropout=0.0))
        deeper = macs(spec(name, 2.0, 1.0, base_resolution, num_classes=num_classes, dropout=0.0))
        wider = macs(spec(name, 1.0, 2.0, base_resolution, num_classes=num_classes, dropout=0.0))
    except BaselineError:
        raise
    except Exception as e:  # noqa: BLE001 - its forward pass failed on a (1, 3, r, r) input
        raise BaselineError(f"--baseline {name!r}: its network does not run on a (1, 3, {base_resolution}, "
                            f"{base_resolution}) image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                            ) from None
    if m1 <= 0:
        raise BaselineError(f"--baseline {name!r}: its network has no convolution or linear layer orch can count")
    flat = [what for what, m in (("depth", deeper), ("width", wider)) if m <= m1]
    if flat:
        raise BaselineError(f"--baseline {name!r}: its FLOPs do not grow with the {' and '.join(flat)} multiplier "
                            f"({m1:,} multiply-adds at 1 and at 2); use depth to add blocks and width to widen "
                            f"layers, or orch cannot spend a FLOPs budget on it")
