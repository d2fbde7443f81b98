"""Prepared datasets on S3 (moto's S3 server on 127.0.0.1, started and stopped here) and on
network mounts: each node's checked copy, its size cap, and a search and a scale reading one."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from orchestrator import datasource
from orchestrator.cli import main
from orchestrator.prepare import open_source, prepare
from workers import prepared as fmt
from tests.conftest import _free_port
from workers.datasets import DatasetError


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint (moto's server) on 127.0.0.1; yields its URL, the environment that reaches
    it, and an s3fs filesystem on it."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL"]})
        fs.mkdir("orch-data")
        yield env, fs
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _noisy(rng, colour) -> bytes:
    arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _dataset(root: Path, seed: int, per_class: int = 12) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class // 2)):
        for cls, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            (root / "src" / split / cls).mkdir(parents=True)
            for i in range(n):
                (root / "src" / split / cls / f"{i}.jpg").write_bytes(_noisy(rng, colour))
    prepare(open_source(f"imagefolder:{root / 'src'}"), root / "prep", workers=1, shard_mb=0.005)
    return root / "prep"


@pytest.fixture(scope="module")
def uploaded(s3, tmp_path_factory):
    """Two prepared datasets uploaded to the bucket: (URL, local folder) each."""
    _, fs = s3
    out = []
    for k in range(2):
        local = _dataset(tmp_path_factory.mktemp(f"ds{k}"), seed=k)
        fs.put(str(local), f"orch-data/ds{k}", recursive=True)
        out.append((f"s3://orch-data/ds{k}", local))
    return out


@pytest.fixture
def shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCH_SHARD_CACHE", str(tmp_path / "shards"))
    return tmp_path / "shards"


def test_an_s3_dataset_is_checked_and_copied_once_per_node(s3, uploaded, shard_cache):
    _, fs = s3
    url, local = uploaded[0]
    datasource.check(f"prepared:{url}")
    assert datasource.num_classes(f"prepared:{url}") == 2
    lines = []
    with datasource.in_use(f"prepared:{url}", log=lines.append) as spec:
        copy = Path(spec.removeprefix("prepared:"))
        assert copy.parent == shard_cache and (copy / fmt.MANIFEST).read_bytes() == (local / fmt.MANIFEST).read_bytes()
        manifest = fmt.read_manifest(copy)
        assert len(manifest["splits"]["train"]["shards"]) > 1
        for shard in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
            assert fmt.sha256_of(copy / shard["data"]) == shard["sha256"]
        assert not list(copy.glob("*.tmp*"))
    assert lines and "copying" in lines[0]
    # the node has its copy: the bucket is not read again (a shard deleted there does not matter)
    first = manifest["splits"]["train"]["shards"][0]["data"]
    fs.rm(f"orch-data/ds0/{first}")
    lines.clear()
    with datasource.in_use(f"prepared:{url}", log=lines.append) as again:
        assert again == spec and not lines
    fs.put(str(local / first), f"orch-data/ds0/{first}")


def test_a_damaged_or_incomplete_upload_is_one_line_and_leaves_no_copy(s3, uploaded, shard_cache, tmp_path):
    _, fs = s3
    _, local = uploaded[0]
    shutil.copytree(local, tmp_path / "bad")
    shard = sorted((tmp_path / "bad").glob("train-*.jpgs"))[0]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    fs.put(str(tmp_path / "bad"), "orch-data/bad", recursive=True)
    with pytest.raises(DatasetError, match=rf"{shard.name} does not match its checksum in the manifest"):
        with datasource.in_use("prepared:s3://orch-data/bad"):
            pass
    (copy,) = [p for p in shard_cache.iterdir() if p.is_dir()]
    assert not (copy / fmt.MANIFEST).exists() and not list(copy.glob("*.tmp*")) and not (copy / shard.name).exists()
    # the bucket fixed, the next use copies what is missing and completes the copy
    fs.put(str(local / shard.name), f"orch-data/bad/{shard.name}")
    with datasource.in_use("prepared:s3://orch-data/bad") as spec:
        assert spec == f"prepared:{copy}" and (copy / fmt.MANIFEST).exists()
    fs.rm(f"orch-data/bad/{shard.name}")  # an upload that stopped half way, on a node with no copy yet
    shutil.rmtree(copy)
    with pytest.raises(DatasetError, match="is missing: the dataset at s3://orch-data/bad is incomplete"):
        with datasource.in_use("prepared:s3://orch-data/bad"):
            pass
    for spec, needle in (("prepared:s3://orch-data/nothing", "has no manifest.json"),
                         ("prepared:s3://no-such-bucket/x", "has no manifest.json")):
        res = CliRunner().invoke(main, ["search", "--dataset", spec, "--gpus", "0"])
        assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output


def test_the_cache_stays_under_its_cap_and_never_deletes_a_copy_in_use(s3, uploaded, shard_cache, monkeypatch):
    (url0, local0), (url1, local1) = uploaded
    size = max(datasource._size(fmt.read_manifest(p)) for p in (local0, local1))
    monkeypatch.setenv("ORCH_SHARD_CACHE_GB", str(1.5 * size / 1e9))  # room for one copy
    with datasource.in_use(f"prepared:{url0}") as first:
        with pytest.raises(DatasetError, match="no room .* under its cap .* in use"):
            with datasource.in_use(f"prepared:{url1}"):
                pass
        assert (Path(first.removeprefix("prepared:")) / fmt.MANIFEST).exists()
    with datasource.in_use(f"prepared:{url1}") as second:  # the first is not in use now: deleted for room
        assert not Path(first.removeprefix("prepared:")).exists()
        assert (Path(second.removeprefix("prepared:")) / fmt.MANIFEST).exists()
    monkeypatch.setenv("ORCH_SHARD_CACHE_GB", str(0.5 * size / 1e9))
    shutil.rmtree(shard_cache)
    with pytest.raises(DatasetError, match="larger than this node's shard cache cap"):
        with datasource.in_use(f"prepared:{url0}"):
            pass


def test_a_dataset_on_a_network_mount_is_copied_a_local_one_is_not(uploaded, shard_cache, monkeypatch):
    """The mount table is read from /proc/self/mounts; an NFS mount cannot be made here, so its
    type is what the lookup answers for this folder (the one stand-in in this file)."""
    _, local = uploaded[0]
    with datasource.in_use(f"prepared:{local}") as spec:
        assert spec == f"prepared:{local}"
    assert datasource._mount_type(Path("/proc")) == "proc"  # the real table is read
    monkeypatch.setattr(datasource, "_mount_type", lambda path: "nfs4" if str(path).startswith(str(local)) else "ext4")
    with datasource.in_use(f"prepared:{local}") as spec:
        copy = Path(spec.removeprefix("prepared:"))
        assert copy.parent == shard_cache and fmt.read_manifest(copy)["splits"] == fmt.read_manifest(local)["splits"]


@pytest.mark.slow
def test_a_search_and_a_scale_read_an_s3_dataset(s3, uploaded, home, tmp_path):
    """As a user runs them: subprocesses with their own Ray, the S3 settings in the environment."""
    from benchmarks.faults import spawn
    from orchestrator.store import ResultsStore
    from tests.test_faults import finish

    env_s3, _ = s3
    url, _ = uploaded[0]
    cache = tmp_path / "node-cache"
    env = dict(os.environ, **env_s3, ORCH_HOME=str(home), ORCH_SHARD_CACHE=str(cache), MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "search"
    out = finish(spawn(["search", "--json", "--gpus", "0", "--dataset", f"prepared:{url}", "--base-resolution", "32",
                        "--trials", "2", "--epochs", "1", "--batch-size", "8", "--confirm-top", "0"], env, log), log)
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    trials = store.trials(out["search_id"])
    assert len(trials) == 2 and all(t.val_top1 is not None for t in trials)
    assert store.get_search(out["search_id"]).config["dataset"] == f"prepared:{url}"
    (copy,) = [p for p in cache.iterdir() if p.is_dir()]
    assert (copy / fmt.MANIFEST).exists()
    log = tmp_path / "scale"
    scaled = finish(spawn(["scale", "--json", "--gpus", "0", "--from-run", out["search_id"], "--phis", "1",
                           "--no-baseline", "--epochs", "1"], env, log), log)
    assert scaled["status"] == "finished"
    (run,) = store.scale_runs(scaled["scale_id"])
    assert run.val_top1 is not None and "data_wait_s" in run.history[-1]


def test_copying_is_not_held_up_by_a_copy_in_use(s3, uploaded, shard_cache):
    """A rank still copying must not wait for a rank already training on the copy (the use lock
    is shared and held for a whole run; copying takes a lock of its own)."""
    import threading

    url, _ = uploaded[0]
    with datasource.in_use(f"prepared:{url}") as spec:
        copy = Path(spec.removeprefix("prepared:"))
        (copy / fmt.MANIFEST).unlink()  # as if this node's copy were still being made
        done = []
        t = threading.Thread(target=lambda: done.append(datasource.local_copy(url, log=lambda line: None)), daemon=True)
        t.start()
        t.join(timeout=60)
        assert done == [copy] and (copy / fmt.MANIFEST).exists()


def test_an_image_folder_on_several_nodes_needs_a_shared_preparation(monkeypatch, tmp_path):
    monkeypatch.setenv("ORCH_PREPARED_CACHE", str(tmp_path / "prepared"))
    datasource.check_reach("imagefolder:/data/pets", 1, None)  # one machine: fine
    datasource.check_reach("prepared:/data/pets-prepared", 4, "10.0.0.1:6379")  # not prepared here
    with pytest.raises(DatasetError, match=r"this is 3 nodes: imagefolder:/data/pets is prepared into .* on this "
                                           r"machine, .* ORCH_PREPARED_CACHE .*orch data prepare"):
        datasource.check_reach("imagefolder:/data/pets", 3, "10.0.0.1:6379")
    with pytest.raises(DatasetError, match=r"a remote cluster \(ray://head:10001\)"):
        datasource.check_reach("imagefolder:/data/pets", 1, "ray://head:10001")
    monkeypatch.setattr(datasource, "_mount_type", lambda path: "nfs4")  # a shared mount (no NFS server here)
    datasource.check_reach("imagefolder:/data/pets", 3, "10.0.0.1:6379")
