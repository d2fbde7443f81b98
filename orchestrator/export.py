"""`orch export`: a trained member of a scale as a file other tools read, with a model card.

Formats:
- ``pt2``: a ``torch.export`` program (``torch.export.load``), batch size dynamic;
- ``onnx``: through PyTorch's exporter (``torch.onnx.export(dynamo=True)``; needs the ``export``
  extra: onnx, onnxscript), batch size dynamic, opset of that exporter;
- ``safetensors``: the weights alone (``safetensors.torch.load_file``), for code that builds
  the network itself (``workers.model.build_model`` with the card's ``spec``).

Beside ``PATH`` go ``PATH.card.json`` and ``PATH.card.md``: coefficients, φ, resolution, the
input's normalisation, class names, GMACs, parameters, accuracy, the dataset's digest and the
command that trained it. The weights come from the member's logged MLflow model.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from orchestrator.errors import InputError
from orchestrator.status import Status

FORMATS = ("pt2", "onnx", "safetensors")
NORMALISE = "x = (rgb_uint8 / 255 - 0.5) / 0.25, float32, shape (N, 3, R, R)"


class ExportError(InputError):
    """What was asked cannot be exported; the message says why and what to do."""


def find_member(store, ident: str, model: str | None):
    """(scale record, member row) for a scale id and --model, or a member's MLflow run id."""
    sc = store.get_scale(ident)
    if sc is not None:
        rows = {r.model: r for r in store.scale_runs(ident)}
        if not model:
            raise ExportError(f"scale {ident} has members {', '.join(rows)}; name one with --model", param="--model")
        if model not in rows:
            raise ExportError(f"scale {ident} has no member {model!r} (it has {', '.join(rows) or 'none'})",
                              param="--model")
        return sc, rows[model]
    for s in store.list_scales(10_000):
        for r in store.scale_runs(s.id):
            if r.mlflow_run_id == ident:
                if model and model != r.model:
                    raise ExportError(f"MLflow run {ident} is {r.model} of {s.id}, not {model}", param="--model")
                return s, r
    raise ExportError(f"no scale or member run {ident!r}; `orch runs list` shows the scales", param="ID")


def dataset_identity(spec: str, seed: int | None, synthetic_size) -> tuple[list[str] | None, str]:
    """(class names, digest) of the dataset a member trained on, as far as this machine can see it."""
    from workers.datasets import DatasetError, files_digest, parse_spec, scan_imagefolder
    from workers.defaults import SYNTHETIC_CLASSES

    kind, path = parse_spec(spec)
    if kind == "synthetic":
        ident = f"synthetic seed={seed} size={list(synthetic_size) if synthetic_size else 'default'}"
        return [str(i) for i in range(SYNTHETIC_CLASSES)], "sha256:" + hashlib.sha256(ident.encode()).hexdigest()
    if kind == "prepared":
        from workers.prepared import PreparedError, manifest_digest, read_manifest

        try:
            manifest = read_manifest(path)
        except PreparedError:
            return None, "unavailable (the prepared dataset is not on this machine)"
        return list(manifest["classes"]), "sha256:" + manifest_digest(path)
    try:
        classes, splits = scan_imagefolder(path)
    except DatasetError:
        return None, "unavailable (the image folder is not on this machine)"
    return classes, "sha256:" + files_digest(splits["train"] + splits["val"], path)


def _rebuild_spec(sc, row) -> dict:
    """A user's network keeps no spec on the module: its multipliers, as stored, rebuild it."""
    from orchestrator.baselines import spec

    return spec(sc.config.get("network", "efficientnet-b0"), row.depth_mult, row.width_mult, row.resolution,
                num_classes=sc.config["num_classes"], dropout=0.0)


def card(sc, row) -> dict:
    c = sc.config
    classes, digest = dataset_identity(c.get("dataset", "synthetic"), c.get("seed"), c.get("synthetic_size"))
    phis = ",".join(f"{p:g}" for p in c.get("phis", [])) or f"{row.phi:g}"
    command = (f"orch scale --from-run {sc.search_id} --mode {c.get('mode', 'compound')} --phis {phis} "
               f"--epochs {c.get('epochs')} --dataset {c.get('dataset')} --base-resolution {c.get('base_resolution')}")
    return {
        "model": row.model, "scale_id": sc.id, "search_id": sc.search_id, "trial_id": sc.trial_id,
        "coefficients": {"alpha": c.get("alpha"), "beta": c.get("beta"), "gamma": c.get("gamma")},
        "phi": row.phi, "depth_mult": row.depth_mult, "width_mult": row.width_mult, "resolution": row.resolution,
        "input": NORMALISE.replace("R, R", f"{row.resolution}, {row.resolution}"),
        "classes": classes, "gmacs": row.gmacs, "params": row.params, "val_top1": row.val_top1,
        "epochs": row.epochs_done, "dataset": c.get("dataset"), "dataset_digest": digest,
        "mlflow_run_id": row.mlflow_run_id, "model_uri": row.model_uri, "command": command,
    }


def card_markdown(k: dict) -> str:
    co = k["coefficients"]
    classes = ", ".join(k["classes"]) if k["classes"] else "unknown here"
    return "\n".join([
        f"# {k['model']} of {k['scale_id']}",
        "",
        f"EfficientNet-style member scaled from B0 with α={co['alpha']:.4f}, β={co['beta']:.4f}, γ={co['gamma']:.4f} "
        f"(search {k['search_id']}, trial {k['trial_id']}) at φ={k['phi']:g}: depth x{k['depth_mult']:.3f}, "
        f"width x{k['width_mult']:.3f}, {k['resolution']} px.",
        "",
        "| | |", "|---|---|",
        f"| input | {k['input']} |",
        f"| classes | {classes} |",
        f"| GMACs | {k['gmacs']:.4f} |",
        f"| parameters | {k['params']:,} |",
        f"| val top-1 | {k['val_top1']:.4f} after {k['epochs']} epochs ({k.get('weights', 'raw')} weights) |"
        if k["val_top1"] is not None else "| val top-1 | - |",
        f"| dataset | {k['dataset']} ({k['dataset_digest']}) |",
        f"| trained by | `{k['command']}` |",
        f"| MLflow | run {k['mlflow_run_id']}, model {k['model_uri']} |",
        "",
    ])


def export(store, tracker, ident: str, model: str | None, fmt: str, out: Path) -> dict:
    """Write member (``ident``, ``model``) as ``fmt`` to ``out`` with its card; returns the card
    plus what was written."""
    import torch

    sc, row = find_member(store, ident, model)
    if row.status != Status.FINISHED:
        raise ExportError(f"{row.model} of {sc.id} is {row.status}, not finished; run the scale again to finish it")
    if not row.model_uri:
        raise ExportError(f"{row.model} of {sc.id} has no logged MLflow model (it was trained before orch logged "
                          f"models); train it again with `orch scale`")
    out = Path(out).expanduser()
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file path", param="--out")
    tmp = out.with_name(f".{out.name}.tmp")
    try:  # before any work: a place that cannot be written is the user's to fix
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(b"")
    except OSError as e:
        raise ExportError(f"cannot write {e.filename or out}: {e.strerror or e}; choose another --out",
                          param="--out") from None
    net = tracker.load_torch_model(row.model_uri).eval()
    example = torch.zeros(2, 3, row.resolution, row.resolution)
    tags = tracker.model_tags(row.model_uri)
    k = card(sc, row) | {"format": fmt, "file": str(out), "weights": tags.get("orch.weights", "raw")}
    if tags.get("orch.val_top1") not in (None, "", "None"):  # the accuracy of the weights exported
        k["val_top1"] = float(tags["orch.val_top1"])
    try:
        if fmt == "pt2":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(program, str(tmp))
        elif fmt == "safetensors":
            from safetensors.torch import save_file

            save_file({n: t.detach().contiguous() for n, t in net.state_dict().items()}, str(tmp))
            k["spec"] = getattr(net, "spec", None) or _rebuild_spec(sc, row)  # what builds the network they fit
        elif fmt == "onnx":
            try:
                import onnx  # noqa: F401
                import onnxscript  # noqa: F401
            except ImportError:
                raise ExportError("ONNX export needs onnx and onnxscript: pip install 'orch[export]'") from None
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(net, (example,), str(tmp), dynamo=True, dynamic_shapes=({0: batch},),
                              input_names=["image"], output_names=["logits"], verbose=False)
        else:
            raise ExportError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}", param="--format")
        os.replace(tmp, out)
        Path(f"{out}.card.json").write_text(json.dumps(k, indent=2, ensure_ascii=False), encoding="utf-8")
        Path(f"{out}.card.md").write_text(card_markdown(k), encoding="utf-8")
    except OSError as e:
        raise ExportError(f"cannot write {e.filename or out}: {e.strerror or e}; choose another --out",
                          param="--out") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    return k
