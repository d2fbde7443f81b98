"""One readable training loop: build, train an epoch, evaluate, report, checkpoint, repeat.

``run(config, report)`` trains one network described by ``config`` (keys in ``DEFAULTS``;
unknown keys are errors) and calls ``report(metrics, checkpoint)`` after every epoch, where
``checkpoint`` is a plain dict (``model``, ``optimizer``, ``epoch``, ``config``, ``history``)
that ``save_checkpoint`` writes. A run started with ``state=`` a loaded checkpoint continues
from the epoch after it. Torch and numpy only: the orchestrator wraps this for Ray Tune and Ray Train.

Data parallel: when ``torch.distributed`` is initialised (Ray Train's TorchTrainer does that,
gloo on CPU, NCCL on GPU) every rank maps the dataset's tier (or, with ``stream``, reads the
prepared shards: ``workers/stream.py``), draws the same global permutation and takes its own
slice of each global batch; the model is wrapped in DDP, so
``batch_size`` is per rank and the global batch is ``batch_size * world``. Validation is sharded
and summed across ranks. Each report carries this rank's ``rank``, ``world_size``, ``pid`` and
``samples`` (images it trained on in the epoch), so a caller can check that every rank took part.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F
from torch.profiler import record_function

from workers import compiled
from workers import data as data_mod
from workers import defaults
from workers.model import build_model

DEFAULTS = {
    "spec": None,  # resolved network spec (orchestrator.scaling.network_spec); required
    # dataset, data_seed, synthetic_size, epochs (ASHA may stop a trial earlier), batch_size,
    # lr (peak; warm-up, then cosine), seed: see workers.defaults.Training
    **defaults.Training().config(),
    "weight_decay": 1e-4,  # on conv/linear weights only; BN and biases are not decayed
    "label_smoothing": 0.1,  # the EfficientNet recipe's value
    "warmup_frac": 0.1,  # linear warm-up over this fraction of all steps, then cosine to 0
    # 'auto', 'on' or 'off' (a bool is read as on/off): torch.compile the network, see
    # workers/compiled.py for how, what is shared per node and auto's rule.
    "compile": "off",
    "bn_momentum": None,  # None: auto, see _bn_momentum
    # An exponential moving average of the weights (and BatchNorm statistics), evaluated beside
    # them each epoch (None: none). The decay after n updates is min(ema_decay, (1 + n) / (10 + n)),
    # TensorFlow's num_updates rule the paper's recipe uses: ~12 recent steps after 100 updates,
    # so short runs average their last steps, and long ones approach ema_decay.
    "ema_decay": None,
    # Scaled jobs: stream the training split of a prepared dataset (workers/stream.py: a fresh
    # random-resized crop every epoch, decoded in `loader_workers` processes, None: auto, or on
    # the GPU; `decoder` 'auto', 'cpu' or 'gpu') instead of reading its pre-resized tier.
    "stream": False,
    "loader_workers": None,
    "decoder": "auto",
}


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite; the trial is failed with this reason."""


def make_config(**overrides) -> dict:
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown training config keys: {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **overrides}
    if cfg["spec"] is None:
        raise ValueError("training config needs 'spec' (a resolved network spec)")
    return cfg


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def save_checkpoint(ckpt: dict, directory: str | os.PathLike) -> Path:
    path = Path(directory) / "checkpoint.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint
    return path


def load_checkpoint(directory: str | os.PathLike) -> dict:
    return torch.load(Path(directory) / "checkpoint.pt", map_location="cpu", weights_only=False)


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _bn_momentum(steps_per_epoch: int) -> float:
    """BN running statistics must track the weights of a *short* proxy run: with TF's 0.01
    (a ~100-step window) a 50-step epoch evaluates with nearly-initial statistics and reports
    chance accuracy. Average over about a fifth of an epoch instead, never a shorter window
    than 10 steps nor a longer one than TF's."""
    return min(0.1, max(0.01, 5.0 / max(1, steps_per_epoch)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _dist() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sum(*values: torch.Tensor) -> list[torch.Tensor]:
    import torch.distributed as dist

    t = torch.stack([v.float() for v in values])
    if _dist()[1] > 1:
        dist.all_reduce(t)
    return list(t)


def _normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> normalized float, channels_last (the model's memory format)."""
    x = x_uint8.float().div_(255.0).sub_(0.5).div_(0.25)
    return x.contiguous(memory_format=torch.channels_last)


def _placed(split: data_mod.Split, device: torch.device) -> data_mod.Split:
    """Where the loop gathers batches from: on a GPU, the whole split when it takes at most a
    quarter of the free memory (indexing on the device is the fastest path); else the mapped tier
    on the host, whose batches are gathered there and moved. On the CPU, the map itself."""
    if device.type != "cuda":
        return split
    free, _ = torch.cuda.mem_get_info(device)
    images = split.images.to(device, non_blocking=True) if split.images.numel() <= free // 4 else split.images
    return data_mod.Split(images, split.labels.to(device, non_blocking=True))


def _gather(images: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Rows ``idx`` of ``images`` on ``device`` (from a host map: gathered, pinned, copied)."""
    if images.device.type == device.type:  # on the device already (or both on the host)
        return images[idx]
    batch = images[idx.cpu()]
    return (batch.pin_memory() if device.type == "cuda" else batch).to(device, non_blocking=True)


class _Ema:
    """The averaged copy of ``model`` (see DEFAULTS["ema_decay"]), kept in an ``AveragedModel``
    (its state dict is what checkpoints hold), updated in one fused operation per step: the
    tensor lists are built once, the decay comes from the update count on the host (no device
    sync), floats are lerped with ``_foreach_lerp_``, integer buffers (BatchNorm's batch counts)
    copied. Measured on an H200 (B0@224): AveragedModel's own update cost 10 ms of CPU per step
    even with a fused average function (it regroups every tensor each call), a visible share of a
    compiled step; a per-tensor average launched ~5 kernels per tensor (~1,500 per B0 step)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        from itertools import chain

        from torch.optim.swa_utils import AveragedModel

        self.averaged = AveragedModel(model, use_buffers=True)
        self.module = self.averaged.module
        self.decay = decay
        pairs = list(zip(chain(self.module.parameters(), self.module.buffers()),
                         chain(model.parameters(), model.buffers()), strict=True))
        self._floats = ([a.detach() for a, _ in pairs if a.is_floating_point()],
                        [c.detach() for a, c in pairs if a.is_floating_point()])
        self._others = ([a.detach() for a, _ in pairs if not a.is_floating_point()],
                        [c.detach() for a, c in pairs if not a.is_floating_point()])

    @torch.no_grad()
    def update(self) -> None:
        n = int(self.averaged.n_averaged)  # a CPU buffer
        if n == 0:
            torch._foreach_copy_(self._floats[0], self._floats[1])
        else:
            torch._foreach_lerp_(self._floats[0], self._floats[1], 1.0 - min(self.decay, (1 + n) / (10 + n)))
        if self._others[0]:
            torch._foreach_copy_(self._others[0], self._others[1])
        self.averaged.n_averaged += 1

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.averaged.load_state_dict(state)




def ema_weights(ckpt: dict) -> dict | None:
    """The averaged network's state dict out of a checkpoint (None: it kept none)."""
    ema = ckpt.get("ema")
    if not ema:
        return None
    return {k.removeprefix("module."): v for k, v in ema.items() if k != "n_averaged"}


@torch.no_grad()
def evaluate(model, split: data_mod.Split, device, *, batch_size: int, amp) -> tuple[float, float]:
    """Top-1 and mean loss over ``split``; with several ranks, each takes every world-th image
    and the sums are reduced, so all ranks return the figures of the whole split."""
    model.eval()
    rank, world = _dist()
    correct = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    images, labels = split.images[rank::world], split.labels[rank::world]
    for i in range(0, len(images), batch_size):
        x = _normalize(images[i:i + batch_size].to(device, non_blocking=True))
        y = labels[i:i + batch_size]
        with amp():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    correct, loss_sum = _all_sum(correct, loss_sum)
    n = len(split)
    return correct.item() / n, loss_sum.item() / n


def run(
    config: dict,
    report: Callable[[dict, dict], None],
    *,
    state: dict | None = None,
    device: torch.device | None = None,
) -> list[dict]:
    """Train ``config`` to its last epoch, reporting after each; returns the per-epoch history."""
    cfg = make_config(**config)
    spec = cfg["spec"]
    device = device or pick_device()
    cuda = device.type == "cuda"
    if cuda and device.index is None:  # "cuda" and "cuda:0" name one device but compare unequal
        device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(cfg["seed"])
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    size = tuple(cfg["synthetic_size"]) if cfg["synthetic_size"] else None
    if cfg["stream"]:
        kind, root = data_mod.parse_spec(cfg["dataset"])
        if kind != "prepared":
            raise ValueError(f"stream reads a prepared dataset, not {cfg['dataset']!r}")
        ds = data_mod.load_prepared(root, spec["resolution"], splits=("val",))
    else:
        ds = data_mod.load(cfg["dataset"], spec["resolution"], seed=cfg["data_seed"], synthetic_size=size)
    if ds.num_classes != spec["num_classes"]:
        raise ValueError(f"dataset has {ds.num_classes} classes but the network spec has {spec['num_classes']}")

    model = build_model(spec)
    # FLOPs are the caller's (measured once per network on the driver: counting them here cost
    # 0.7-2.7 s of CPU per trial); parameters are a cheap count.
    n_params = sum(p.numel() for p in model.parameters())
    # bf16 autocast on CUDA, fp32 on CPU (bf16 CPU kernels are slower); channels_last on both
    # (depthwise convs run ~3x faster in it on CPU too, measured on 1 core).
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(
        _param_groups(model, cfg["weight_decay"]), lr=cfg["lr"], momentum=0.9, nesterov=True,
        **({"fused": True} if cuda else {}),
    )
    ema = _Ema(model, cfg["ema_decay"]) if cfg["ema_decay"] else None
    history: list[dict] = []
    start_epoch = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        history = list(state.get("history", []))
        start_epoch = int(state["epoch"])
    rank, world = _dist()
    fwd = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        fwd = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    comp = _Compiler(model, cfg["compile"], spec, cfg["batch_size"], device)

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    stream = None
    if cfg["stream"]:
        from workers.prepared import read_manifest
        from workers.stream import Stream

        manifest = read_manifest(root)
        n = manifest["splits"]["train"]["count"]
        bs = min(cfg["batch_size"], n // world)  # per rank
        stream = Stream(root, spec["resolution"], batch=bs, rank=rank, world=world, seed=cfg["seed"], flip=ds.flip,
                        device=device, workers=cfg["loader_workers"], decoder=cfg["decoder"], manifest=manifest)
    else:
        train = _placed(ds.train, device)
        train_x, train_y = train.images, train.labels
        n = len(ds.train)
        bs = min(cfg["batch_size"], n // world)  # per rank
    val = _placed(ds.val, device)
    gbs = bs * world  # global batch
    steps_per_epoch = n // gbs  # drop the ragged last batch: fixed shapes suit compile and BN
    total = steps_per_epoch * cfg["epochs"]
    warmup = max(1, int(total * cfg["warmup_frac"]))
    pad = max(1, spec["resolution"] // 8)
    momentum = cfg["bn_momentum"] or _bn_momentum(steps_per_epoch)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    gen = torch.Generator(device=device)  # batch order: the same on every rank
    aug = gen if world == 1 else torch.Generator(device=device)  # augmentation: per rank

    try:
        for epoch in range(start_epoch, cfg["epochs"]):
            gen.manual_seed(cfg["seed"] * 1000 + epoch)
            if aug is not gen:
                aug.manual_seed((cfg["seed"] * 1000 + epoch) * 1009 + rank)
            model.train()
            if stream is None:
                perm = torch.randperm(n, device=device, generator=gen)
            else:
                batches, waited = stream.epoch(epoch), stream.waited
            loss_sum = torch.zeros((), device=device)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for s in range(steps_per_epoch):
                step = epoch * steps_per_epoch + s
                for group in opt.param_groups:
                    group["lr"] = cfg["lr"] * _lr_factor(step, total, warmup)
                with record_function("orch.data"):
                    if stream is not None:  # cropped and flipped as they were decoded
                        x, y = next(batches)
                        x = _normalize(x)
                    else:
                        idx = perm[s * gbs + rank * bs:s * gbs + (rank + 1) * bs]
                        x = _normalize(_gather(train_x, idx, device))
                        x = (data_mod.gpu_resized_crop(x, flip=ds.flip, generator=aug) if ds.augment == "rrc"
                             else data_mod.gpu_augment(x, pad=pad, flip=ds.flip, generator=aug))
                        y = train_y[idx]

                def forward_backward():
                    with record_function("orch.forward_backward"):
                        with amp():
                            loss = F.cross_entropy(fwd(x), y, label_smoothing=cfg["label_smoothing"])
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                    return loss

                loss = comp.guarded(forward_backward)
                with record_function("orch.optimizer"):
                    opt.step()
                if ema is not None:
                    with record_function("orch.ema"):
                        ema.update()
                loss_sum += loss.detach()
                comp.stepped(total - step - 1)
            if cuda:
                torch.cuda.synchronize()
            train_s = time.perf_counter() - t0
            train_loss = _all_sum(loss_sum)[0].item() / max(1, steps_per_epoch * world)
            if not math.isfinite(train_loss):
                raise TrialDiverged(f"train loss became {train_loss} in epoch {epoch + 1}; lower the learning rate")
            t1 = time.perf_counter()
            # Several ranks evaluate the bare module: DDP's forward would add collectives whose
            # count depends on each rank's shard size.
            val_top1, val_loss = comp.guarded(
                lambda: evaluate(fwd if world == 1 else model, val, device, batch_size=max(bs, 256), amp=amp))
            averaged = evaluate(ema.module, val, device, batch_size=max(bs, 256), amp=amp) if ema is not None else None
            eval_s = time.perf_counter() - t1
            if not math.isfinite(val_loss):
                raise TrialDiverged(f"validation loss became {val_loss} in epoch {epoch + 1}; lower the learning rate")
            metrics = {
                "epoch": epoch + 1,
                "val_top1": val_top1,
                "val_loss": val_loss,
                "train_loss": train_loss,
                "epoch_s": train_s + eval_s,
                "train_s": train_s,
                "images_per_s": steps_per_epoch * gbs / train_s,
                "params_m": n_params / 1e6,
                "compile_s": comp.seconds(),  # so far in this process: tracing, code generation or cache loads
                "compiled": float(comp.on),
            }
            if averaged is not None:
                metrics["ema_val_top1"], metrics["ema_val_loss"] = averaged
            if stream is not None:  # seconds the loop waited for decoded batches, and where they were decoded
                metrics["data_wait_s"] = stream.waited - waited
                metrics["gpu_decoded"] = float(stream.decoder == "gpu")
            if device.type == "cuda":  # the device reports it; CPU memory is the process's, not the model's
                metrics["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if world > 1:
                metrics |= {"rank": rank, "world_size": world, "pid": os.getpid(), "samples": steps_per_epoch * bs}
            history.append(metrics)
            ckpt = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch + 1,
                "config": cfg,
                "history": list(history),  # a copy: the checkpoint must not grow with later epochs
                "ema": ema.state_dict() if ema is not None else None,
            }
            comp.epoch_done()
            report(metrics, ckpt)
    finally:
        comp.close()  # its compile callbacks, also when the run fails (reused Ray actors)
        if stream is not None:
            stream.close()  # its loader processes
    return history


class _Compiler:
    """Compilation of one run (workers/compiled.py): ``on`` compiles before the first step,
    ``auto`` times the first eager steps and decides, ``off`` does nothing. ``guarded(fn)`` runs a
    step or an evaluation; when it fails while compiling, the network goes back to eager with one
    warning line and ``fn`` runs again (forward and backward only: no state has changed yet)."""

    def __init__(self, model, mode, spec: dict, batch: int, device: torch.device):
        mode = compiled.resolve_mode(mode)
        if mode == "auto" and device.type != "cuda":
            mode = "off"  # see workers/compiled.py
        self.model, self.mode, self.device = model, mode, device
        self.on = False
        self.failed = False
        self.clock = compiled.Clock() if mode != "off" else None
        self.key = compiled.network_key(spec, batch, device) if mode != "off" else None
        self._recorded = 0.0
        self._probe: list[float] = []
        if mode == "on":
            self._switch_on()

    def _switch_on(self) -> None:
        try:
            compiled.compile_model(self.model)
            self.on = True
        except Exception as e:  # an unknown backend, a broken install
            self._fall_back(e)

    def _fall_back(self, err: BaseException) -> None:
        compiled.warn_fallback(err)
        compiled.uncompile(self.model)
        self.on, self.failed = False, True

    def guarded(self, fn):
        if not self.on:
            return fn()
        before = self.clock.count
        try:
            return fn()
        except Exception as e:
            if self.clock.count == before:  # nothing compiled in this call: not a compile failure
                raise
            self._fall_back(e)
            return fn()

    def stepped(self, steps_left: int) -> None:
        """``auto``: time eager steps 2..PROBE_STEPS+1 (the first one autotunes), then decide
        with what is left of the run."""
        if self.mode != "auto" or self.on or self.failed or self._probe is None:
            return
        torch.cuda.synchronize(self.device)
        self._probe.append(time.perf_counter())
        if len(self._probe) > compiled.PROBE_STEPS:
            step_s = (self._probe[-1] - self._probe[0]) / (len(self._probe) - 1)
            expected = compiled.expected_seconds(self.key, self.model)
            pays = torch.tensor(float(compiled.pays_off(step_s, steps_left, expected)), device=self.device)
            if _dist()[1] > 1:  # the ranks decide together (any rank's yes): each times its own probe
                import torch.distributed as dist

                dist.all_reduce(pays, op=dist.ReduceOp.MAX)
            if pays.item():
                self._switch_on()
            self._probe = None  # decided

    def seconds(self) -> float:
        return round(self.clock.seconds, 3) if self.clock else 0.0

    def epoch_done(self) -> None:
        """The network's compile seconds on this node, for ``auto``: written when they grew."""
        if self.on and self.clock.seconds > self._recorded:
            compiled.record_seconds(self.key, self.clock.seconds)
            self._recorded = self.clock.seconds

    def close(self) -> None:
        if self.clock:
            self.clock.close()
