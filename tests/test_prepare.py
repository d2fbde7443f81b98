"""`orch data prepare`: real Pillow encoding in real worker processes, real Parquet files
(pyarrow), folders with every kind of messy file a real dataset has."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from orchestrator.cli import main
from tests.conftest import error_line
from workers import prepared as fmt

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(size=(48, 40), colour=(200, 30, 30), **kw) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _png(size=(40, 40), mode="RGBA") -> bytes:
    buf = io.BytesIO()
    im = Image.new(mode, size, (0, 0, 255, 0) if mode == "RGBA" else 128)
    if mode == "RGBA":
        im.paste((0, 255, 0, 255), (10, 10, 30, 30))
    im.save(buf, "PNG")
    return buf.getvalue()


def _rotated() -> bytes:
    """A 60x20 landscape JPEG tagged 'rotate 90 CW' (EXIF orientation 6): upright it is 20x60."""
    im = Image.new("RGB", (60, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def make_messy(root: Path, *, bad: bool = True) -> dict:
    """An image folder with every case of a real one. Returns what a prepare must find."""
    files = {
        "train/cat/a.jpg": _jpeg(),
        "train/cat/b.JPG": _jpeg(colour=(10, 10, 10)),
        "train/cat/progressive.jpg": _jpeg(progressive=True),
        "train/cat/cmyk.jpg": (lambda: (lambda b: (Image.new("CMYK", (30, 30), (0, 80, 80, 0)).save(b, "JPEG"),
                                                   b.getvalue())[1])(io.BytesIO()))(),
        "train/cat/.DS_Store": b"\x00\x01junk",
        "train/cat/._a.jpg": b"AppleDouble",
        "train/cat/notes.txt": b"not an image, not an image suffix",
        "train/dog walking/grey.png": _png(mode="L"),
        "train/dog walking/alpha.png": _png(),
        "train/dog walking/rotated.jpg": _rotated(),
        "train/dog walking/wide.jpg": _jpeg(size=(2000, 10)),
        "train/dog walking/big.jpg": _jpeg(size=(900, 700)),
        "train/dog walking/tiny.png": _png(size=(1, 1), mode="L"),
        "train/chat_ü/x.jpg": _jpeg(colour=(5, 5, 250)),
        "val/cat/v1.jpg": _jpeg(colour=(201, 30, 30)),
        "val/cat/same.jpg": _jpeg(),  # the same bytes as train/cat/a.jpg
        "val/dog walking/v2.jpg": _jpeg(colour=(0, 100, 0)),
        "val/chat_ü/v3.jpg": _jpeg(colour=(5, 5, 240)),
    }
    if bad:
        files |= {
            "train/cat/empty.jpg": b"",
            "train/cat/text.jpg": b"hello, I am text with an image suffix\n",
            "train/cat/truncated.jpg": _jpeg(size=(64, 64))[:200],
            "val/bird/only-val.jpg": _jpeg(colour=(1, 2, 3)),
        }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "train" / "empty class").mkdir()
    return files


def _prepare(*args, **kw):
    return CliRunner().invoke(main, ["data", "prepare", *map(str, args)], **kw)


def _decoded(dest: Path, split: str) -> list[tuple[tuple[int, int], str, int]]:
    out = []
    for data, label, _ in fmt.iter_split(dest, split, verify=True):
        im = Image.open(io.BytesIO(data))
        out.append((im.size, im.format, label))
    return out


def test_a_messy_folder_is_prepared_as_a_careful_user_expects(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "prepared"
    make_messy(src)

    # the first unreadable file stops it, named, with the fix; no manifest is left
    res = _prepare(f"imagefolder:{src}", dest, "--workers", "2")
    assert res.exit_code == 2, res.output
    line = error_line(res)
    assert any(n in line for n in ("empty.jpg", "text.jpg", "truncated.jpg", "only-val.jpg")) and "--skip-bad" in line
    assert not (dest / fmt.MANIFEST).exists()

    res = _prepare(f"imagefolder:{src}", dest, "--workers", "2", "--skip-bad", "--short-side", "64",
                   "--shard-size", "0.002")  # 2 KiB shards: several per split
    assert res.exit_code == 0, res.output
    m = fmt.read_manifest(dest)
    assert m["classes"] == ["cat", "chat_ü", "dog walking"]  # sorted; the empty class dropped, said
    assert m["dropped_classes"] == ["empty class"] and "empty class" in res.output
    skipped = {Path(s["file"]).name: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"empty.jpg", "text.jpg", "truncated.jpg", "only-val.jpg"}
    assert "0 bytes" in skipped["empty.jpg"] and "not an image" in skipped["text.jpg"]
    assert m["splits"]["train"]["count"] == 11 and m["splits"]["val"]["count"] == 4
    assert len(m["splits"]["train"]["shards"]) > 1
    assert m["train_val_duplicates"] == 1 and "in both train and val" in res.output

    train = _decoded(dest, "train")
    assert all(fmt_ == "JPEG" for _, fmt_, _ in train)  # PNGs, CMYK, progressive: baseline JPEG now
    sizes = sorted(size for size, _, _ in train)
    assert (20, 60) in sizes  # the EXIF-rotated photo, upright
    assert (64, 49) not in sizes and max(min(s) for s in sizes) <= 64  # short side capped
    assert (1280, 6) not in sizes and (2000, 10) in sizes  # a short side under the cap is kept
    assert (1, 1) in sizes
    labels = [label for _, _, label in train]
    assert sorted(set(labels)) == [0, 1, 2]
    for data, label, where in fmt.iter_split(dest, "train"):
        im = Image.open(io.BytesIO(data))
        assert im.mode in ("RGB", "L") and not im.info.get("progressive"), where
    # the alpha PNG lies over white, not black
    alpha = [Image.open(io.BytesIO(d)).convert("RGB") for d, _, _ in fmt.iter_split(dest, "train")
             if Image.open(io.BytesIO(d)).size == (40, 40) and Image.open(io.BytesIO(d)).mode == "RGB"]
    assert alpha and min(alpha[0].getpixel((1, 1))) > 240

    # again: nothing to do
    res = _prepare(f"imagefolder:{src}", dest, "--skip-bad", "--short-side", "64", "--shard-size", "0.002")
    assert res.exit_code == 0 and "already prepared" in res.output
    # the source changed: noticed, prepared again
    (src / "train" / "cat" / "new.jpg").write_bytes(_jpeg(colour=(90, 90, 90)))
    res = _prepare(f"imagefolder:{src}", dest, "--skip-bad", "--short-side", "64", "--shard-size", "0.002")
    assert res.exit_code == 0 and "changed since" in res.output
    assert fmt.read_manifest(dest)["splits"]["train"]["count"] == 12


def test_a_killed_prepare_leaves_no_manifest_and_the_next_one_finishes(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "prepared"
    for i in range(400):
        split, cls = ("train" if i % 4 else "val"), f"c{i % 3}"
        p = src / split / cls / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        # noise: PNG -> JPEG re-encoding takes real time, and shards fill
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(p)
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "orchestrator.cli", "data", "prepare", f"imagefolder:{src}", str(dest),
           "--workers", "2", "--shard-size", "0.05"]
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and p.poll() is None:
        state = dest / ".prepare-state.json"
        if state.exists() and len(json.loads(state.read_text())["shards"]) >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read().decode()[-2000:]
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not (dest / fmt.MANIFEST).exists()
    written = len(json.loads((dest / ".prepare-state.json").read_text())["shards"])

    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{written} shards were written before" in res.stderr
    m = fmt.read_manifest(dest)
    assert m["splits"]["train"]["count"] == 300 and m["splits"]["val"]["count"] == 100
    digests = [tuple(row) for split in fmt.SPLITS
               for s in m["splits"][split]["shards"] for row in np.load(dest / s["index"])[:, 5:].tolist()]
    assert len(digests) == len(set(digests)) == 400  # every image once: nothing lost, nothing twice
    assert not (dest / ".prepare-state.json").exists() and not list(dest.glob("*.tmp"))


def test_parquet_in_the_hugging_face_layout(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "hf" / "data"
    src.mkdir(parents=True)
    names = ["apple", "banana", "cherry"]
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
    meta = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for split, n in (("train", 30), ("validation", 9)):
        images = [{"bytes": _jpeg(colour=(i * 7 % 255, 40, 90)) if i != 5 else b"broken", "path": f"{i}.jpg"}
                  for i in range(n)]
        table = pa.table({"image": pa.array(images, type=image_type), "label": pa.array([i % 3 for i in range(n)])})
        table = table.replace_schema_metadata(meta)
        pq.write_table(table, src / f"{split}-00000-of-00001.parquet")
    dest = tmp_path / "prepared"
    res = _prepare(f"parquet:{src}", dest, "--skip-bad", "--workers", "2")
    assert res.exit_code == 0, res.output
    m = fmt.read_manifest(dest)
    assert m["classes"] == names  # the ClassLabel names, from the files' metadata
    assert m["splits"]["train"]["count"] == 29 and m["splits"]["val"]["count"] == 8
    assert [s["file"] for s in m["skipped"]] == ["train-00000-of-00001.parquet#row5",
                                                 "validation-00000-of-00001.parquet#row5"]
    assert sorted(label for _, label, _ in fmt.iter_split(dest, "val")) == sorted(i % 3 for i in range(9) if i != 5)

    # column names it cannot guess: one line that names the option
    other = tmp_path / "other"
    other.mkdir()
    for split in ("train", "validation"):
        pq.write_table(pa.table({"a": pa.array([b"x"]), "b": pa.array([b"y"]), "y": pa.array([0])}),
                       other / f"{split}.parquet")
    res = _prepare(f"parquet:{other}", tmp_path / "p2")
    assert res.exit_code == 2 and "--image-column" in error_line(res)


@pytest.mark.parametrize("source,needle", [
    ("imagefolder:/nonexistent", "does not exist"),
    ("folder:/x", "imagefolder:PATH or parquet:PATH"),
])
def test_bad_sources_are_one_line(tmp_path, source, needle):
    res = _prepare(source, tmp_path / "d")
    assert res.exit_code == 2 and needle in error_line(res)


def test_a_folder_that_is_not_a_prepared_dataset_is_not_written_into(tmp_path):
    src = tmp_path / "src"
    make_messy(src, bad=False)
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    res = _prepare(f"imagefolder:{src}", dest)
    assert res.exit_code == 2 and "not empty" in error_line(res)
    assert (dest / "thesis.tex").read_text() == "precious"


@pytest.mark.slow
def test_search_and_scale_train_on_prepared_datasets(ray_session, home, tmp_path):
    """A search and a scale on a prepared image folder, and a search on a prepared Parquet set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.store import ResultsStore

    rng = np.random.default_rng(0)

    def noisy(colour):
        arr = np.clip(np.array(colour)[None, None, :] + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        return buf.getvalue()

    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    src = tmp_path / "pets"
    for split, n in (("train", 12), ("val", 6)):
        for cls, colour in colours.items():
            (src / split / cls).mkdir(parents=True)
            for i in range(n):
                (src / split / cls / f"{i}.png").write_bytes(noisy(colour))
    pq_src = tmp_path / "pq"
    pq_src.mkdir()
    for split, n in (("train", 12), ("validation", 6)):
        pq.write_table(pa.table({"image": pa.array([noisy(c) for c in colours.values() for _ in range(n)]),
                                 "label": pa.array([name for name in colours for _ in range(n)])}),
                       pq_src / f"{split}.parquet")
    store = ResultsStore(f"sqlite:///{home / 'orch.db'}")
    common = ["--json", "--gpus", "0", "--base-resolution", "32", "--trials", "2", "--epochs", "1",
              "--batch-size", "8", "--confirm-top", "0"]
    for source, dest in ((f"imagefolder:{src}", tmp_path / "pets-prepared"), (f"parquet:{pq_src}", tmp_path / "pq-prep")):
        assert _prepare(source, dest, "--workers", "1").exit_code == 0
        res = CliRunner().invoke(main, ["search", *common, "--dataset", f"prepared:{dest}"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        trials = store.trials(out["search_id"])
        assert len(trials) == 2 and all(t.val_top1 is not None for t in trials), source
        assert store.get_search(out["search_id"]).config["num_classes"] == 2
        # the scaled job streams the shards (fresh random-resized crops, workers/stream.py), not a tier
        res = CliRunner().invoke(main, ["scale", "--json", "--gpus", "0", "--from-run", out["search_id"], "--phis", "1",
                                        "--no-baseline", "--epochs", "1"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        scaled = json.loads(res.stdout)
        assert scaled["status"] == "finished" and [m["name"] for m in scaled["models"]] == ["B1"]
        assert store.get_scale(scaled["scale_id"]).config["dataset"] == f"prepared:{dest}"
        (run,) = store.scale_runs(scaled["scale_id"])
        assert run.history[-1]["data_wait_s"] >= 0 and run.history[-1]["gpu_decoded"] == 0.0, run.history

    # a folder whose preparation did not finish is refused while options are read, with the fix
    (tmp_path / "half").mkdir()
    res = CliRunner().invoke(main, ["search", *common, "--dataset", f"prepared:{tmp_path / 'half'}"])
    assert res.exit_code == 2 and "did not finish" in error_line(res)


def test_a_full_disk_is_one_line_and_the_next_run_finishes(tmp_path, tmpfs):
    src = tmp_path / "src"
    for i in range(120):
        p = src / ("train" if i % 4 else "val") / f"c{i % 2}" / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(p)
    small = tmpfs(1)  # the prepared set is about 2 MB
    res = _prepare(f"imagefolder:{src}", small / "d", "--workers", "1", "--shard-size", "0.2")
    assert res.exit_code == 1 and "No space left" in error_line(res) and "run the same command again" in error_line(res)
    assert not (small / "d" / fmt.MANIFEST).exists()


def test_a_damaged_parquet_file_is_named(tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    (src / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    (src / "validation.parquet").write_bytes(b"PAR1 nor this")
    res = _prepare(f"parquet:{src}", tmp_path / "d")
    assert res.exit_code == 2 and "cannot be read" in error_line(res)
