"""Choosing a search's winner and saying how sure it is: the confirmation candidates (the top
distinct networks of the search phase), their fresh seeds, the confirmation's verdict (the best
mean against the noise), the winner rule (measured FLOPs within tolerance), and the summaries a
search ends with (the one-line failure reason, trials.csv).
"""

from __future__ import annotations

import csv
import io
import math

from orchestrator import scaling
from orchestrator.space import FLOPS_TOLERANCE
from orchestrator.status import Status


def explain_failure(error: str | None, trials, storage_path) -> str:
    """The one line a failed search ends with: the cause users can act on, when the trials' own
    errors name it (a full disk surfaces in Tune as whatever it broke next)."""
    failed = [t for t in trials if t.status == Status.FAILED and t.error]
    texts = [error or ""] + [t.error for t in failed]
    if any("No space left on device" in x or "Errno 28" in x for x in texts):
        return (f"the disk is full (No space left on device) writing checkpoints under {storage_path}; "
                f"free space there or pass --storage with room")
    if error:
        return error
    if failed and len(failed) == len(trials):
        return f"no trial finished (trial {failed[0].trial_id}: {failed[0].error.splitlines()[0][:300]})"
    return "no trial finished"


def confirm_seeds(opts: SearchOptions) -> list[int]:
    """Fresh seeds for the confirmation runs: none of them is the search's own."""
    return [opts.seed + 1000 * (i + 1) for i in range(opts.confirm_seeds)]


def confirm_candidates(trials, opts: SearchOptions) -> list[dict]:
    """The top ``confirm_top`` distinct networks of the search phase, from the pool the winner
    rule draws on (trials that ran every epoch, within the FLOPs tolerance), best first."""
    done = [t for t in trials if t.phase == "search" and Status(t.status).trained
            and t.val_top1 is not None and not t.reused_from]
    full = [t for t in done if t.status == Status.FINISHED] or done
    ok = [t for t in full if abs(t.flops_ratio - scaling.TARGET_FLOPS_FACTOR) <= opts.flops_tolerance * 2] or full
    best: dict[str, object] = {}
    for t in sorted(ok, key=lambda t: (-t.val_top1, t.flops_ratio, t.trial_id)):
        best.setdefault(t.network_key, t)
    return [{"trial_id": t.trial_id, "network_key": t.network_key, "alpha": t.alpha, "beta": t.beta,
             "gamma": t.gamma, "search_val_top1": t.val_top1} for t in list(best.values())[:opts.confirm_top]]


def confirmation(trials, picked: list[dict]) -> dict:
    """Each confirmed network's final val top-1 over its fresh seeds (mean, sample std), best
    mean first, and whether the best is ahead of the second by more than the noise: the margin
    against twice the standard error of the difference of the two means (about 95%)."""
    import statistics

    rows = []
    for c in picked:
        runs = sorted((t for t in trials if t.phase == "confirm" and t.network_key == c["network_key"]
                       and t.status == Status.FINISHED and t.val_top1 is not None), key=lambda t: t.seed or 0)
        values = [t.val_top1 for t in runs]
        rows.append(c | {"seeds": [t.seed for t in runs], "values": values,
                         "mean": statistics.fmean(values) if values else None,
                         "std": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None)})
    rows.sort(key=lambda r: (r["mean"] is None, -(r["mean"] or 0.0), -r["search_val_top1"]))
    done = [r for r in rows if r["mean"] is not None]
    out = {"candidates": rows, "winner": done[0]["trial_id"] if done else None, "margin": None, "noise": None,
           "ahead": None}
    if len(done) >= 2:
        a, b = done[0], done[1]
        out["margin"] = a["mean"] - b["mean"]
        if len(a["values"]) > 1 and len(b["values"]) > 1:
            out["noise"] = 2 * math.sqrt(a["std"] ** 2 / len(a["values"]) + b["std"] ** 2 / len(b["values"]))
            out["ahead"] = out["margin"] > out["noise"]
    if out["ahead"] is None:
        out["verdict"] = "no noise estimate (fewer than 2 seeds or 2 networks)"
    else:
        out["verdict"] = (f"ahead of the second by {out['margin']:.4f}, more than the noise ({out['noise']:.4f})"
                          if out["ahead"] else
                          f"ahead of the second by {out['margin']:.4f}, within the noise ({out['noise']:.4f}): "
                          f"a tie at this budget")
    return out


def pick_winner(trials, *, target: float = scaling.TARGET_FLOPS_FACTOR, flops_tolerance: float = FLOPS_TOLERANCE):
    """The best val top-1 among trials that ran every epoch and whose *measured* FLOPs ratio to
    B0 is within ``flops_tolerance`` (relative) of the target; stopped trials only if none
    finished. Returns (trial, within_tolerance) or (None, False)."""
    done = [t for t in trials if Status(t.status).trained and t.val_top1 is not None
            and getattr(t, "phase", "search") == "search"]
    if not done:
        return None, False
    full = [t for t in done if t.status == Status.FINISHED] or done
    ok = [t for t in full if abs(t.flops_ratio - target) <= flops_tolerance * target]
    pool = ok or full
    best = max(pool, key=lambda t: (t.val_top1, -t.flops_ratio))
    return best, bool(ok)


def trials_csv(trials) -> str:
    cols = ["trial_id", "phase", "seed", "alpha", "beta", "gamma", "resolution", "network_key", "params", "gmacs",
            "flops_ratio", "activations_m", "images_per_s", "peak_mem_mb", "off_surface", "status", "epochs_done",
            "val_top1", "best_val_top1", "train_loss", "train_s", "reused_from", "error"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for t in trials:
        w.writerow([getattr(t, c) for c in cols])
    return buf.getvalue()


def summarise(trials, *, confirm: list | None, interrupted: bool, flops_tolerance: float) -> tuple[object, dict]:
    """A search's winner and the summary of its trials: (winner or None, summary). ``confirm``:
    the confirmed candidates when the search reached its confirmation phase; then the winner is
    the best confirmed mean (unless the search was interrupted), else the winner rule's."""
    best, within = pick_winner(trials, flops_tolerance=flops_tolerance)
    confirmed = confirmation(trials, confirm) if confirm is not None else None
    if confirmed and confirmed["winner"] and not interrupted:
        best = next(t for t in trials if t.trial_id == confirmed["winner"])
    summary = {
        "train_s": round(sum(t.train_s or 0.0 for t in trials), 3),
        "n_trials": len(trials),
        "n_networks": len({t.network_key for t in trials}),
        "n_reused": sum(1 for t in trials if t.reused_from),
        "by_status": {s: sum(1 for t in trials if t.status == s) for s in sorted({t.status for t in trials})},
        "winner_within_tolerance": within,
        "confirmation": confirmed,
    }
    if best is not None:
        summary["best"] = {"trial_id": best.trial_id, "alpha": best.alpha, "beta": best.beta, "gamma": best.gamma,
                           "val_top1": best.val_top1, "flops_ratio": best.flops_ratio,
                           "resolution": best.resolution, "network_key": best.network_key,
                           "activations_m": best.activations_m, "images_per_s": best.images_per_s}
        if confirmed and confirmed["winner"] == best.trial_id:
            top = confirmed["candidates"][0]
            summary["best"] |= {"confirm_mean": top["mean"], "confirm_std": top["std"], "confirm_seeds": top["seeds"]}
    return best, summary
