"""Training throughput of orch's workers against timm (and torchvision), side by side, one process.

    python benchmarks/train_throughput.py                 # CUDA: B0@224 bs256, B3@300 bs128, B7@600 bs16
    python benchmarks/train_throughput.py --quick         # any device, tiny sizes (what CI runs)

Needs only torch (timm/torchvision when installed): it imports ``workers`` and the pure-Python
``orchestrator.scaling``, so it runs as is on a bare GPU machine. Every implementation trains
the same way: random data already on the device, channels_last, bf16 autocast on CUDA (fp32 on
CPU), SGD-Nesterov (fused on CUDA), label smoothing 0.1, the same batch and resolution.

Prints, last, one row per (model, implementation): images/s, peak memory, and the ratio to timm
eager; then the full trial path (``workers.train.run``: on-device data, augmentation,
evaluation every epoch) as a fraction of the bare training step of the same network.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from orchestrator import scaling  # noqa: E402  (pure Python)
from workers import train  # noqa: E402
from workers.model import build_model  # noqa: E402

#: (name, official member, resolution, batch) on CUDA: the reference rows of the issue.
GPU_ROWS = [("B0", "B0", 224, 256), ("B3", "B3", 300, 128), ("B7", "B7", 600, 16)]
CPU_QUICK_ROWS = [("B0", "B0", 64, 8)]


def official_spec(name: str, resolution: int, num_classes: int = 1000) -> dict:
    width, depth, _, dropout = scaling.OFFICIAL[name]
    return scaling.network_spec(depth, width, resolution, num_classes=num_classes, dropout=dropout)


def make_models(name: str, resolution: int, compile_ours: bool) -> list[tuple[str, object]]:
    """(label, factory) pairs; a factory returns an nn.Module or raises ImportError."""
    spec = official_spec(name, resolution)
    out = [("orch eager", lambda: build_model(spec))]
    if compile_ours:
        out.append(("orch compile", lambda: torch.compile(build_model(spec))))

    def timm_model():
        import timm

        return timm.create_model(f"efficientnet_{name.lower()}", pretrained=False)

    def tv_model():
        import torchvision

        return getattr(torchvision.models, f"efficientnet_{name.lower()}")(weights=None)

    out += [("timm eager", timm_model), ("torchvision eager", tv_model)]
    return out


def bare_step(model, device, resolution: int, batch: int, num_classes: int = 1000):
    """One forward+backward+SGD step of ``model`` on random on-device data, as a function."""
    cuda = device.type == "cuda"
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          **({"fused": True} if cuda else {}))
    x = torch.randn(batch, 3, resolution, resolution, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False):
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bare_step_throughput(model, device, resolution: int, batch: int, steps: int, warmup: int,
                         num_classes: int = 1000) -> tuple[float, float | None]:
    """images/s of forward+backward+SGD step on random on-device data; peak memory in GB."""
    cuda = device.type == "cuda"
    step = bare_step(model, device, resolution, batch, num_classes)

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    return steps * batch / dt, peak


def full_trial_path(device, resolution: int, batch: int, n_train: int, n_val: int, epochs: int,
                    compile_model: bool) -> tuple[float, float]:
    """(full-path images/s, bare-step images/s) for B0 on the 10-class synthetic task.

    Full path: what ``workers.train.run`` trains per second of epoch wall time, training plus
    evaluation, epochs after the first (compile and cuDNN autotuning happen in the first)."""
    spec = scaling.network_spec(1.0, 1.0, resolution, num_classes=10)
    hist = train.run(dict(spec=spec, dataset="synthetic", synthetic_size=(n_train, n_val), epochs=epochs,
                          batch_size=batch, compile=compile_model), lambda m, c: None, device=device)
    steps = n_train // batch
    later = hist[1:] or hist
    full = sum(steps * batch for _ in later) / sum(h["epoch_s"] for h in later)
    model = build_model(spec)
    model = torch.compile(model) if compile_model else model
    bare, _ = bare_step_throughput(model, device, resolution, batch, steps=max(3, steps), warmup=max(1, steps // 2),
                                   num_classes=10)
    return full, bare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on any device (CI)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 30; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10; quick 1)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--models", default=None, help="subset of B0,B3,B7 (GPU rows)")
    ap.add_argument("--no-full-path", action="store_true", help="skip the full-trial-path row")
    args = ap.parse_args()

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cuda:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    quick = args.quick or not cuda
    rows = CPU_QUICK_ROWS if quick else [r for r in GPU_ROWS if not args.models or r[0] in args.models.split(",")]
    steps = args.steps or (3 if quick else 30)
    warmup = args.warmup or (1 if quick else 10)
    compile_ours = cuda and not args.no_compile

    env = f"torch {torch.__version__}, {torch.cuda.get_device_name() if cuda else 'CPU'}, " \
          f"{'bf16 autocast' if cuda else 'fp32'}, channels_last, {time.strftime('%Y-%m-%d')}"
    print(f"train_throughput: {env}{' (quick)' if quick else ''}", flush=True)
    results = []
    for name, member, res, batch in rows:
        timm_eager = None
        for label, factory in make_models(member, res, compile_ours):
            try:
                model = factory()
            except ImportError as e:
                print(f"  {name} {label}: skipped ({e.name or e} not installed)", flush=True)
                continue
            ips, peak = bare_step_throughput(model, device, res, batch, steps, warmup)
            del model
            if cuda:
                torch.cuda.empty_cache()
            if label == "timm eager":
                timm_eager = ips
            results.append([name, res, batch, label, ips, peak])
            mem = f", peak {peak:.2f} GB" if peak is not None else ""
            print(f"  {name}@{res} bs{batch} {label}: {ips:,.1f} img/s{mem}", flush=True)
        for r in results:
            if r[0] == name:
                r.append(r[4] / timm_eager if timm_eager else None)

    full = bare = None
    if quick:
        full, bare = full_trial_path(device, 64, 8, n_train=64, n_val=32, epochs=2, compile_model=False)
    elif not args.no_full_path:
        full, bare = full_trial_path(device, 224, 256, n_train=5120, n_val=1024, epochs=3, compile_model=compile_ours)

    print()
    print(f"{'model':<6} {'res':>4} {'batch':>5} {'implementation':<18} {'img/s':>10} {'peak GB':>8} {'÷ timm eager':>12}")
    for name, res, batch, label, ips, peak, ratio in results:
        print(f"{name:<6} {res:>4} {batch:>5} {label:<18} {ips:>10,.1f} {peak if peak is not None else float('nan'):>8.2f} "
              f"{ratio if ratio is not None else float('nan'):>12.3f}")
    if full is not None:
        print(f"full trial path (data on device, augmentation, evaluation) ÷ bare step, B0: {full / bare:.3f} "
              f"({full:,.1f} vs {bare:,.1f} img/s)")


if __name__ == "__main__":
    main()
