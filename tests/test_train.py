"""The training loop and the datasets, on CPU with the tiny member."""

import pytest
import torch

from workers import data, train
from workers.flops import measure
from workers.model import TINY_SPEC

SMALL = dict(spec=TINY_SPEC, synthetic_size=(128, 64), batch_size=32, epochs=2)


def test_run_reports_every_epoch_with_all_metrics():
    reports = []
    hist = train.run(SMALL, lambda m, c: reports.append((m, c)))
    assert [m["epoch"] for m, _ in reports] == [1, 2] and len(hist) == 2
    for m, ckpt in reports:
        assert {"val_top1", "val_loss", "train_loss", "epoch_s", "train_s", "images_per_s", "params_m"} <= set(m)
        assert 0.0 <= m["val_top1"] <= 1.0 and m["images_per_s"] > 0
        assert m["params_m"] == pytest.approx(measure(TINY_SPEC).params_m)
        assert {"model", "optimizer", "epoch", "config", "history"} <= set(ckpt)


def test_checkpoint_resume_continues_from_the_next_epoch(tmp_path):
    train.run(dict(SMALL, epochs=1), lambda m, c: train.save_checkpoint(c, tmp_path))
    state = train.load_checkpoint(tmp_path)
    assert state["epoch"] == 1
    epochs = []
    hist = train.run(dict(SMALL, epochs=3), lambda m, c: epochs.append(m["epoch"]), state=state)
    assert epochs == [2, 3] and [h["epoch"] for h in hist] == [1, 2, 3]


def test_diverging_trial_fails_with_the_reason():
    with pytest.raises(train.TrialDiverged, match="lower the learning rate"):
        train.run(dict(SMALL, lr=1e6, epochs=1), lambda m, c: None)


def test_unknown_config_keys_are_errors():
    with pytest.raises(ValueError, match="unknown training config keys"):
        train.make_config(spec=TINY_SPEC, learning_rate=0.1)


def test_class_count_mismatch():
    with pytest.raises(ValueError, match="classes"):
        train.run(dict(SMALL, spec=dict(TINY_SPEC, num_classes=3)), lambda m, c: None)


def test_synthetic_is_deterministic_and_balanced():
    a = data.make_synthetic(7, n_train=200, n_val=50)
    b = data.make_synthetic(7, n_train=200, n_val=50)
    c = data.make_synthetic(8, n_train=200, n_val=50)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape == (200, 3, 64, 64)
    assert torch.bincount(a.train.labels, minlength=10).min() > 5
    assert not a.flip  # class textures are oriented: mirroring would change the class


def test_resize_and_augment_shapes():
    ds = data.load("synthetic", 32, synthetic_size=(64, 32))
    assert ds.train.images.shape[-1] == 32
    x = ds.train.images[:8].float()
    y = data.gpu_augment(x, pad=4, flip=True, generator=torch.Generator().manual_seed(0))
    assert y.shape == x.shape and not torch.equal(x, y)


def test_dataset_spec_errors(tmp_path):
    with pytest.raises(data.DatasetError, match="unknown dataset"):
        data.parse_spec("imagenet")
    with pytest.raises(data.DatasetError, match="unknown dataset"):
        data.parse_spec("imagefolder:")
    (tmp_path / "train" / "only").mkdir(parents=True)
    with pytest.raises(data.DatasetError, match="at least 2"):
        data.scan_imagefolder(tmp_path)


def test_undecodable_image_is_a_clear_error(tmp_path):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / "x.png").write_bytes(b"not a png")
    with pytest.raises(data.DatasetError, match="cannot decode"):
        data.load_imagefolder(str(tmp_path), 32)


def test_the_weight_average_follows_the_num_updates_rule():
    """min(decay, (1 + n) / (10 + n)) after n updates: a short run averages its last steps, a long
    one approaches the decay; BatchNorm statistics are averaged too, and a checkpoint's average
    loads into a bare network."""
    from workers.train import _Ema, ema_weights

    net = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    ema = _Ema(net, 0.9999)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
        net[1].running_mean.add_(1.0)
    ema.update()  # the first update copies (AveragedModel's own rule)
    assert torch.allclose(ema.module[0].weight, start + 1)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update()  # n = 1: k = 2/11 of the average, 9/11 of the new weights
    k = 2 / 11
    assert torch.allclose(ema.module[0].weight, k * (start + 1) + (1 - k) * (start + 2), atol=1e-6)
    assert torch.allclose(ema.module[1].running_mean, torch.ones(2))  # buffers averaged (both 1 here)
    bare = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False), torch.nn.BatchNorm1d(2))
    bare.load_state_dict(ema_weights({"ema": ema.state_dict()}))
    assert torch.equal(bare[0].weight, ema.module[0].weight)
    assert ema_weights({"ema": None}) is None
    # a resumed job's average (loaded from its checkpoint) continues as the first one does
    again = _Ema(net, 0.9999)
    again.load_state_dict(ema.state_dict())
    with torch.no_grad():
        net[0].weight.add_(1.0)
    ema.update()
    again.update()
    assert torch.equal(again.module[0].weight, ema.module[0].weight) and int(again.averaged.n_averaged) == 3


def test_random_resized_crops_on_the_device_are_one_batched_resampling():
    """workers.data.gpu_resized_crop: identity at full area, mirrors at p=1/2, crops of the drawn
    area, the same draws for the same generator seed."""
    import torch

    x = torch.rand(64, 3, 16, 20)
    whole = (20 / 16, 20 / 16)  # the image's own aspect (width / height in pixels)
    same = data.gpu_resized_crop(x, flip=False, scale=(1.0, 1.0), ratio=whole)
    assert same.shape == x.shape and torch.allclose(same, x, atol=1e-5)
    flipped = data.gpu_resized_crop(x, flip=True, scale=(1.0, 1.0), ratio=whole,
                                    generator=torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.allclose(f, r.flip(2), atol=1e-5) for f, r in zip(flipped, x)])
    kept = torch.tensor([torch.allclose(f, r, atol=1e-5) for f, r in zip(flipped, x)])
    assert bool((mirrored ^ kept).all()) and 10 < int(mirrored.sum()) < 54
    ramp = torch.arange(20.0).expand(8, 3, 16, 20).contiguous()  # pixel value = its column
    quarter = data.gpu_resized_crop(ramp, flip=False, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    spans = quarter[:, 0].amax(dim=(1, 2)) - quarter[:, 0].amin(dim=(1, 2))
    side = (0.25 * 16 * 20) ** 0.5  # a square of a quarter of the area: 8.9 px on each side
    assert torch.allclose(spans, torch.full((8,), side * 19 / 20), atol=0.6), spans  # resampled onto 20 columns
    a, b = (data.gpu_resized_crop(x, flip=True, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and not torch.allclose(a, x)
