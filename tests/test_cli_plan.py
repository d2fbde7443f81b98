"""`orch plan` through click's CliRunner, including every bad input the issue lists."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from orchestrator import scaling
from orchestrator.cli import main


@pytest.fixture
def runner():
    return CliRunner()


def test_official_json_reproduces_table2(runner):
    res = runner.invoke(main, ["plan", "--mode", "official", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == list(scaling.OFFICIAL)
    for r in rows:
        params_m, gflops = scaling.PAPER_TABLE2[r["name"]]
        for key in ("name", "phi", "depth_mult", "width_mult", "resolution", "params_m", "gmacs", "flops_ratio"):
            assert key in r
        assert r["params_m"] == pytest.approx(params_m, rel=0.025)
        assert r["gmacs"] == pytest.approx(gflops, rel=0.05)
    assert rows[0]["flops_ratio"] == 1.0


def test_compound_shows_theory_next_to_measured(runner):
    res = runner.invoke(main, ["plan", "--alpha", "1.2", "--beta", "1.1", "--gamma", "1.15", "--phis", "1-3", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["phi"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["theory_ratio"] == pytest.approx(1.92 ** r["phi"], rel=0.01)
    # rounding moves the measured ratio off the theoretical one, and the plan shows both
    assert rows[1]["flops_ratio"] != pytest.approx(rows[1]["theory_ratio"], rel=0.01)
    table = runner.invoke(main, ["plan", "--alpha", "1.2", "--beta", "1.1", "--gamma", "1.15", "--phis", "1-3"])
    assert table.exit_code == 0
    assert "theory ×B0" in table.stdout and "FLOPs ×B0" in table.stdout and "1.92" in table.stdout


def test_fractional_phis_and_small_base(runner):
    res = runner.invoke(main, ["plan", "--phis", "0.5,1.5", "--base-resolution", "64", "--num-classes", "10", "--json", "--no-baseline"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == ["B0.5", "B1.5"]
    # 64·1.15^φ to the nearest pixel: 68.6 -> 69 and 79.0 -> 79
    assert [r["resolution"] for r in rows] == [round(64 * 1.15 ** p) for p in (0.5, 1.5)]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--alpha", "0.9", "--beta", "1.1", "--gamma", "1.1"], "below 1"),
        (["--alpha", "1.2", "--beta", "0.99", "--gamma", "1.1"], "below 1"),
        (["--alpha", "abc", "--beta", "1.1", "--gamma", "1.1"], "is not a valid float"),
        (["--phis", "7-1"], "runs backwards"),
        (["--phis", "0"], "above 0"),
        (["--phis", ""], "empty"),
        (["--phis", "x"], "not a number"),
        (["--base-resolution", "-5"], "--base-resolution"),
        (["--base-resolution", "0"], "--base-resolution"),
        (["--mode", "fancy"], "'fancy' is not one of"),
        (["--alpha", "1.2"], "missing --beta, --gamma"),
        (["--alpha", "1.2", "--gamma", "1.1"], "missing --beta"),
        (["--mode", "official", "--alpha", "1.2", "--beta", "1.1", "--gamma", "1.1"], "official uses the shipped table"),
        (["--mode", "official", "--no-baseline", "--phis", "1"], None),
    ],
)
def test_bad_input_is_a_click_error(runner, args, says):
    res = runner.invoke(main, ["plan", *args])
    if says is None:  # a valid corner case, not an error
        assert res.exit_code == 0, res.output
        return
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    error_lines = [l for l in res.output.splitlines() if l.startswith("Error:")]
    assert len(error_lines) == 1 and says in error_lines[0], res.output


def every_command(group=main, path=()) -> list[list[str]]:
    """The root and every command and group under it, found by walking the CLI (so a command
    added later is covered without editing this list)."""
    import click

    out = [list(path)]
    for name, cmd in group.commands.items():
        out += every_command(cmd, path + (name,)) if isinstance(cmd, click.Group) else [list(path + (name,))]
    return out


COMMANDS = every_command()
HEAVY = "('torch', 'ray', 'mlflow', 'sqlalchemy', 'optuna', 'alembic', 'rich', 'numpy')"


def test_every_command_is_covered():
    names = {" ".join(c) for c in COMMANDS}
    assert {"", "plan", "search", "scale", "ui", "runs list", "runs show", "db upgrade", "db current"} <= names


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "orch")
def test_help_imports_nothing_heavy(cmd):
    # `orch --help` is instant because torch/ray/mlflow/sqlalchemy are imported in command bodies.
    code = (
        "import sys\n"
        "from orchestrator.cli import main\n"
        f"try:\n    main({cmd + ['--help']!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        f"heavy = [m for m in {HEAVY} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Usage:" in out.stdout


@pytest.mark.parametrize("argv", [
    ["search", "--dataset", "synthetic", "--epochs", "1", "--grace-epochs", "2"],
    ["search", "--gpus", "1", "--gpus-per-trial", "2"],
    ["scale", "--from-run", "latest", "--dataset", "synthetic", "--gpus", "0", "--gpus-per-job", "1"],
    ["scale", "--from-run", "latest", "--gpus-per-job", "1", "--workers-per-job", "2"],
], ids=["search", "search-gpus", "scale", "scale-workers"])
def test_parsing_arguments_imports_nothing_heavy(argv, tmp_path):
    # Every option is parsed and checked (the dataset callback included), and the cross-option
    # check refuses the command before its body runs: nothing heavy may be loaded by then.
    code = (
        "import sys\n"
        "from orchestrator.cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 2, e.code\n"
        f"heavy = [m for m in {HEAVY} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("Error:") == 1, out.stderr
