"""The only module that talks to MLflow.

A search is a parent run with one child run per trial; everything is written from the driver
through ``MlflowClient`` (no global fluent state), in batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from orchestrator.errors import OrchError
from orchestrator.status import MLFLOW_STATUS

#: How long an unreachable tracking server may keep `orch` waiting before it gives up.
CONNECT_TIMEOUT_S = 10.0
#: The per-epoch metrics of every trial's and model's run (the store keeps them in each row's history).
EPOCH_METRICS = ("val_top1", "val_loss", "train_loss", "epoch_s", "images_per_s", "peak_mem_mb", "compile_s", "compiled",
                 "ema_val_top1", "ema_val_loss", "data_wait_s", "gpu_decoded")


class TrackingError(OrchError):
    """The tracking store cannot be used; the message says why and what to do."""

    usage, param = True, "--tracking-uri"


def mask_uri(uri: str) -> str:
    p = urlparse(uri)
    if p.password:
        netloc = p.netloc.replace(f":{p.password}@", ":***@")
        return p._replace(netloc=netloc).geturl()
    return uri


def check_reachable(uri: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast (bounded wait) when an http(s) tracking server does not answer."""
    p = urlparse(uri)
    if p.scheme not in ("http", "https"):
        return
    import urllib.error
    import urllib.request

    url = f"{p.scheme}://{p.netloc}/health"
    headers = {}  # the credentials MLflow's client would send
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        import base64

        pair = f"{os.environ['MLFLOW_TRACKING_USERNAME']}:{os.environ.get('MLFLOW_TRACKING_PASSWORD', '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=max(0.5, min(3.0, deadline - time.monotonic()))) as r:
                if r.status == 200:
                    return
                last = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):  # MLflow behind auth: /health needs credentials too
                raise TrackingError(
                    f"{mask_uri(uri)} answered HTTP {e.code}: it needs credentials; set MLFLOW_TRACKING_TOKEN "
                    f"or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
            if 400 <= e.code < 500:  # something answers, and it is not an MLflow server
                raise TrackingError(
                    f"{mask_uri(uri)} answered HTTP {e.code} to {p.scheme}://{p.netloc}/health: not an MLflow "
                    f"tracking server; check --tracking-uri") from None
            last = f"HTTP {e.code}"
        except (urllib.error.URLError, socket.timeout, ConnectionError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.5)
    raise TrackingError(
        f"the MLflow tracking server {mask_uri(uri)} did not answer within {timeout:g}s ({last}); "
        f"start it, or drop --tracking-uri to use the local store"
    )


def _init_lock(uri: str):
    """Two `orch` processes opening a new local SQLite tracking store at once would both run
    MLflow's schema creation and create the experiment; they take turns instead."""
    import contextlib

    from orchestrator.home import file_lock

    parsed = urlparse(uri)
    if parsed.scheme == "sqlite" and uri.startswith("sqlite:///") and ":memory:" not in uri:
        path = Path(uri[len("sqlite:///"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return file_lock(f"{path}.orch-lock")
    return contextlib.nullcontext()


class Tracker:
    def __init__(self, uri: str, experiment: str, artifact_root: str | os.PathLike | None = None):
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        # Bounded waits against a remote server instead of MLflow's long default retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        # Against a tracking server, MlflowClient.set_terminated writes "View run ... at" lines to
        # stdout, which would corrupt `--json` output; orch prints its own links.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        check_reachable(uri)
        import logging

        import mlflow.tracking  # noqa: F401

        # After the import (mlflow sets its own level on import): no migration chatter on stderr.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)

        self.uri = uri
        with _init_lock(uri):
            self.experiment_id = self._experiment(experiment, artifact_root)
        self.experiment = experiment

    def _experiment(self, experiment: str, artifact_root) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = self.uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # the registry lives beside the runs
        try:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                # A tracking server stores (or proxies) artifacts itself; a local store keeps
                # them in the state folder rather than ./mlruns of the current directory.
                remote = urlparse(uri).scheme in ("http", "https", "databricks")
                location = Path(artifact_root).resolve().as_uri() if artifact_root and not remote else None
                exp_id = self.client.create_experiment(
                    experiment,
                    artifact_location=location,
                    # Open the experiment on the training-runs view, not the GenAI overview.
                    tags={"mlflow.experimentKind": "custom_model_development"},
                )
            else:
                exp_id = exp.experiment_id
        except MlflowException as e:
            if e.error_code == "RESOURCE_ALREADY_EXISTS":  # another orch created it meanwhile (a server)
                return self.client.get_experiment_by_name(experiment).experiment_id
            raise TrackingError(f"MLflow at {mask_uri(uri)}: {str(e).splitlines()[0]}") from None
        return exp_id

    def save_view(self, key: str, view: dict) -> None:
        """A saved view of the experiment in the MLflow UI (``family_view``), written once: a view
        the user changed in the UI under the same key is not overwritten."""
        tag = f"mlflow.sharedViewState.{key}"
        try:
            if tag in self.client.get_experiment(self.experiment_id).tags:
                return
            now = int(time.time() * 1000)
            self.client.set_experiment_tag(self.experiment_id, tag,
                                           json.dumps({**view, "createdAt": now, "updatedAt": now}))
        except Exception as e:  # a view is a convenience: never a reason to fail a scale
            print(f"orch: warning: could not save the MLflow UI view {key}: {str(e).splitlines()[0]}",
                  file=sys.stderr, flush=True)

    def find_runs(self, tags: dict, *, running_only: bool = False) -> list[str]:
        """Ids of the runs carrying all these tags (orch's own ids: letters, digits, . _ : -)."""
        where = [f"tags.\"{k}\" = '{v}'" for k, v in tags.items()]
        if running_only:
            where.append("attributes.status = 'RUNNING'")
        runs = self.client.search_runs([self.experiment_id], filter_string=" and ".join(where), max_results=1000)
        return [r.info.run_id for r in runs]

    def start_run(self, name: str, *, parent_id: str | None = None, params: dict | None = None,
                  tags: dict | None = None, adopt: dict | None = None) -> str:
        """A new run; with ``adopt`` (identifying tags), the run an earlier (killed) driver made
        with those tags, if any, continues instead: a driver can die between creating a run and
        recording its id."""
        from mlflow.entities import Param

        if adopt:
            found = self.find_runs(adopt)
            if found:
                self.reopen(found[0])
                return found[0]
        all_tags = dict(tags or {})
        all_tags["mlflow.runName"] = name
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        run_id = run.info.run_id
        if params:
            self.client.log_batch(run_id, params=[Param(k, _param_str(v)) for k, v in params.items()])
        return run_id

    def log(self, run_id: str, metrics: list[tuple[str, float, int]] = (), params: dict | None = None,
            tags: dict | None = None) -> None:
        """One batched write: metrics as (key, value, step); non-finite values are dropped."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(step)) for k, v, step in metrics if v is not None and math.isfinite(float(v))]
        ps = [Param(k, _param_str(v)) for k, v in (params or {}).items()]
        ts = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, max(len(ms), 1), 900):  # MLflow caps a batch at 1000 metrics
            chunk = ms[i:i + 900]
            if chunk or (i == 0 and (ps or ts)):
                self.client.log_batch(run_id, metrics=chunk, params=ps if i == 0 else [], tags=ts if i == 0 else [])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_artifact(self, run_id: str, path: str | os.PathLike) -> None:
        self.client.log_artifact(run_id, str(path))

    def reopen(self, run_id: str) -> None:
        """Mark an ended run RUNNING again: a re-run continues the same run, not a second one."""
        self.client.update_run(run_id, status="RUNNING")

    def end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=MLFLOW_STATUS.get(status, status))

    def log_torch_model(self, run_id: str, model, *, example, tags: dict, code_dir: str | os.PathLike) -> str:
        """``model`` as an MLflow model of the PyTorch flavour, logged to run ``run_id`` (MLflow 3
        records it as a model of its own, linked to the run), with a signature and an input
        example from ``example``, ``tags``, and ``code_dir`` (orch's ``workers`` package, the
        network's code) shipped with it, so a process with torch and mlflow alone loads it.
        Returns its URI (``models:/<model id>``)."""
        import mlflow
        import numpy as np
        import torch

        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"]
        quiet = logging.getLogger("mlflow.pytorch")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its warning about pickle on every model: orch loads only its own
        try:
            with self._global(), mlflow.start_run(run_id=run_id):  # ending it is the caller's next step
                # "pickle": load_model gives back the nn.Module (MLflow 3.17's default, a
                # torch.export program, is fixed to the example's batch size and is not a module)
                info = mlflow.pytorch.log_model(model, name="model", input_example=example,
                                                code_paths=[str(code_dir)], pip_requirements=requirements, tags=tags,
                                                serialization_format="pickle")
        finally:
            quiet.setLevel(level)
        return info.model_uri

    def model_tags(self, model_uri: str) -> dict:
        """The tags of a logged model (``models:/<model id>``)."""
        return dict(self.client.get_logged_model(model_uri.removeprefix("models:/")).tags)

    def load_torch_model(self, model_uri: str):
        """The nn.Module of a model ``log_torch_model`` logged."""
        import mlflow

        with self._global():
            return mlflow.pytorch.load_model(model_uri, map_location="cpu")

    @contextlib.contextmanager
    def _global(self):
        """This store as MLflow's global tracking URI for a while: its fluent API and its model
        registry resolve ``models:/`` URIs through it. Setting it also sets MLFLOW_TRACKING_URI
        in this process's environment (inherited by every later subprocess): both are put back."""
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        env = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            with _use_tracking_uri(self.uri):
                yield
        finally:
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env

    def register(self, name: str, versions: list[dict], *, tags: dict | None = None) -> list[dict]:
        """Each of ``versions`` ({alias, model_uri, run_id, key, tags}) as a version of the
        registered model ``name`` under its alias. A version whose ``key`` tags match an existing
        version's (the same member of the same scale) is that version again, not a new one.
        Returns [{alias, version, created}]."""
        from mlflow.exceptions import MlflowException

        try:
            with self._global():
                return self._register(name, versions, tags)
        except MlflowException as e:
            raise TrackingError(f"registering model {name!r} failed: {str(e).splitlines()[0]}",
                                param="NAME", usage=e.error_code == "INVALID_PARAMETER_VALUE") from None

    def _register(self, name: str, versions: list[dict], tags: dict | None) -> list[dict]:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            self.client.create_registered_model(name, tags=tags)
        existing = list(self.client.search_model_versions(f"name = '{name}'"))
        out = []
        for v in versions:
            same = [x for x in existing if all(x.tags.get(k) == str(val) for k, val in v["key"].items())]
            mv = same[0] if same else self.client.create_model_version(
                name, source=v["model_uri"], run_id=v["run_id"], tags=v["key"] | v["tags"],
                model_id=v["model_uri"].removeprefix("models:/"))
            self.client.set_registered_model_alias(name, v["alias"], mv.version)
            out.append({"alias": v["alias"], "version": int(mv.version), "created": not same})
        return out

    def runs(self, tags: dict) -> list["RunView"]:
        """The runs carrying all these tags, with their status and tags."""
        where = " and ".join(f"tags.\"{k}\" = '{v}'" for k, v in tags.items())
        found = self.client.search_runs([self.experiment_id], filter_string=where, max_results=1000)
        return [RunView(r.info.run_id, r.info.status, dict(r.data.tags)) for r in found]

    def view(self, run_id: str) -> "RunView | None":
        from mlflow.exceptions import MlflowException

        try:
            r = self.client.get_run(run_id)
        except MlflowException:
            return None
        return RunView(r.info.run_id, r.info.status, dict(r.data.tags))

    def metric_steps(self, run_id: str, key: str) -> dict[int, float]:
        """``key``'s value at each step, the last one logged where a step was logged twice (an
        epoch trained again after a driver was killed between its report and its checkpoint)."""
        out: dict[int, tuple[int, float]] = {}
        for m in self.client.get_metric_history(run_id, key):
            if m.step not in out or m.timestamp >= out[m.step][0]:
                out[m.step] = (m.timestamp, m.value)
        return {step: v for step, (_, v) in out.items()}

    def settle(self, run_id: str, status: str, history: list[dict], keys: tuple[str, ...],
               summary: list[tuple[str, float, int]] = (), tags: dict | None = None) -> None:
        """End a run the way its record says it ended, after a driver died before it could: the
        epochs of ``history`` that MLflow lacks (or holds with another value) are logged, then
        the summary and tags, then the end status. Idempotent."""
        have = self.metric_steps(run_id, keys[0]) if history else {}
        missing = [h for h in history if not same_value(have.get(int(h["epoch"])), h.get(keys[0]))]
        self.log(run_id, [(k, h[k], int(h["epoch"])) for h in missing for k in keys if k in h] + list(summary),
                 tags=tags)
        self.end(run_id, status)


class RunView:
    """A run as orch reads it back: id, MLflow status, tags."""

    __slots__ = ("run_id", "status", "tags")

    def __init__(self, run_id: str, status: str, tags: dict):
        self.run_id, self.status, self.tags = run_id, status, tags

    @property
    def parent(self) -> str | None:
        return self.tags.get("mlflow.parentRunId")


def same_value(a, b) -> bool:
    """Two metric values as MLflow and the store hold them (both doubles; None: absent)."""
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)


def _param_str(v) -> str:
    s = f"{v:.6g}" if isinstance(v, float) else str(v)
    return s[:6000]


#: The family view: columns and charts a person comparing B0..Bk wants first.
VIEW_METRICS = ("val_top1", "ema_val_top1", "gmacs", "params_m")
VIEW_PARAMS = ("phi", "resolution")


def family_view(scale_id: str) -> tuple[str, dict]:
    """(key, saved view) of a scale's family in the MLflow UI: its members only (the scale's
    model runs), B0 first (by GMACs), with val top-1, its averaged-weights twin, GMACs,
    parameters, φ and resolution as columns, and charts of val top-1 against GMACs and per
    member. MLflow 3.17's UI reads it from the experiment tag ``mlflow.sharedViewState.<key>``
    when the URL names the key (``viewStateShareKey``) and lists it among the experiment's views.
    The fields are the ones that UI restores from a shared view (others are dropped)."""
    section = "orch-family"

    def chart(uuid: str, kind: str, **fields) -> dict:
        return {"uuid": uuid, "type": kind, "runsCountToCompare": 100, "metricSectionId": section,
                "deleted": False, "isGenerated": False, **fields}

    state = {
        "searchFilter": f"tags.`orch.scale_id` = '{scale_id}' and tags.`orch.kind` = 'model'",
        "orderByKey": "metrics.`gmacs`", "orderByAsc": True,
        "selectedColumns": [f"metrics.`{m}`" for m in VIEW_METRICS] + [f"params.`{p}`" for p in VIEW_PARAMS],
        "compareRunSections": [{"uuid": section, "name": "Family: accuracy against GMACs", "display": True,
                                "isReordered": False, "deleted": False, "isGenerated": False}],
        "compareRunCharts": [
            chart("orch-top1-gmacs", "SCATTER", xaxis={"key": "gmacs", "type": "METRIC"},
                  yaxis={"key": "val_top1", "type": "METRIC"}),
            chart("orch-top1", "BAR", metricKey="val_top1", displayName="val_top1"),
            chart("orch-params", "BAR", metricKey="params_m", displayName="params_m"),
        ],
        "isAccordionReordered": False,
    }
    return scale_id, {"name": f"orch family {scale_id}", "state": json.dumps(state, separators=(",", ":"))}


def family_urls(base: str, experiment_id: str, view_key: str | None) -> tuple[str, str]:
    """(table, charts) URLs of the experiment's model-training view in MLflow 3.17's UI, with
    the saved view ``view_key`` (a scale's family) when given. ``workflowType=machine_learning``
    is what moves that UI off its GenAI overview (the experiment-kind tag does not)."""
    query = "workflowType=machine_learning" + (f"&viewStateShareKey={view_key}" if view_key else "")
    table = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{query}"
    return table, table + "&compareRunsMode=CHART"


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` resolves to is a loopback one."""
    import ipaddress

    try:
        return all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback
                   for info in socket.getaddrinfo(host.strip("[]"), None))
    except (OSError, ValueError):
        return False


class UIServer:
    """The MLflow UI (``mlflow server``) on a local tracking store, as a context manager: it
    starts the process, waits until the UI answers (``base`` is its URL) and stops it at exit.
    Failures to start are OrchErrors that say why (a taken port at once, before MLflow's ~20 s
    start)."""

    START_TIMEOUT_S = 90
    STOP_TIMEOUT_S = 10

    def __init__(self, uri: str, artifact_root: Path, host: str, port: int):
        self.uri, self.artifact_root, self.host, self.port = uri, artifact_root, host, port
        self.base = f"http://{host}:{port}"
        self.proc = self._log = None

    def __enter__(self) -> "UIServer":
        import subprocess
        import sys
        import tempfile

        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as e:
                raise OrchError(f"the MLflow UI did not start on {self.base}: {e.strerror or e}; "
                                f"if the port is taken, pick another with --port") from None
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.uri,
               "--default-artifact-root", Path(self.artifact_root).resolve().as_uri(),
               "--host", self.host, "--port", str(self.port), "--workers", "1"]
        self._log = tempfile.TemporaryFile(mode="w+")
        # Its own process group: MLflow's server runs uvicorn and job-runner children, which
        # stop with it only when the whole group is signalled (see __exit__).
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        try:
            self._wait_up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_up(self) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:  # it exited: say why (the line that tells)
                self._log.seek(0)
                lines = [ln.strip() for ln in self._log.read().splitlines() if ln.strip()]
                why = next((ln for ln in reversed(lines) if "address already in use" in ln.lower()),
                           lines[-1] if lines else "")
                raise OrchError(f"the MLflow UI did not start on {self.base}: {why[:300]}; "
                                f"if the port is taken, pick another with --port")
            try:
                check_reachable(self.base, timeout=1)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise OrchError(f"the MLflow UI did not answer on {self.base} within "
                                    f"{self.START_TIMEOUT_S}s; see --port") from None

    def wait(self) -> None:
        """Until the server ends or Ctrl-C (KeyboardInterrupt), never missing the latter."""
        from orchestrator.ctrlc import CtrlC

        with CtrlC() as ctrl_c:
            ctrl_c.wait(self.proc)

    def __exit__(self, *exc) -> None:
        """Stop the server and every process it started: SIGTERM to its group, SIGKILL to what
        is left after STOP_TIMEOUT_S (measured: `mlflow server` alone ignored SIGTERM for 15 s
        and left its uvicorn and job-runner children running)."""
        import signal
        import subprocess

        if self.proc is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    break
                try:
                    self.proc.wait(timeout=self.STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    continue
                if not _group_alive(self.proc.pid, self.STOP_TIMEOUT_S):
                    break
        if self._log is not None:
            self._log.close()


def _group_alive(pgid: int, within: float) -> bool:
    """Whether processes of group ``pgid`` are still running after up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
