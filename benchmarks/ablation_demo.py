"""Does compound scaling beat one dimension on the synthetic task? `make demo`'s search (read
from the Makefile), then `orch ablate` on its winner: per FLOPs target, each arm's val top-1 over
seeds and compound minus each single-dimension arm with its paired bootstrap 95% interval.

    python benchmarks/ablation_demo.py                       # about 20 minutes on 2 CPU cores
    python benchmarks/ablation_demo.py --out benchmarks/results/ablation-demo.json
    python benchmarks/ablation_demo.py --ablate-args "--epochs 4 --seeds 5"   # larger

The figures it prints are what the README's ablation section quotes; on your own data and GPUs
run the two commands it prints at the end instead (with --dataset and --gpus).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import tempfile
import time
from pathlib import Path

from demo_family import demo_commands
from orchrun import orch, orch_env

#: The ablation's size on the synthetic task: 2 CPU cores, about 20 minutes for 27 runs.
ABLATE = ["--seeds", "3", "--gpus", "0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ablate-args", default="", help="options added to `orch ablate` (later ones win)")
    ap.add_argument("--out", type=Path, default=None, help="write the ablation's JSON here")
    args = ap.parse_args()
    search_args = demo_commands()["search"]
    extra = ABLATE + shlex.split(args.ablate_args)
    with tempfile.TemporaryDirectory(prefix="orch-ablation-demo-") as tmp:
        env = orch_env(Path(tmp) / "home")
        t0 = time.monotonic()
        search = orch(["search", *search_args], env)
        t1 = time.monotonic()
        b = search["best"]
        print(f"search ({' '.join(search_args)}): winner α={b['alpha']:.3f} β={b['beta']:.3f} γ={b['gamma']:.3f}, "
              f"{t1 - t0:.0f} s", flush=True)
        out = orch(["ablate", "--from-run", search["search_id"], *extra], env)
        wall = time.monotonic() - t1
    for e in out["report"]:
        for arm, a in e["arms"].items():
            c = e["compound_minus"].get(arm)
            print(f"{e['target'] if arm != 'baseline' else 1:g}x {arm:<10} FLOPs x{a['flops_ratio']:.3f} "
                  f"{a['gmacs']:.4f} GMACs  val top-1 {a['mean']:.4f} ± {a['std']:.4f} (n={a['n']})"
                  + (f"  compound − {arm}: {c['mean'] * 100:+.1f} pts [{c['ci95'][0] * 100:+.1f}, "
                     f"{c['ci95'][1] * 100:+.1f}] {c['verdict']}" if c and c["ci95"] else ""))
    for line in out["verdicts"]:
        print(line)
    print(f"ablation {out['ablation_id']}: `orch ablate {' '.join(extra)}`, {len(out['runs'])} runs, {wall:.0f} s, "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    if args.out:
        args.out.write_text(json.dumps({"search": search, "ablation": out, "ablate_args": extra,
                                        "wall_s": round(wall, 1), "cpus": os.cpu_count(),
                                        "date": time.strftime("%Y-%m-%d")}, indent=2, default=str))


if __name__ == "__main__":
    main()
