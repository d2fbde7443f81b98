"""Compiled steps and packed proxy trials on a GPU: the figures of README "Compiled steps".

    python benchmarks/compile_gpu.py --out DIR            # CUDA only; one run, about 9 minutes on an H200
    python benchmarks/compile_gpu.py --quick --out DIR    # CPU smoke run of the same code (tiny sizes)

Needs torch (timm for the reference rows); imports ``workers`` and the pure-Python
``orchestrator.scaling``, so it runs as is on a bare GPU machine. In order of importance (each
section prints its figures and appends them to DIR/compile_gpu.jsonl at once, and a section is
skipped when the time left, --budget-s, is too short):

1. B0@224 bs256: timm eager's bare training step; orch's trial path (``workers.train.run``:
   data from the node-local tier, on-device augmentation, evaluation every epoch) with
   ``compile on``, images/s of the epochs after the first, ÷ timm eager; compile seconds the first
   time (cold cache) and again in a fresh process (the node's shared cache); ``auto``'s decision
   for this job and its break-even steps; the same path with the weight average (scaled jobs)
   and a profile of the compiled step by phase (data, forward+backward, optimizer, average).
2. Packed proxy trials: aggregate images/s of 1, 2, 4 and 8 processes sharing the GPU, each
   training B0 at 128 px, batch 64 (the proxy defaults), eager; the same under CUDA MPS when its
   control daemon is on the machine.
3. B3@300 bs128 and B5@456 bs64: as 1, without the fresh-process rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from train_throughput import bare_step_throughput, official_spec  # noqa: E402
from workers import compiled, train  # noqa: E402

T0 = time.perf_counter()


def emit(out: Path, section: str, **fig) -> None:
    row = {"section": section, "t_s": round(time.perf_counter() - T0, 1), **fig}
    print("RESULT " + json.dumps(row), flush=True)
    with open(out / "compile_gpu.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def timm_eager(member: str, res: int, batch: int, device, steps: int, warmup: int) -> float | None:
    try:
        import timm
    except ImportError:
        return None
    model = timm.create_model(f"efficientnet_{member.lower()}", pretrained=False, num_classes=10)
    ips, _ = bare_step_throughput(model, device, res, batch, steps, warmup, num_classes=10)
    del model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return ips


def trial_path(member: str, res: int, batch: int, steps: int, epochs: int, device, *, compile_mode="on",
               ema=None) -> list[dict]:
    spec = official_spec(member, res, num_classes=10)
    cfg = dict(spec=spec, dataset="synthetic", synthetic_size=(batch * steps, max(batch, 256)), epochs=epochs,
               batch_size=batch, compile=compile_mode, ema_decay=ema)
    return train.run(cfg, lambda m, c: None, device=device)


def later_ips(hist: list[dict]) -> float:
    later = hist[1:] or hist
    return sum(h["images_per_s"] for h in later) / len(later)


def profile_phases(member: str, res: int, batch: int, device) -> dict:
    """Device time per phase of the trial path's step (record_function ranges in workers/train.py)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        trial_path(member, res, batch, 8, 1, device, ema=0.9999)
    out = {}
    for ev in prof.key_averages():
        if ev.key.startswith("orch."):
            dev = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
            out.setdefault(ev.key, {"cpu_ms": 0.0, "device_ms": 0.0})
            out[ev.key]["cpu_ms"] += ev.cpu_time_total / 1e3
            out[ev.key]["device_ms"] += (dev or 0) / 1e3
    return out


def member_section(out: Path, member: str, res: int, batch: int, device, *, steps: int, warmup: int,
                   rerun: bool, quick: bool) -> None:
    ref = timm_eager(member, res, batch, device, steps=steps, warmup=warmup)
    emit(out, f"{member}@{res}", batch=batch, timm_eager_ips=ref)
    epoch_steps = 4 if quick else 20
    hist = trial_path(member, res, batch, epoch_steps, 3, device)
    ips = later_ips(hist)
    step_s = batch / ips
    emit(out, f"{member}@{res}", batch=batch, orch_compiled_ips=ips, ratio_to_timm=(ips / ref if ref else None),
         compile_s_first=hist[0]["compile_s"], compiled=hist[-1]["compiled"], val_top1=hist[-1]["val_top1"],
         peak_mem_mb=hist[-1].get("peak_mem_mb"))
    eager = trial_path(member, res, batch, epoch_steps, 2, device, compile_mode="off")
    eager_ips = later_ips(eager)
    model = train.build_model(official_spec(member, res, num_classes=10))
    emit(out, f"{member}@{res}", orch_eager_ips=eager_ips, compiled_over_eager=ips / eager_ips,
         measured_saving=1 - eager_ips / ips, blocks=compiled.blocks(model),
         auto_break_even_steps_cold=round(2 * compiled.COLD_S_PER_BLOCK * compiled.blocks(model)
                                          / (batch / eager_ips * compiled.SAVING)),
         auto_break_even_steps_recorded=round(2 * hist[0]["compile_s"] / (batch / eager_ips * compiled.SAVING)))
    if rerun:  # a fresh process on the same node: the shared on-disk cache
        code = (f"import sys; sys.path[:0]=[{str(ROOT)!r},{str(ROOT / 'benchmarks')!r}]; "
                f"import torch, json, compile_gpu as g; "
                f"h=g.trial_path({member!r},{res},{batch},{epoch_steps},1,torch.device({device.type!r})); "
                f"print('RERUN '+json.dumps(h[0]['compile_s']))")
        t = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
        second = [ln for ln in p.stdout.splitlines() if ln.startswith("RERUN ")]
        emit(out, f"{member}@{res}", compile_s_second_process=json.loads(second[0][6:]) if second else None,
             second_process_wall_s=round(time.perf_counter() - t, 1), rerun_rc=p.returncode,
             rerun_err=p.stderr[-400:] if p.returncode else None)
        auto = trial_path(member, res, batch, epoch_steps, 1, device, compile_mode="auto")
        emit(out, f"{member}@{res}", auto_steps=epoch_steps, auto_compiled=auto[-1]["compiled"],
             auto_recorded_compile_s=compiled.recorded_seconds(
                 compiled.network_key(official_spec(member, res, num_classes=10), batch, device)))
        ema_hist = trial_path(member, res, batch, epoch_steps, 2, device, ema=0.9999)
        emit(out, f"{member}@{res}", orch_compiled_ema_ips=later_ips(ema_hist),
             ema_cost=1 - later_ips(ema_hist) / ips)
        emit(out, f"{member}@{res}", profile_ms=profile_phases(member, res, batch, device))


def _pack_worker(res: int, batch: int, seconds: float, barrier, results, device_type: str) -> None:
    import torch

    from train_throughput import bare_step
    from workers.model import build_model

    device = torch.device(device_type)
    cuda = device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    step = bare_step(build_model(official_spec("B0", res, num_classes=10)), device, res, batch, num_classes=10)

    for _ in range(10):
        step()
    if cuda:
        torch.cuda.synchronize()
    barrier.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
        if n % 10 == 0 and cuda:
            torch.cuda.synchronize()
    if cuda:
        torch.cuda.synchronize()
    results.put(n * batch / (time.perf_counter() - t0))


def packed(k: int, res: int, batch: int, seconds: float, device_type: str) -> float:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_pack_worker, args=(res, batch, seconds, barrier, results, device_type))
             for _ in range(k)]
    for p in procs:
        p.start()
    rates = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def packing_section(out: Path, device, quick: bool, label: str) -> None:
    res, batch, seconds = (32, 8, 2.0) if quick else (128, 64, 10.0)
    base = None
    for k in (1, 2) if quick else (1, 2, 4, 8):
        agg = packed(k, res, batch, seconds, device.type)
        base = base or agg
        emit(out, f"packing{label}", trials_per_gpu=k, res=res, batch=batch, aggregate_ips=agg, vs_one=agg / base)


def mps_section(out: Path, device, quick: bool) -> None:
    ctl = shutil.which("nvidia-cuda-mps-control")
    if not ctl:
        emit(out, "mps", available=False, why="nvidia-cuda-mps-control is not on this machine")
        return
    pipe = tempfile.mkdtemp(prefix="mps-")
    env = os.environ | {"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": pipe}
    started = subprocess.run([ctl, "-d"], env=env, capture_output=True, text=True, timeout=30)
    if started.returncode:
        emit(out, "mps", available=False, why=f"mps daemon did not start: {started.stderr[-200:]}")
        return
    os.environ.update({"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": pipe})
    try:
        packing_section(out, device, quick, "-mps")
    finally:
        subprocess.run([ctl], input="quit\n", env=env, text=True, timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="folder for compile_gpu.jsonl")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, any device (a smoke run)")
    ap.add_argument("--budget-s", type=float, default=540, help="skip sections that would start after this")
    ap.add_argument("--only", default=None, help="sections to run, e.g. B0,B3 (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        sys.exit("compile_gpu.py needs CUDA (or --quick for a CPU smoke run)")
    os.environ.setdefault("ORCH_COMPILE_CACHE", tempfile.mkdtemp(prefix="orch-compile-"))  # cold at start
    os.environ.setdefault("ORCH_DATA_CACHE", tempfile.mkdtemp(prefix="orch-tiers-"))
    emit(out, "env", torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
         cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"), backend=compiled.backend())
    q = args.quick
    steps, warmup = (2, 1) if q else (20, 5)
    plan = [("B0", 32 if q else 224, 8 if q else 256, True, 0), ("packing", 0, 0, False, 150 if not q else 0),
            ("B3", 32 if q else 300, 8 if q else 128, False, 150), ("B5", 32 if q else 456, 8 if q else 64, False, 170),
            ("mps", 0, 0, False, 100)]
    for name, res, batch, rerun, need_s in plan:
        if args.only and name not in args.only.split(","):
            continue
        left = args.budget_s - (time.perf_counter() - T0)
        if not q and left < need_s:
            emit(out, "skipped", what=name, left_s=round(left))
            continue
        try:
            if name == "packing":
                packing_section(out, device, q, "")
            elif name == "mps":
                if not q:
                    mps_section(out, device, q)
            else:
                member_section(out, name, res, batch, device, steps=steps, warmup=warmup, rerun=rerun, quick=q)
        except Exception as e:  # one section's failure is a figure too; the others still run
            emit(out, "error", what=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
