"""Does the demo show the method working? `make demo`'s search and scale, run with 5 seeds: each
seed's family (val top-1 of B0, B1, B2) and how many seeds give a family whose accuracy rises
with φ (B0 < B1 < B2).

The two commands are read from the Makefile's `demo` target, so this measures exactly what a
new user runs; `--seed N` is added to the search (the scale inherits it).

    python benchmarks/demo_family.py              # 5 seeds (each about as long as the demo)
    python benchmarks/demo_family.py --quick      # 1 seed, a tiny task (CI)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

from orchrun import ROOT, orch, orch_env

#: --quick: the same commands cut down (later options win in click)
QUICK = {"search": ["--synthetic-size", "128", "64", "--epochs", "1", "--trials", "2", "--base-resolution", "32",
                    "--confirm-top", "0"],
         "scale": ["--phis", "1"]}


def demo_commands(makefile: Path = ROOT / "Makefile") -> dict[str, list[str]]:
    """The `orch search …` and `orch scale …` lines of the Makefile's demo target, as argv."""
    text = makefile.read_text()
    m = re.search(r"^demo:.*\n((?:\t.*\n?)+)", text, re.M)
    if not m:
        sys.exit("benchmarks/demo_family.py: no 'demo:' target in the Makefile")
    out = {}
    for line in m.group(1).splitlines():
        argv = shlex.split(line.strip())
        if argv and argv[0] == "$(ORCH)" and len(argv) > 1:
            out[argv[1]] = argv[2:]
    if set(out) != {"search", "scale"}:
        sys.exit(f"benchmarks/demo_family.py: the demo target runs {sorted(out)}, expected search and scale")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed on a tiny task (CI)")
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    cmds = demo_commands()
    seeds = range(1, 2 if args.quick else args.seeds + 1)
    families = []
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix="orch-demo-family-") as tmp:
            env = orch_env(Path(tmp) / "home")
            t0 = time.monotonic()
            search = orch(["search", *cmds["search"], *(QUICK["search"] if args.quick else []), "--seed", str(seed)], env)
            scale_args = [a if a != "latest" else search["search_id"] for a in cmds["scale"]]
            scale = orch(["scale", *scale_args, *(QUICK["scale"] if args.quick else [])], env)
            wall = time.monotonic() - t0
        best = search["best"]
        tops = [(m["name"], m["resolution"], m["gmacs"], m["val_top1"]) for m in scale["models"]]
        accs = [t[3] for t in tops]
        rising = all(a is not None for a in accs) and all(a < b for a, b in zip(accs, accs[1:]))
        families.append((seed, best, tops, rising, wall))
        print(f"seed {seed}: winner α={best['alpha']:.3f} β={best['beta']:.3f} γ={best['gamma']:.3f}; "
              + ", ".join(f"{n} {r}px {g:.3f} GMACs {'-' if a is None else f'{a:.3f}'}" for n, r, g, a in tops)
              + f"; {'rising' if rising else 'not rising'}; {wall:.0f} s", flush=True)
    print(f"demo family: `make demo`'s search and scale ({' '.join(cmds['search'])} | {' '.join(cmds['scale'])})"
          + (" cut down (quick)" if args.quick else "") + f", {len(families)} seeds, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"families whose val top-1 rises with φ: {sum(f[3] for f in families)} of {len(families)}; "
          f"mean wall per seed {sum(f[4] for f in families) / len(families):.0f} s")


if __name__ == "__main__":
    main()
