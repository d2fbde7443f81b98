"""The EfficientNet family as modules: real forward/backward of the tiny member on CPU."""

import copy

import pytest
import torch

from orchestrator import scaling
from workers.model import TINY_SPEC, build_model, check_spec


def test_tiny_forward_backward_on_cpu():
    torch.manual_seed(0)
    model = build_model(TINY_SPEC).train()
    x = torch.randn(4, 3, 32, 32)
    y = torch.randint(0, 10, (4,))
    logits = model(x)
    assert logits.shape == (4, 10)
    loss = torch.nn.functional.cross_entropy(logits, y)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_a_few_steps_reduce_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    spec = dict(TINY_SPEC, dropout=0.0, drop_path=0.0)
    model = build_model(spec).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(16, 3, 32, 32), torch.arange(16) % 10
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < first * 0.5


def test_eval_is_deterministic_and_train_drops_paths():
    torch.manual_seed(0)
    model = build_model(dict(TINY_SPEC, drop_path=0.9, dropout=0.0))
    for block in model.blocks:  # a trained network's branches are not zero (at init they are)
        torch.nn.init.ones_(block.project[1].weight)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    b = model(x)
    assert not torch.allclose(a, b)


def test_residual_blocks_start_as_the_identity():
    """Zero γ in each residual block's last BatchNorm: a deeper member starts as a shallower one."""
    torch.manual_seed(0)
    model = build_model(scaling.network_spec(1.4, 1.0, 40, num_classes=10)).eval()
    residual = [b for b in model.blocks if b.residual]
    assert residual and all(not b.project[1].weight.any() for b in residual)
    assert all(b.project[1].weight.all() for b in model.blocks if not b.residual)
    x = torch.randn(2, residual[0].project[0].out_channels, 10, 10)
    assert torch.equal(residual[0](x), x)


def test_b0_structure_and_params():
    model = build_model(scaling.network_spec(1.0, 1.0, 224))
    assert len(model.blocks) == 16
    assert model.num_params() == 5_288_548  # timm / TF reference efficientnet_b0
    residual = [b.residual for b in model.blocks]
    assert sum(residual) == 16 - 7  # every stage's first block has no residual


def test_unknown_or_missing_spec_keys_are_errors():
    bad = dict(TINY_SPEC, width=1.2)
    with pytest.raises(ValueError, match="unknown keys"):
        check_spec(bad)
    missing = {k: v for k, v in TINY_SPEC.items() if k != "head"}
    with pytest.raises(ValueError, match="missing keys"):
        build_model(missing)
    bad_stage = copy.deepcopy(TINY_SPEC)
    bad_stage["stages"][0]["groups"] = 2
    with pytest.raises(ValueError, match="bad stage 0"):
        build_model(bad_stage)


def test_workers_import_only_torch_and_numpy():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import workers.model, workers.flops, workers.data, workers.train\n"
        "bad = [m for m in ('orchestrator', 'ray', 'mlflow', 'sqlalchemy', 'optuna', 'click', 'PIL') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
