"""What `orch search` costs against the exhaustive grid it replaces, and whether it finds what
the grid finds. One fixed task (the synthetic one, one data seed, base 40 px so resolution can
grow within 2x), two ways:

- the grid: every point of a 0.1 grid whose counted FLOPs are 2x B0 ± 5% (`--space grid`,
  width solved, distinct networks once), each trained at the full budget with 3 seeds;
- `orch search` (TPE + ASHA + de-duplication + confirmation of the top 3 with 2 fresh seeds)
  run with 5 different seeds.

    python benchmarks/search_cost.py            # 32 minutes on 2 CPU cores (2026-11-30; README)
    python benchmarks/search_cost.py --quick    # a few minutes' worth, cut down (CI)

Prints, for each search: its cost as a fraction of the grid's (trial epochs, and CPU seconds in
training), its winner, the winner's mean val top-1 over its full-budget runs (the search trial
and the confirmation seeds), and whether that is in the grid's top 3 (its network's grid mean if
the grid has it, else its own mean against the grid's third best). Then the Spearman
correlation between the grid networks' ranking after one epoch (ASHA's first rung) and after
the full budget (both means over the 3 seeds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchrun import orch, orch_env  # noqa: E402 - benchmarks/orchrun.py


def ranks(values: list[float]) -> list[float]:
    """Average ranks (ties share the mean of their positions)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else None


def cost(trials: list) -> tuple[int, float]:
    """Trial epochs actually trained (replays of a trained network cost nothing) and their seconds."""
    trained = [t for t in trials if not t.reused_from]
    return sum(t.epochs_done for t in trained), sum(t.train_s or 0.0 for t in trained)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a coarse grid, 1 grid seed, 1 search, 1 epoch (CI)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--trials", type=int, default=8, help="trials of each orch search (before confirmation)")
    ap.add_argument("--searches", type=int, default=5)
    ap.add_argument("--grid-seeds", type=int, default=3)
    ap.add_argument("--grid-step", type=float, default=0.1)
    # 512 images at batch 32 (16 steps an epoch, the rate scaled linearly from the default 0.1 at 64):
    # the largest task that keeps the grid's 16 networks x 3 seeds plus 5 searches near 30 minutes here (32, measured)
    ap.add_argument("--size", type=int, nargs=2, default=(512, 256), metavar=("TRAIN", "VAL"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.trials, args.searches, args.grid_seeds, args.grid_step = 1, 3, 1, 1, 0.2
        args.size = (128, 64)
    from orchestrator.store import ResultsStore

    task = ["--base-resolution", "40", "--synthetic-size", str(args.size[0]), str(args.size[1]), "--data-seed", "0",
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--gpus", "0",
            "--no-paper-point"]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="orch-search-cost-") as tmp:
        env = orch_env(Path(tmp) / "home")
        grid_ids = [orch(["search", *task, "--space", "grid", "--grid-step", str(args.grid_step), "--tolerance", "0.1",
                          "--grace-epochs", str(args.epochs), "--confirm-top", "0", "--seed", str(s)], env)["search_id"]
                    for s in range(args.grid_seeds)]
        search_ids = [orch(["search", *task, "--trials", str(args.trials), "--grace-epochs", "1", "--confirm-top", "3",
                            "--confirm-seeds", "2", "--seed", str(10 + s)], env)["search_id"]
                      for s in range(args.searches)]
        store = ResultsStore(f"sqlite:///{Path(tmp) / 'home' / 'orch.db'}")
        finals: dict[str, list[float]] = {}
        firsts: dict[str, list[float]] = {}
        grid_epochs = grid_s = 0.0
        for sid in grid_ids:
            trials = store.trials(sid)
            e, sec = cost(trials)
            grid_epochs, grid_s = grid_epochs + e, grid_s + sec
            for t in trials:
                if t.status == "finished" and t.history:
                    finals.setdefault(t.network_key, []).append(t.history[-1]["val_top1"])
                    firsts.setdefault(t.network_key, []).append(t.history[0]["val_top1"])
        grid_mean = {k: statistics.fmean(v) for k, v in finals.items()}
        ranked = sorted(grid_mean, key=grid_mean.get, reverse=True)
        third = grid_mean[ranked[min(2, len(ranked) - 1)]]
        keys = sorted(grid_mean)
        rho = spearman([statistics.fmean(firsts[k]) for k in keys], [grid_mean[k] for k in keys])
        rows = []
        for sid in search_ids:
            rec = store.get_search(sid)
            trials = store.trials(sid)
            e, sec = cost(trials)
            best = next(t for t in trials if t.trial_id == rec.best_trial_id)
            conf = (rec.summary or {}).get("confirmation") or {}
            mine = next((c["values"] for c in conf.get("candidates", []) if c["trial_id"] == best.trial_id), [])
            runs = ([best.val_top1] if best.status == "finished" else []) + list(mine)
            mean = statistics.fmean(runs) if runs else float("nan")
            if best.network_key in grid_mean:
                top3, where = ranked.index(best.network_key) < 3, f"grid rank {ranked.index(best.network_key) + 1}"
            else:
                top3, where = mean >= third, "not on the grid"
            rows.append((sid, e / grid_epochs, sec / grid_s if grid_s else float("nan"), best, mean, len(runs), top3,
                         where))
        store.close()

    print(f"search cost: synthetic task {args.size[0]}/{args.size[1]} at base 40, {args.epochs} epochs, batch "
          f"{args.batch_size}, lr {args.lr:g}, grid step "
          f"{args.grid_step:g} x {args.grid_seeds} seeds vs {args.searches} orch searches of {args.trials} trials; "
          f"{os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}" + (" (quick)" if args.quick else ""))
    print(f"grid: {len(grid_mean)} networks, {grid_epochs:.0f} trial epochs, {grid_s:.0f} s training; best mean "
          f"{grid_mean[ranked[0]]:.4f}, third {third:.4f}")
    for sid, fe, fs, best, mean, n, top3, where in rows:
        print(f"{sid}: cost {fe:.1%} of the grid's epochs, {fs:.1%} of its seconds; winner α={best.alpha:.3f} "
              f"β={best.beta:.3f} γ={best.gamma:.3f} ({best.resolution} px) mean {mean:.4f} over {n} runs, {where}, "
              f"{'in' if top3 else 'not in'} the grid's top 3")
    print(f"wall {time.monotonic() - t_start:.0f} s")
    hits = sum(1 for r in rows if r[6])
    print(f"mean cost {statistics.fmean(r[1] for r in rows):.1%} of the grid's epochs, "
          f"{statistics.fmean(r[2] for r in rows):.1%} of its seconds; winner in the grid's top 3 in {hits} of "
          f"{len(rows)}; Spearman(first rung, full budget) = {'n/a' if rho is None else f'{rho:.2f}'}")


if __name__ == "__main__":
    main()
