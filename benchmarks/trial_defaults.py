"""What a default search trial learns: the final val top-1 of 2x-B0 candidates on the synthetic
task for a few (base resolution, batch, learning rate, epochs) settings, and the time per trial.
The defaults of `orch search` come from this table (README, "Default trials learn").

    python benchmarks/trial_defaults.py              # the settings below, 3 candidates each
    python benchmarks/trial_defaults.py --quick      # one setting, one candidate, 1 epoch (CI)
    python benchmarks/trial_defaults.py --setting 40,32,0.05,2,1536,512   # other cells (repeatable)

Each candidate is a feasible point of the default `surface` space (width solved so the counted
FLOPs are 2x B0 ± 5%) at depth α = 1.1, 1.5 and 1.9, trained by `workers.train.run` as a trial
is (one CPU thread each, two at a time on 2 cores). Chance is 0.10 (10 classes).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: (base resolution, batch, lr, epochs, synthetic train/val size). The residual blocks start as
#: the identity (zero γ, workers.model) since 2026-11-29; the README keeps the table measured before.
SETTINGS = [
    (40, 64, 0.1, 3, (1536, 512)),    # the defaults before (saturates: every candidate 0.98-1.00)
    (40, 64, 0.1, 2, (1536, 512)),    # the defaults since (workers/defaults.py)
    (40, 32, 0.05, 2, (1536, 512)),
]
ALPHAS = (1.1, 1.5, 1.9)


def _train(job):
    import torch

    torch.set_num_threads(1)
    from orchestrator import space
    from workers import train

    base, batch, lr, epochs, size, alpha = job
    c = space.solve(alpha, None, 1.0, base_resolution=base, num_classes=10)
    cfg = train.make_config(spec=c.spec, batch_size=batch, lr=lr, epochs=epochs, synthetic_size=size)
    t0 = time.perf_counter()
    hist = train.run(cfg, lambda metrics, ckpt: None)
    return job, c.ratio, hist[-1]["val_top1"], time.perf_counter() - t0


def _setting(text: str) -> tuple:
    try:
        base, batch, lr, epochs, n_train, n_val = text.split(",")
        return int(base), int(batch), float(lr), int(epochs), (int(n_train), int(n_val))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give BASE,BATCH,LR,EPOCHS,TRAIN,VAL, e.g. 40,64,0.1,3,1536,512")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2, help="trials trained at once (one CPU thread each)")
    ap.add_argument("--setting", type=_setting, action="append", default=None,
                    metavar="BASE,BATCH,LR,EPOCHS,TRAIN,VAL", help="measure this cell instead of the table's")
    args = ap.parse_args()
    settings, alphas = (SETTINGS[:1], ALPHAS[:1]) if args.quick else (args.setting or SETTINGS, ALPHAS)
    if args.quick:
        settings = [(40, 64, 0.1, 1, (256, 128))]
    jobs = [s + (a,) for s in settings for a in alphas]
    results = []
    with ProcessPoolExecutor(max_workers=max(1, min(args.workers, os.cpu_count() or 1))) as pool:
        for r in pool.map(_train, jobs):  # one line each as it comes, the table last
            results.append(r)
            print(f"  {r[0]}: ratio {r[1]:.2f}, val top-1 {r[2]:.3f}, {r[3]:.0f} s", flush=True)
    print(f"trial defaults: synthetic task, 10 classes (chance 0.10), {len(alphas)} candidates at 2x B0 per "
          f"setting, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}" + (" (quick)" if args.quick else ""))
    print(f"{'base':>4} {'batch':>5} {'lr':>5} {'epochs':>6} {'train':>5}   val top-1 per candidate   "
          f"{'best':>5} {'median':>6} {'s/trial':>7}")
    for s in settings:
        rows = [r for r in results if r[0][:5] == s]
        tops = [r[2] for r in rows]
        print(f"{s[0]:>4} {s[1]:>5} {s[2]:>5g} {s[3]:>6} {s[4][0]:>5}   "
              + " ".join(f"{t:.3f}" for t in tops).ljust(24)
              + f"{max(tops):>6.3f} {statistics.median(tops):>6.3f} {statistics.fmean(r[3] for r in rows):>7.1f}")


if __name__ == "__main__":
    main()
