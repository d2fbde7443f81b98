"""How often the saved driver state of a running search would restore wrong: Tune's own copy in the
storage against orch's copy (orchestrator/raytune/state.py).

    python benchmarks/statecopy.py              # an 8-trial × 2-epoch search, read every few ms
    python benchmarks/statecopy.py --quick      # 2 trials × 1 epoch (what CI runs)

Runs one search (local Ray, CPU, a fresh state folder) and, while it runs, reads both copies over
and over, as a `--resume` after a kill at that instant would. A read is *torn* when a file is
empty or cut off, or when the files disagree: the trial list (experiment_state) against the
search generator's count of trials created (search_gen_state) or against the trials the Optuna
searcher knows (searcher-state). Tune restores a torn read into a search that runs fewer trials
than asked, or not at all. Prints reads and torn reads for each copy, last the line for orch's.
Exits 1 if orch's copy was ever torn.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def newest(files: dict[str, bytes], kind: str) -> bytes:
    names = sorted(n for n in files if n.startswith(kind + "-"))
    if not names:
        raise ValueError(f"no {kind} file")
    return files[names[-1]]


def torn(files: dict[str, bytes]) -> str | None:
    """Why restoring from these state files would go wrong; None if they agree."""
    try:
        trials = [json.loads(t[0])["trial_id"] for t in json.loads(newest(files, "experiment_state"))["trial_data"]]
        counter = pickle.loads(newest(files, "search_gen_state"))["counter"]
        known = set(pickle.loads(newest(files, "searcher-state"))["_ot_trials"])
    except Exception as e:  # noqa: BLE001 - an empty or cut-off file
        return f"unreadable ({type(e).__name__})"
    if counter != len(trials):
        return f"{len(trials)} trials listed, {counter} created"
    if known != set(trials):
        return f"{len(trials)} trials listed, {len(known)} known to the searcher"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 trials of 1 epoch (CI)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    if args.quick:
        args.trials, args.epochs = 2, 1

    from orchestrator.raytune import state as tunestate

    counts = {"Tune's": [0, 0, {}], "orch's": [0, 0, {}]}  # reads, torn, why -> how often
    with tempfile.TemporaryDirectory(prefix="orch-statecopy-") as tmp:
        home = Path(tmp)
        env = dict(os.environ, ORCH_HOME=str(home), MLFLOW_DISABLE_TELEMETRY="true")
        env.pop("RAY_ADDRESS", None)
        t0 = time.monotonic()
        p = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "search", "--confirm-top", "0", "--gpus", "0", "--trials", str(args.trials),
             "--epochs", str(args.epochs), "--grace-epochs", str(args.epochs), "--synthetic-size", "128", "64",
             "--batch-size", "32", "--json"],
            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while p.poll() is None:
            for folder in (home / "ray").glob("search-*/") if (home / "ray").exists() else []:
                for name, read in (("Tune's", lambda: (tunestate.state_files(folder) or (None, None))[1]),
                                   ("orch's", lambda: (tunestate.read(str(folder)) or (None, None))[1])):
                    try:
                        files = read()
                    except Exception as e:  # noqa: BLE001 - orch's copy unreadable: torn too
                        files, why = {}, f"unreadable ({type(e).__name__})"
                    else:
                        if files is None:
                            continue
                        why = torn(files)
                    c = counts[name]
                    c[0] += 1
                    if why:
                        c[1] += 1
                        c[2][why] = c[2].get(why, 0) + 1
            time.sleep(0.002)
        out, err = p.communicate()
        if p.returncode != 0:
            sys.exit(f"the search failed ({p.returncode}):\n{err[-3000:]}")
        wall = time.monotonic() - t0

    print(f"statecopy: {args.trials} trials × {args.epochs} epochs, {wall:.0f} s, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d')}" + (" (quick)" if args.quick else ""))
    for name, (reads, bad, why) in counts.items():
        detail = "; ".join(f"{n}× {w}" for w, n in sorted(why.items(), key=lambda kv: -kv[1]))
        print(f"{name} copy: {reads} reads, {bad} torn" + (f" ({detail})" if detail else ""))
    reads, bad, _ = counts["orch's"]
    if reads == 0 or bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
