"""Random driver crashes: N cycles of SIGKILL at a random moment, then `orch search --resume`.

    python benchmarks/faults.py --cycles 5          # 10 trials × 3 epochs, killed 5 times
    python benchmarks/faults.py --quick             # 1 cycle on a 2-trial search (what CI runs)

Each cycle lets the search's driver (`orch search`, local Ray, SQLite store and MLflow in a fresh
state folder) run for a random 5–30 s (a driver spends about 10 s starting on 2 cores), SIGKILLs it (then reaps what it started, as a crashed
machine would lose it), records what the store held at that moment, and resumes it with
`orch search --resume <id>` (or starts it again if it died before recording the search). After the
last cycle the search runs to its end. Prints, last:

- cycles run (and at what moment each kill landed: before the search was recorded, before Tune
  saved its state, or with trials in flight),
- trials expected vs recorded, and duplicate rows (same Tune trial twice, or rows Tune never knew),
- MLflow runs left RUNNING,
- lost epochs: epochs recorded before some kill that are missing from the final record,
- re-trained epochs: epochs trained twice because a kill landed between a report and Tune's
  save of the checkpoint's place (a cost, not a loss: the record keeps the later one).
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`orch …` in its own session (so what it leaves behind can be reaped by group), its output
    in ``<log>.out`` / ``<log>.err``. tests/test_faults.py uses these two as well."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                            stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"), start_new_session=True)


def crash(p: subprocess.Popen) -> None:
    """SIGKILL the driver, then its process group (Ray's agents outlive a killed driver)."""
    p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(1)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 cycle, 2 trials of 2 epochs (CI)")
    ap.add_argument("--cycles", type=int, default=5, help="driver kills before the search may finish")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--min-s", type=float, default=5.0, help="earliest kill, seconds after a driver started")
    ap.add_argument("--max-s", type=float, default=30.0, help="latest kill")
    ap.add_argument("--seed", type=int, default=None, help="seeds the kill moments (default: random)")
    args = ap.parse_args()
    if args.quick:
        args.cycles, args.trials, args.epochs, args.min_s, args.max_s = 1, 2, 2, 12.0, 16.0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)

    from mlflow.tracking import MlflowClient

    from orchestrator.store import ResultsStore

    with tempfile.TemporaryDirectory(prefix="orch-faults-") as tmp:
        home = Path(tmp) / "home"
        env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("RAY_ADDRESS", None)
        new = ["search", "--gpus", "0", "--trials", str(args.trials), "--epochs", str(args.epochs),
               "--grace-epochs", str(args.epochs), "--synthetic-size", "128", "64", "--batch-size", "32", "--json"]
        store = None
        search_id = None
        seen: dict[tuple[str, int], float] = {}  # (trial, epoch) -> val_top1 recorded before a kill
        moments = []
        t_start = time.monotonic()
        for cycle in range(args.cycles + 1):
            log = Path(tmp) / f"driver{cycle}"
            p = spawn(["search", "--resume", search_id, "--json"] if search_id else new, env, log)
            if cycle == args.cycles:  # the last driver runs to the end
                p.wait()
                if p.returncode != 0:
                    sys.exit(f"the final driver failed ({p.returncode}):\n{Path(f'{log}.err').read_text()[-3000:]}")
                break
            at = rng.uniform(args.min_s, args.max_s)
            deadline = time.monotonic() + at
            while time.monotonic() < deadline and p.poll() is None:
                time.sleep(0.1)
            if p.poll() is not None:  # it finished (or failed) before the kill: nothing left to kill
                if p.returncode != 0:
                    sys.exit(f"driver {cycle} failed ({p.returncode}):\n{Path(f'{log}.err').read_text()[-3000:]}")
                moments.append(f"{at:.1f}s: finished first")
                break
            crash(p)
            if store is None and (home / "orch.db").exists():
                store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
            searches = store.list_searches() if store else []
            if not searches:
                moments.append(f"{at:.1f}s: before the search was recorded")
                continue
            search_id = searches[0].id
            trials = store.trials(search_id)
            for t in trials:
                for h in t.history:
                    seen[(t.trial_id, int(h["epoch"]))] = h.get("val_top1")
            tune_saved = (home / "ray" / search_id / "tuner.pkl").exists()
            running = sum(1 for t in trials if t.status == "running")
            if not tune_saved:
                what = "before Tune saved its state"
            elif not running:
                what = f"no trial running (starting up, or between trials), {len(seen)} epochs recorded so far"
            else:
                what = f"{running} trials in flight, {len(seen)} epochs recorded so far"
            moments.append(f"{at:.1f}s: {what}")
        wall = time.monotonic() - t_start

        store = store or ResultsStore(f"sqlite:///{home / 'orch.db'}")
        (search,) = store.list_searches()
        trials = store.trials(search.id)
        final = {(t.trial_id, int(h["epoch"])): h.get("val_top1") for t in trials for h in t.history}
        lost = [k for k in seen if k not in final]
        ids = [t.trial_id for t in trials]
        duplicates = len(ids) - len(set(ids))
        import logging

        from ray.tune import ExperimentAnalysis

        logging.getLogger("ray.tune").setLevel(logging.ERROR)  # no result.json: the driver records results

        tune_ids = {t.trial_id for t in ExperimentAnalysis(str(home / "ray" / search.id)).trials}
        unknown = [i for i in ids if i not in tune_ids]
        client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
        exp = client.get_experiment_by_name("compound-scaling")
        runs = client.search_runs([exp.experiment_id])
        left_running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
        retrained = 0
        for r in runs:
            if r.data.tags.get("orch.kind") == "trial":
                steps = [m.step for m in client.get_metric_history(r.info.run_id, "val_top1")]
                retrained += len(steps) - len(set(steps))
        epochs_expected = sum(args.epochs for t in trials if t.status == "finished")
        store.close()
        bad = search.status != "finished" or len(trials) != args.trials or duplicates or unknown or left_running or lost
        if bad:  # what a reader needs to find out why: rows, Tune's trials, each driver's last lines
            print(f"rows: {[(t.trial_id, t.status, t.epochs_done, t.error) for t in trials]}", file=sys.stderr)
            print(f"Tune's trials: {sorted(tune_ids)}", file=sys.stderr)
            for i in range(len(moments) + 1):
                err = Path(tmp) / f"driver{i}.err"
                if err.exists():
                    print(f"--- driver {i} stderr (last lines)\n" + "\n".join(err.read_text().splitlines()[-15:]),
                          file=sys.stderr)

    print(f"faults: {args.trials} trials × {args.epochs} epochs, kills {args.min_s:g}–{args.max_s:g} s after each "
          f"driver start, seed {seed}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
          + (" (quick)" if args.quick else ""))
    for i, m in enumerate(moments, 1):
        print(f"  kill {i}: {m}")
    print(f"search {search.id}: {search.status}, {len(trials)} rows "
          f"({', '.join(f'{s} {sum(1 for t in trials if t.status == s)}' for s in sorted({t.status for t in trials}))}), "
          f"{wall:.0f} s wall in all")
    print(f"epochs recorded {len(final)} (finished trials × epochs = {epochs_expected}); "
          f"re-trained epochs {retrained}")
    kills = sum(1 for m in moments if "finished first" not in m)
    print(f"cycles run {kills}; trials expected {args.trials}, recorded {len(trials)}; "
          f"duplicate rows {duplicates + len(unknown)}; runs left RUNNING {len(left_running)}; lost epochs {len(lost)}")
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
