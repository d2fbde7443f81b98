"""Compiled training steps: ``--compile auto|on|off`` for trials and scaled jobs.

How a network is compiled: as one graph, in place (``nn.Module.compile``: the state dict keeps
its keys, no ``_orig_mod.`` prefix, so checkpoints and logged models are the same compiled or
not; data-parallel ranks wrap it in DDP as before). Measured on an H200 (README, "Compiled
steps"): the whole-network graph trained B0@224 at 1.38x timm's eager step; compiling block by
block instead (one graph per distinct block shape, shared between blocks and networks, so it
compiles less) ran at 0.83x our own eager trial path: a B0 step became bound by the CPU work of
entering ~18 compiled regions forward and backward (72 ms of CPU per 45 ms of GPU).

Shared per node: Inductor's FX-graph and AOTAutograd caches live on disk in ``cache_dir()``
(``ORCH_COMPILE_CACHE``, default ``~/.cache/orch/inductor``), which every trial and job of the
node uses, so a network compiled once on a node is loaded, not compiled, by the next process
(B0@224 on the H200, measured with the block-by-block form: 124 s cold, 9.5 s from the cache in
a fresh process; the Triton kernels are kept there too). The seconds spent compiling are measured with Dynamo's compile callbacks and
reported per epoch (``compile_s``), and each network's figure is kept in the cache folder,
which is what ``auto`` reads.

``auto``: off on CPU (Inductor's C++ kernels take 30-70 s to build for a tiny network on 2 cores,
longer than a proxy trial). On CUDA the first ``PROBE_STEPS`` steps run eager and are timed;
compilation is switched on when the steps left would save more than it costs:
``steps_left * step_s * SAVING > 2 * expected compile seconds``, the expected seconds being this
network's last measured compile on this node, else ``COLD_S_PER_BLOCK`` per block. The steps
left count to the run's last epoch: a search's trial that ASHA stops at its grace epochs trains
fewer, so ``auto`` may compile a trial that is then stopped (on short proxy trials it stays
eager anyway: the rule needs thousands of steps). A compile
that fails (no C++ compiler, an Inductor bug) falls back to eager with one warning line; the
step is re-run, nothing is lost.

``ORCH_COMPILE_BACKEND`` picks Dynamo's backend (default ``inductor``; tests use ``aot_eager``,
which traces and partitions the same graphs but generates no kernels, in seconds on a CPU).
Torch only.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from workers.defaults import COMPILE_MODES, cache_folder

#: Eager steps ``auto`` times before deciding (the first one, cuDNN's autotuning, not counted).
PROBE_STEPS = 6
#: Fraction of an eager step a compiled one saves: B0@224 bs256 on an H200 trained at 7,053
#: images/s compiled where eager ran 5,142 (bare steps), 1 - 5142/7053 = 0.27; taken lower.
SAVING = 0.2
#: Seconds per block to compile a network when nothing is cached, on an H200 node with 16 CPUs:
#: B0 (16 blocks) took 124 s block by block (README, "Compiled steps"). Provisional: the
#: whole-network graph's cold compile is not measured yet (likely longer; B3's took over 3 minutes).
COLD_S_PER_BLOCK = 8.0


def resolve_mode(value) -> str:
    """'auto'/'on'/'off' from a mode or a bool (configs before the option stored a bool)."""
    if value is True:
        return "on"
    if value is False or value is None:
        return "off"
    if value not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {value!r}")
    return value


def cache_dir() -> Path:
    return cache_folder("ORCH_COMPILE_CACHE", "inductor")


def backend() -> str:
    return os.environ.get("ORCH_COMPILE_BACKEND") or "inductor"


def use_shared_cache() -> None:
    """Point Inductor's on-disk caches at the node's orch cache. Set, not defaulted: importing
    torch._inductor writes its own default (/tmp/torchinductor_<user>) into the environment;
    ORCH_COMPILE_CACHE is how a user chooses the folder."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(d)
    os.environ["TRITON_CACHE_DIR"] = str(d / "triton")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "enable_autograd_cache"):
        functorch_config.enable_autograd_cache = True


def blocks(model: nn.Module) -> int:
    """The network's blocks (what the cold compile time grows with); 1 for a module without them."""
    return len(getattr(model, "blocks", ())) or 1


class Clock:
    """Seconds spent compiling in this process since it was made (Dynamo's start/end callbacks:
    tracing, graph building, code generation or cache loading), and how many compilations ran."""

    _lock = threading.Lock()

    def __init__(self):
        from torch._dynamo.callback import callback_handler

        self.seconds = 0.0
        self.count = 0
        self._t0 = None
        self._handler = callback_handler
        self._start = callback_handler.register_start_callback(self._on_start)
        self._end = callback_handler.register_end_callback(self._on_end)

    def _on_start(self, _args=None) -> None:
        with self._lock:
            self._t0 = time.perf_counter()
            self.count += 1

    def _on_end(self, _args=None) -> None:
        with self._lock:
            if self._t0 is not None:
                self.seconds += time.perf_counter() - self._t0
                self._t0 = None

    def close(self) -> None:
        for remove, cb in ((self._handler.remove_start_callback, self._start),
                           (self._handler.remove_end_callback, self._end)):
            try:
                remove(cb)
            except Exception:  # already removed (or a torch without removal): nothing to undo
                pass


def compile_model(model: nn.Module) -> None:
    """Compile ``model`` in place, as one graph with static shapes (see the module docstring)."""
    use_shared_cache()
    model.compile(backend=backend(), dynamic=False)


def uncompile(model: nn.Module) -> None:
    model._compiled_call_impl = None


def pays_off(step_s: float, steps_left: int, expected_compile_s: float) -> bool:
    """``auto``'s rule: the seconds the remaining steps would save exceed twice what compiling costs."""
    return steps_left * step_s * SAVING > 2.0 * expected_compile_s


def network_key(spec: dict, batch: int, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    blob = json.dumps([spec, batch, name, torch.__version__, backend()], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _record_path(key: str) -> Path:
    return cache_dir() / "orch-networks" / f"{key}.json"


def recorded_seconds(key: str) -> float | None:
    """The last measured compile seconds of this network on this node (None: never compiled here)."""
    try:
        return float(json.loads(_record_path(key).read_text())["compile_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_seconds(key: str, seconds: float) -> None:
    path = _record_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"compile_s": round(seconds, 3), "torch": torch.__version__}))
        os.replace(tmp, path)
    except OSError:
        pass  # a record is a hint for `auto`, never a reason to fail a trial


def expected_seconds(key: str, model: nn.Module) -> float:
    known = recorded_seconds(key)
    return known if known is not None else COLD_S_PER_BLOCK * blocks(model)


def warn_fallback(err: BaseException) -> None:
    first = (str(err).strip().splitlines() or [""])[0][:200]
    print(f"orch: torch.compile failed ({type(err).__name__}: {first}); this run continues eager",
          file=sys.stderr, flush=True)
