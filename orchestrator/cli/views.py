"""What the commands show: consoles, live progress of long work, tables, and the JSON documents
of `--json`, built from the record classes (``orchestrator.store``) and the outcomes of
``orchestrator.search``/``orchestrator.scale``. Nothing here decides anything.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from datetime import datetime

import click

from orchestrator.status import Status


def stderr_console():
    from rich.console import Console

    console = Console(stderr=True)
    return console if console.is_terminal else Console(stderr=True, width=200)


def stdout_console():
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped output: don't squeeze tables into 80 columns.
        console = Console(width=200)
    return console


def results_only_stdout():
    """While work runs, anything written to stdout goes to stderr: Ray prints raylet warnings
    and libraries print chatter to stdout, which would corrupt `--json` output and pipes.
    orch's own results are printed after this block."""
    import contextlib

    return contextlib.redirect_stdout(sys.stderr)


def echo_json(doc) -> None:
    click.echo(json.dumps(doc, indent=2, default=_json_default))


def _json_default(v):
    return v.isoformat() if isinstance(v, datetime) else str(v)


# --------------------------------------------------------------------------- records as JSON


def record_json(record, *, drop: tuple[str, ...] = ()) -> dict:
    """A stored record (a frozen dataclass) as a JSON object, every field but ``drop``."""
    return {k: v for k, v in asdict(record).items() if k not in drop}


def search_json(s, *, full: bool = False) -> dict:
    """A search: its record (config and summary only in full), its kind and best trial."""
    return {"kind": "search"} | record_json(s, drop=() if full else ("config", "summary")) | {
        "best": (s.summary or {}).get("best")}


def scale_json(sc, *, full: bool = False) -> dict:
    """A scale: its record (config, plan and summary only in full), its kind, the names of its
    models and its best finished model."""
    models = (sc.summary or {}).get("models", [])
    scored = [m for m in models if m.get("val_top1") is not None]
    best = max(scored, key=lambda m: m["val_top1"], default=None) if sc.kind == "scale" else None
    return {"kind": "scale", "name": f"from {sc.search_id}"} | record_json(
        sc, drop=() if full else ("config", "plan", "summary", "driver")) | {
        "models": [p["name"] for p in sc.plan], "best": best} | (
        {"verdicts": (sc.summary or {}).get("verdicts", []), "report": (sc.summary or {}).get("report", [])}
        if sc.kind == "ablation" else {})


def model_json(r) -> dict:
    """A model of a scale (a ScaleRunRecord), named and sized as `orch scale --json` names them."""
    return {"name": r.model} | record_json(r, drop=("scale_id", "model")) | {"params_m": round(r.params / 1e6, 3)}


# --------------------------------------------------------------------------- live progress


def connect_and_grow(err, address, home, gpus, wait_s):
    """Ray (``cluster.connect``), grown to the ``--gpus`` budget where its autoscaler can add
    nodes, the wait shown on stderr: one line when it starts (for logs), then a live line."""
    from orchestrator import cluster as cluster_mod
    from orchestrator.errors import about

    with err.status("starting Ray…") as status, about("--address"):
        info = cluster_mod.connect(address, home=home)

        def start(want, up):
            err.print(f"asking the cluster's autoscaler for {want:g} GPUs ({up:g} up now); waiting up to "
                      f"{wait_s:g} s (--wait-for-resources)", highlight=False)

        def wait(w):
            status.update(f"waiting for {w.want:g} GPUs: {w.up:g} up, {w.starting} nodes starting "
                          f"({_elapsed(w.elapsed_s)})")

        try:
            return cluster_mod.grow_for(info, gpus, wait_s=wait_s, on_start=start, on_wait=wait)
        except BaseException:
            cluster_mod.shutdown(info)
            raise


def _elapsed(s: float) -> str:
    m, s = divmod(int(s), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class LiveProgress:
    """Live view of long work on stderr: a table redrawn in place on a terminal; without one
    (CI, pipes) one line per change instead. Subclasses give ``render(items)`` and
    ``line(item) -> (key, signature, text)``."""

    def __init__(self):
        import threading

        self.console = stderr_console()
        self.live = None
        self._seen: dict[str, tuple] = {}
        self._lock = threading.Lock()

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def update(self, items) -> None:
        with self._lock:
            if self.live is not None:
                self.live.update(self.render(items))
                return
            for item in items:
                key, sig, text = self.line(item)
                if self._seen.get(key) != sig:
                    self._seen[key] = sig
                    self.console.print(text, highlight=False)


class SearchProgress(LiveProgress):
    """Trials running/finished and the best so far."""

    def __init__(self, total: int | None, epochs: int):
        super().__init__()
        self.total, self.epochs = total, epochs

    def update(self, state: dict) -> None:
        super().update(state["trials"])

    def line(self, t):
        top1 = t.last("val_top1")
        acc = f" val_top1={top1:.3f}" if top1 is not None else ""
        reuse = f" (reused {t.reused_from})" if t.reused_from else ""
        return t.trial_id, (t.status, t.epochs_done), (
            f"trial {t.trial_id} α={t.alpha:.3f} β={t.beta:.3f} γ={t.gamma:.3f} res={t.resolution} "
            f"epoch {t.epochs_done}/{self.epochs}{acc} {t.status}{reuse}")

    def render(self, trials):
        from rich.table import Table

        done = [t for t in trials if t.status != Status.RUNNING]
        running = [t for t in trials if t.status == Status.RUNNING]
        scored = [t for t in trials if t.last("val_top1") is not None]
        best = max(scored, key=lambda t: t.last("val_top1"), default=None)
        title = (f"{len(running)} running, {len(done)} ended" + (f" of {self.total}" if self.total else "")
                 + (f"; best so far {best.trial_id} val_top1={best.last('val_top1'):.3f}" if best else ""))
        table = Table(title=title, title_justify="left")
        for c in ("trial", "α", "β", "γ", "res", "GMACs", "×B0", "epoch", "val_top1", "status"):
            table.add_column(c)
        for t in trials[-14:]:
            top1 = t.last("val_top1")
            table.add_row(t.trial_id, f"{t.alpha:.3f}", f"{t.beta:.3f}", f"{t.gamma:.3f}", str(t.resolution),
                          f"{t.gmacs:.3f}", f"{t.flops_ratio:.2f}", f"{t.epochs_done}/{self.epochs}",
                          f"{top1:.3f}" if top1 is not None else "-",
                          t.status + (" (reused)" if t.reused_from else ""))
        return table


class ScaleProgress(LiveProgress):
    """One row per model: epoch, val top-1, status."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs

    def line(self, m):
        top1 = m.last("val_top1")
        acc = f" val_top1={top1:.3f}" if top1 is not None else ""
        note = " (finished earlier)" if m.earlier else (f": {m.error}" if m.error else "")
        return m.name, (m.status, m.epochs_done), (
            f"{m.name} φ={m.row['phi']:g} res={m.row['resolution']} batch={m.row['batch_size']} "
            f"epoch {m.epochs_done}/{self.epochs}{acc} {m.status}{note}")

    def render(self, models):
        from rich.table import Table

        running = sum(1 for m in models if m.status == Status.RUNNING)
        done = sum(1 for m in models if m.status == Status.FINISHED)
        table = Table(title=f"{running} training, {done} of {len(models)} finished", title_justify="left")
        for c in ("model", "φ", "res", "GMACs", "batch", "epoch", "val_top1", "status"):
            table.add_column(c)
        for m in models:
            top1 = m.last("val_top1")
            table.add_row(m.name, f"{m.row['phi']:g}", str(m.row["resolution"]), f"{m.row['gmacs']:.3f}",
                          str(m.row["batch_size"]), f"{m.epochs_done}/{self.epochs}",
                          f"{top1:.3f}" if top1 is not None else "-",
                          m.status + (" (earlier)" if m.earlier else ""))
        return table


# --------------------------------------------------------------------------- tables


def models_table(models: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c, j in (("model", "left"), ("φ", "right"), ("res", "right"), ("params (M)", "right"), ("GMACs", "right"),
                 ("batch", "right"), ("lr", "right"), ("val top-1", "right"), ("time (s)", "right"), ("status", "left")):
        table.add_column(c, justify=j)
    for m in models:
        table.add_row(m["name"], f"{m['phi']:g}", str(m["resolution"]), f"{m['params_m']:.2f}", f"{m['gmacs']:.3f}",
                      str(m["batch_size"]), f"{m['lr']:.4g}",
                      f"{m['val_top1']:.4f}" if m["val_top1"] is not None else "-",
                      f"{m['train_s']:.0f}" if m.get("train_s") else "-",
                      m["status"] + (" (earlier)" if m.get("done_before") else ""))
    return table


def runs_table(entries: list[dict]):
    """`orch runs list`: searches and scales, newest first."""
    from rich.table import Table

    table = Table()
    for c in ("id", "kind", "name", "status", "created", "best val_top1", "best α, β, γ / model"):
        table.add_column(c)
    for e in entries:
        b = e["best"] or {}
        if e["kind"] == "search":
            where = f"{b['alpha']:.3f}, {b['beta']:.3f}, {b['gamma']:.3f}" if b else "-"
        elif e["kind"] == "ablation":  # compound against each single arm, per target
            where = " | ".join(f"{r['target']:g}x: " + ", ".join(f"{c['verdict']} vs {arm}" for arm, c in
                                                                 r["compound_minus"].items())
                               for r in e.get("report", [])) or "-"
        else:
            where = f"{b['name']} of {'-'.join([e['models'][0], e['models'][-1]])}" if b else "-"
        table.add_row(e["id"], e["kind"], e["name"], e["status"], e["created_at"].isoformat()[:19],
                      f"{b['val_top1']:.4f}" if b else "-", where)
    return table


def print_search(out, s, trials) -> None:
    """`orch runs show <search>`: the search, its trials, its confirmation."""
    from rich.table import Table

    out.print(f"{s.id} ({s.name}) {s.status}, created {s.created_at.isoformat()[:19]}, MLflow run {s.mlflow_run_id}",
              highlight=False)
    if s.error:
        out.print(f"error: {s.error}", highlight=False)
    table = Table()
    for c in ("trial", "α", "β", "γ", "res", "×B0", "act M", "img/s", "epochs", "val_top1", "status"):
        table.add_column(c)
    for t in trials:
        notes = [f"reused {t.reused_from}"] if t.reused_from else []
        notes += ["paper point, off the surface"] if t.off_surface else []
        notes += [f"confirm, seed {t.seed}"] if t.phase == "confirm" else []
        table.add_row(t.trial_id + (" *" if t.trial_id == s.best_trial_id else ""), f"{t.alpha:.3f}", f"{t.beta:.3f}",
                      f"{t.gamma:.3f}", str(t.resolution), f"{t.flops_ratio:.2f}" if t.flops_ratio else "-",
                      f"{t.activations_m:.2f}" if t.activations_m is not None else "-",
                      f"{t.images_per_s:.0f}" if t.images_per_s is not None else "-",
                      str(t.epochs_done), f"{t.val_top1:.4f}" if t.val_top1 is not None else "-",
                      t.status + (f" ({'; '.join(notes)})" if notes else ""))
    out.print(table)
    if s.summary and s.summary.get("confirmation"):
        print_confirmation(out, s.summary["confirmation"])


def print_confirmation(out, conf: dict) -> None:
    """The confirmed networks, best mean first, and the verdict on the winner's margin."""
    from rich.table import Table

    table = Table(title="confirmation: the top networks again, fresh seeds, full budget")
    for c in ("trial", "α", "β", "γ", "search val_top1", "mean ± std", "seeds"):
        table.add_column(c)
    for c in conf["candidates"]:
        table.add_row(c["trial_id"], f"{c['alpha']:.3f}", f"{c['beta']:.3f}", f"{c['gamma']:.3f}",
                      f"{c['search_val_top1']:.4f}",
                      f"{c['mean']:.4f} ± {c['std']:.4f}" if c["mean"] is not None else "-",
                      ", ".join(str(x) for x in c["seeds"]) or "-")
    out.print(table)
    out.print(f"winner {conf['winner']}: {conf['verdict']}", highlight=False)


def print_search_outcome(out, outcome) -> None:
    """The end of `orch search`: counts, the confirmation, the winner and the next command."""
    s, best = outcome.summary, outcome.best
    out.print(f"search {outcome.search_id} {outcome.status}: {outcome.n_trials} trials, "
              f"{s['n_networks']} distinct networks ({s['n_reused']} reused), {s['wall_s']:.0f}s wall"
              + (f", efficiency {s['efficiency']}" if s["efficiency"] is not None else " (resumed)"),
              highlight=False)
    if s.get("confirmation"):
        print_confirmation(out, s["confirmation"])
    if best:
        note = "" if s["winner_within_tolerance"] else " (no trial was within --flops-tolerance; best overall)"
        mean = (f" confirmed {best['confirm_mean']:.4f} ± {best['confirm_std']:.4f} over {len(best['confirm_seeds'])} "
                f"seeds" if best.get("confirm_mean") is not None else "")
        out.print(f"winner {best['trial_id']}: α={best['alpha']:.4f} β={best['beta']:.4f} γ={best['gamma']:.4f} "
                  f"val_top1={best['val_top1']:.4f}{mean} FLOPs ×B0={best['flops_ratio']:.2f}{note}", highlight=False)
        out.print(f"next: orch scale --from-run {outcome.search_id}", highlight=False)


def print_scale(out, sc, models: list[dict]) -> None:
    """`orch runs show <scale>`: the scale, its models, its chart."""
    from orchestrator.chart import print_family

    c = sc.config
    what = f"{c.get('network', 'efficientnet-b0')}, {c.get('mode')}" if sc.kind == "scale" else \
        f"{c.get('network', 'efficientnet-b0')} ablation at {', '.join(f'{t:g}x' for t in c.get('targets', []))}"
    out.print(f"{sc.id} {sc.status}, from {sc.search_id} trial {sc.trial_id} (α={c.get('alpha'):.4f} "
              f"β={c.get('beta'):.4f} γ={c.get('gamma'):.4f}, {what}), created "
              f"{sc.created_at.isoformat()[:19]}, MLflow run {sc.mlflow_run_id}", highlight=False)
    if sc.error:
        out.print(f"error: {sc.error}", highlight=False)
    out.print(models_table(models, "models" if sc.kind == "scale" else "runs (arm × seed)"))
    if sc.kind == "ablation":
        from orchestrator.cli.ablate import report_table

        summary = sc.summary or {}
        if summary.get("report"):
            out.print(report_table(summary["report"], "compound against single-dimension scaling"))
        for line in summary.get("verdicts", []):
            out.print(line, highlight=False)
        return
    print_model_uris(out, models)
    print_family(sc.id, models, reference=c.get("mode") == "compound")


def print_registered(out, name: str, versions: list[dict]) -> None:
    """What `--register` / `orch register` did: each member's version and alias."""
    made = sum(v["created"] for v in versions)
    out.print(f"registered model {name}: " + ", ".join(f"{v['model']} v{v['version']} @{v['alias']}" for v in versions)
              + f" ({made} new, {len(versions) - made} already there); load one with "
              f"mlflow.pytorch.load_model('models:/{name}@{versions[-1]['alias']}')", highlight=False)


def print_model_uris(out, models: list[dict]) -> None:
    """Where each trained member's weights are, as MLflow models."""
    logged = [m for m in models if m.get("model_uri")]
    if logged:
        out.print("MLflow models (mlflow.pytorch.load_model(URI)):", highlight=False)
        for m in logged:
            out.print(f"  {m['name']}: {m['model_uri']}", highlight=False)


def print_dry_run(out, title: str, rows: list[dict], opts) -> None:
    """`orch scale --dry-run`: the plan with each model's batch and lr, and the batch rule."""
    from orchestrator.plan import render_table

    out.print(render_table(rows, title))
    out.print("per model: " + ", ".join(f"{r['name']} batch {r['batch_size']}×{r['workers']} lr {r['lr']:.4g}"
                                        for r in rows), highlight=False)
    mem = (f"against {opts.gpu_memory_gb:g} GB of GPU memory (80% of it, 6.8 bytes per activation)"
           if opts.gpu_memory_gb else "CPU jobs: no shrinking")
    out.print(f"batch rule {opts.batch_rule}" + (f", {mem}" if opts.batch_rule == "fit" else ""), highlight=False)
    out.print("dry run: nothing launched", highlight=False)


def print_scale_outcome(out, outcome, models: list[dict], url: str, *, compound: bool) -> None:
    """The end of `orch scale`: the family's table and chart, and where to look next."""
    from orchestrator.chart import print_family

    s = outcome.summary
    out.print(models_table(models, f"scale {outcome.scale_id} {outcome.status}: {len(s['trained_now'])} trained "
                                   f"now, {len(s['done_before'])} earlier, {s['wall_s']:.0f}s wall"))
    print_model_uris(out, models)
    print_family(outcome.scale_id, models, reference=compound)
    out.print(f"next: orch ui --scale {outcome.scale_id}   then open {url}\n"
              f"  there: the family's runs with val_top1, GMACs and parameters (add &compareRunsMode=CHART: "
              f"val_top1 against GMACs); the parent run {outcome.scale_id} holds family.png under Artifacts",
              highlight=False)
