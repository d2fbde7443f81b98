"""Driver crashes, random and aimed: searches and a scale whose drivers are SIGKILLed again and
again, each followed by `orch search --resume <id>` (or the same `orch scale` command), and then
the record checked: the store and MLflow must agree (orchestrator/audit.py).

    python benchmarks/faults.py --searches 4 --cycles 7 --scale-cycles 4   # 32 kills
    python benchmarks/faults.py --quick        # 1 search, 2 kills (one aimed, one random): CI

Each search runs in one shared state folder (local Ray, SQLite store, local MLflow store). A
cycle starts a driver and kills it:

- **random**: a SIGKILL after a random 5–30 s (a driver spends about 10 s starting on 2 cores);
- **aimed**: the driver kills itself at a risky moment (orchestrator/faultpoint.py, through
  ORCH_KILL_AT): just after a trial's last report, between a trial's end in the store and its
  MLflow run's end, right after Tune registered a checkpoint, right after a resumed driver
  started. Which point, and its n-th occurrence, is drawn per cycle.

Then its process group is reaped (a crashed machine loses it too). After the last cycle the
search runs to its end and the record is audited. Then a scale of the last search (B1 and B2)
is killed ``--scale-cycles`` times (aimed at a model's end, or random) and re-run to its end,
and audited. Prints, last: per search and the scale, the kills and where they landed, trials
expected vs recorded, duplicate rows, runs left RUNNING, lost and re-trained epochs, and the
store/MLflow disagreements found; then the totals. Exits non-zero on any loss or disagreement.
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

#: Aimed kills of a search driver: (point, largest n drawn). "resumed" only for a resumed driver.
SEARCH_POINTS = (("trial-last-report", 3), ("trial-ended", 3), ("checkpoint", 6), ("resumed", 1),
                 ("confirm-trial-ended", 2), ("search-ended", 1))


def spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`orch …` in its own session (so what it leaves behind can be reaped by group), its output
    in ``<log>.out`` / ``<log>.err``. tests/test_faults.py uses these two as well."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], env=env, cwd=ROOT,
                            stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"), start_new_session=True)


def crash(p: subprocess.Popen) -> None:
    """SIGKILL the driver, then its process group (Ray's agents outlive a killed driver)."""
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait()
    time.sleep(1)
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(log: Path, n: int = 15) -> str:
    err = Path(f"{log}.err")
    return "\n".join(err.read_text().splitlines()[-n:]) if err.exists() else ""


def drive(cmd_new: list[str], cmd_again, env: dict, tmp: Path, tag: str, cycles: int, rng, *, aimed_share: float,
          points, min_s: float, max_s: float, on_kill, forced: list | None = None,
          finished=None) -> tuple[list[str], float]:
    """Start, kill ``cycles`` times, run to the end. ``cmd_again()`` is the command that continues
    (None: start afresh); ``on_kill()`` looks at the record after each kill and says where it landed.
    ``forced``: each cycle's aim (None: a random kill) instead of drawing them. ``finished()``: the
    record is complete (a kill that landed after its last write, while the driver shut down, ends
    the cycles: there is nothing left to continue)."""
    moments = []
    t0 = time.monotonic()
    for cycle in range(cycles + 1):
        log = tmp / f"{tag}-driver{cycle}"
        again = cmd_again()
        run_env = dict(env)
        aim = None
        if cycle < cycles and forced is not None:
            aim = forced[cycle]
        elif cycle < cycles and rng.random() < aimed_share:
            choices = [(p, n) for p, n in points if p != "resumed" or again]
            point, most = rng.choice(choices)
            aim = f"{point}:{rng.randint(1, most)}"
        if aim:
            run_env["ORCH_KILL_AT"] = aim
        p = spawn(again or cmd_new, run_env, log)
        if cycle == cycles:  # the last driver runs to the end
            p.wait()
            if p.returncode != 0:
                sys.exit(f"{tag}: the final driver failed ({p.returncode}):\n{_tail(log, 40)}")
            break
        if aim:
            try:
                p.wait(timeout=600)
            except subprocess.TimeoutExpired:
                pass
            how = f"aimed {aim}"
            if p.returncode == 0:
                moments.append(f"{how}: never reached, finished first")
                break
            if p.returncode is not None and p.returncode != -signal.SIGKILL:
                sys.exit(f"{tag}: driver {cycle} failed ({p.returncode}):\n{_tail(log, 40)}")
        else:
            at = rng.uniform(min_s, max_s)
            deadline = time.monotonic() + at
            while time.monotonic() < deadline and p.poll() is None:
                time.sleep(0.1)
            how = f"random {at:.1f}s"
            if p.poll() is not None:
                if p.returncode != 0:
                    sys.exit(f"{tag}: driver {cycle} failed ({p.returncode}):\n{_tail(log, 40)}")
                moments.append(f"{how}: finished first")
                break
        crash(p)
        moments.append(f"{how}: {on_kill()}")
        if finished is not None and finished():
            moments[-1] += " (its record was complete: killed while it shut down)"
            break
    return moments, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1 search of 2 trials × 2 epochs, 2 kills, no scale (CI)")
    ap.add_argument("--searches", type=int, default=1, help="searches, one after another in one state folder")
    ap.add_argument("--cycles", type=int, default=5, help="driver kills per search before it may finish")
    ap.add_argument("--scale-cycles", type=int, default=0, help="driver kills of a scale of the last search (0: none)")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--aimed", type=float, default=0.5, help="share of kills aimed at a risky moment (0..1)")
    ap.add_argument("--min-s", type=float, default=5.0, help="earliest random kill, seconds after a driver started")
    ap.add_argument("--max-s", type=float, default=30.0, help="latest random kill")
    ap.add_argument("--seed", type=int, default=None, help="seeds the kills (default: random)")
    args = ap.parse_args()
    if args.quick:
        args.searches, args.cycles, args.scale_cycles, args.trials, args.epochs = 1, 2, 0, 2, 2
        args.min_s, args.max_s = 12.0, 16.0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)

    import logging

    from mlflow.tracking import MlflowClient
    from ray.tune import ExperimentAnalysis

    from orchestrator.audit import disagreements
    from orchestrator.store import ResultsStore
    from orchestrator.tracking import Tracker

    logging.getLogger("ray.tune").setLevel(logging.ERROR)  # no result.json: the driver records results
    reports, bad = [], False
    with tempfile.TemporaryDirectory(prefix="orch-faults-") as tmp:
        tmp = Path(tmp)
        home = tmp / "home"
        env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("RAY_ADDRESS", None)
        env.pop("ORCH_KILL_AT", None)
        data = ["--synthetic-size", "128", "64", "--batch-size", "32"]
        stores: list = []

        def store():
            if not stores and (home / "orch.db").exists():
                stores.append(ResultsStore(f"sqlite:///{home / 'orch.db'}"))
            return stores[0] if stores else None

        known = set()
        for n in range(args.searches):
            seen: dict[tuple[str, int], float] = {}  # (trial, epoch) -> val_top1 recorded before a kill
            mine: list[str] = []

            def current():
                s = store()
                if not mine and s:
                    new = [x.id for x in s.list_searches(1000) if x.id not in known]
                    mine.extend(new[:1])
                return mine[0] if mine else None

            def again():
                sid = current()
                return ["search", "--resume", sid, "--json"] if sid else None

            def landed():
                sid = current()
                if not sid:
                    return "before the search was recorded"
                trials = store().trials(sid)
                for t in trials:
                    for h in t.history:
                        seen[(t.trial_id, int(h["epoch"]))] = h.get("val_top1")
                running = sum(1 for t in trials if t.status == "running")
                if not (home / "ray" / sid / "tuner.pkl").exists():
                    return "before Tune saved its state"
                return (f"{running} trials in flight, " if running else "no trial running, ") + \
                    f"{len(seen)} epochs recorded so far"

            new = ["search", "--gpus", "0", "--trials", str(args.trials), "--epochs", str(args.epochs),
                   "--grace-epochs", str(args.epochs), "--seed", str(n), "--json", *data,
                   # a confirmation phase too (kills land in it), except in the CI-sized run
                   "--confirm-top", "0" if args.quick else "2"]
            moments, wall = drive(new, again, env, tmp, f"search{n}", args.cycles, rng, aimed_share=args.aimed,
                                  points=SEARCH_POINTS, min_s=args.min_s, max_s=args.max_s, on_kill=landed,
                                  # --quick: issue #21's window first (a trial's end recorded, its run
                                  # not ended), then a random kill
                                  forced=["trial-ended:1", None] if args.quick else None,
                                  finished=lambda: current() is not None and store().get_search(current()).status == "finished")
            sid = current()
            known.add(sid)
            search = store().get_search(sid)
            trials = store().trials(sid)
            final = {(t.trial_id, int(h["epoch"])): h.get("val_top1") for t in trials for h in t.history}
            ids = [t.trial_id for t in trials]
            tune_ids = {t.trial_id for name in (sid, f"{sid}-confirm") if (home / "ray" / name).is_dir()
                        for t in ExperimentAnalysis(str(home / "ray" / name)).trials}
            tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "compound-scaling")
            disagree = disagreements(store(), tracker, search_id=sid)
            client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
            retrained = 0
            for t in trials:
                steps = [m.step for m in client.get_metric_history(t.mlflow_run_id, "val_top1")]
                retrained += len(steps) - len(set(steps))
            r = {"what": f"search {sid}", "moments": moments, "wall": wall, "status": search.status,
                 "units": sum(1 for t in trials if t.phase == "search"), "expected": args.trials, "duplicates": len(ids) - len(set(ids))
                 + sum(1 for i in ids if i not in tune_ids), "lost": [k for k in seen if k not in final],
                 "epochs": len(final), "retrained": retrained, "disagree": disagree,
                 "rows": [(t.trial_id, t.status, t.epochs_done, t.error) for t in trials], "tmp": tmp, "tag": f"search{n}"}
            reports.append(r)

        if args.scale_cycles:
            sid = sorted(known)[0] if len(known) == 1 else store().list_searches(1)[0].id
            cmd = ["scale", "--from-run", sid, "--phis", "1-2", "--no-baseline", "--epochs", str(args.epochs), "--json"]
            seen_models: dict[tuple[str, int], float] = {}

            def scale_id():
                scales = store().list_scales(1)
                return scales[0].id if scales else None

            def scale_landed():
                sc = scale_id()
                if not sc:
                    return "before the scale was recorded"
                runs = store().scale_runs(sc)
                for m in runs:
                    for h in m.history:
                        seen_models[(m.model, int(h["epoch"]))] = h.get("val_top1")
                return f"{sum(1 for m in runs if m.status == 'running')} models in flight, {len(seen_models)} epochs recorded"

            moments, wall = drive(cmd, lambda: None, env, tmp, "scale", args.scale_cycles, rng, aimed_share=args.aimed,
                                  points=(("model-ended", 1), ("model-reported", 3)), min_s=args.min_s,
                                  max_s=args.max_s + 20, on_kill=scale_landed)
            sc = scale_id()
            tracker = Tracker(f"sqlite:///{home / 'mlflow.db'}", "compound-scaling")
            rows = store().scale_runs(sc)
            final = {(m.model, int(h["epoch"])) for m in rows for h in m.history}
            reports.append({"what": f"scale {sc}", "moments": moments, "wall": wall,
                            "status": store().get_scale(sc).status, "units": len(rows), "expected": 2,
                            "duplicates": len(rows) - len({m.model for m in rows}),
                            "lost": [k for k in seen_models if k not in final], "epochs": len(final), "retrained": 0,
                            "disagree": disagreements(store(), tracker, scale_id=sc),
                            "rows": [(m.model, m.status, m.epochs_done, m.error) for m in rows], "tmp": tmp,
                            "tag": "scale"})

        client = MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow.db'}")
        exp = client.get_experiment_by_name("compound-scaling")
        left_running = [r.info.run_id for r in client.search_runs([exp.experiment_id]) if r.info.status == "RUNNING"]
        for r in reports:
            r["bad"] = (r["status"] != "finished" or r["units"] != r["expected"] or r["duplicates"] or r["lost"]
                        or r["disagree"])
            if r["bad"]:  # what a reader needs to find out why
                bad = True
                print(f"--- {r['what']}: rows {r['rows']}", file=sys.stderr)
                for line in r["disagree"]:
                    print(f"  disagreement: {line}", file=sys.stderr)
                for i in range(len(r["moments"]) + 1):
                    print(f"--- {r['tag']} driver {i} stderr (last lines)\n{_tail(tmp / (r['tag'] + f'-driver{i}'))}",
                          file=sys.stderr)
        if stores:
            stores[0].close()

    print(f"faults: {args.searches} searches of {args.trials} trials × {args.epochs} epochs, {args.cycles} kills each"
          f"{f', a scale with {args.scale_cycles} kills' if args.scale_cycles else ''}; {args.aimed:.0%} aimed, "
          f"random ones {args.min_s:g}–{args.max_s:g} s after a driver start; seed {seed}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}" + (" (quick)" if args.quick else ""))
    kills = aimed = 0
    for r in reports:
        k = [m for m in r["moments"] if "finished first" not in m]
        kills += len(k)
        aimed += sum(1 for m in k if m.startswith("aimed"))
        print(f"{r['what']}: {r['status']}, {r['units']} of {r['expected']} recorded, {r['epochs']} epochs, "
              f"{r['wall']:.0f} s wall; {len(k)} kills")
        for i, m in enumerate(r["moments"], 1):
            print(f"  kill {i}: {m}")
        print(f"  duplicate rows {r['duplicates']}; lost epochs {len(r['lost'])}; re-trained epochs {r['retrained']}; "
              f"disagreements {len(r['disagree'])}")
    units = sum(r["units"] for r in reports)
    epochs = sum(r["epochs"] for r in reports)
    disagree = sum(len(r["disagree"]) for r in reports)
    lost = sum(len(r["lost"]) for r in reports)
    dups = sum(r["duplicates"] for r in reports)
    print(f"total: kills {kills} ({aimed} aimed), trials and models {units}, epochs {epochs}; duplicate rows {dups}; "
          f"lost epochs {lost}; disagreements {disagree}; runs left RUNNING {len(left_running)}")
    if bad or left_running:
        sys.exit(1)


if __name__ == "__main__":
    main()
