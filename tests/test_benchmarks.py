"""The benchmark scripts run at their smallest size (--quick) and print their figures last.
They measure; these tests check that they run end to end and report, not how fast anything is."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> list[str]:
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return [line for line in res.stdout.splitlines() if line.strip()]


def test_train_throughput_quick():
    lines = _run("train_throughput.py")
    assert re.search(r"^B0 +64 +8 orch eager +[\d,.]+ ", "\n".join(lines), re.M)
    assert re.match(r"full trial path .* ÷ bare step, B0: \d+\.\d{3}", lines[-1])


def test_overhead_quick():
    lines = _run("overhead.py")
    m = re.match(r"efficiency = train_s / \(concurrency x wall\) = (\d+\.\d+)", lines[-1])
    assert m and 0.0 < float(m.group(1)) <= 1.0


def test_bookkeeping_quick():
    lines = _run("bookkeeping.py")
    row = next(line for line in lines if re.match(r"^\s+10\s+10\s", line))  # 10 trials, 10 rows in the store
    assert float(row.split()[4]) >= 1.0  # wall ÷ ideal: the wall can't beat the ideal
    assert lines[-1].startswith("at 10 trials wall ÷ ideal = ")


def test_faults_quick():
    lines = _run("faults.py")  # exits non-zero itself if anything was lost, duplicated or left RUNNING
    assert any(re.match(r"  kill 1: aimed trial-ended:1: ", line) for line in lines), lines
    m = re.match(r"total: kills (\d+) \((\d+) aimed\), trials and models 2, epochs \d+; duplicate rows 0; "
                 r"lost epochs 0; disagreements 0; runs left RUNNING 0$", lines[-1])
    assert m, lines[-8:]


def test_statecopy_quick():
    lines = _run("statecopy.py")  # exits non-zero itself if orch's copy was ever torn
    assert re.match(r"Tune's copy: \d+ reads, \d+ torn", lines[-2])
    m = re.match(r"orch's copy: (\d+) reads, 0 torn$", lines[-1])
    assert m and int(m.group(1)) > 0, lines[-3:]


def test_search_cost_quick():
    lines = _run("search_cost.py")
    assert re.match(r"grid: \d+ networks, \d+ trial epochs", lines[1]), lines
    m = re.match(r"mean cost ([\d.]+)% of the grid's epochs, [\d.]+% of its seconds; winner in the grid's top 3 "
                 r"in (\d) of 1; Spearman\(first rung, full budget\) = (-?[\d.]+|n/a)$", lines[-1])
    assert m and float(m.group(1)) > 0, lines[-3:]


def test_trial_defaults_quick():
    lines = _run("trial_defaults.py")
    row = lines[-1].split()
    assert row[:5] == ["40", "64", "0.1", "1", "256"] and 0.0 <= float(row[-3]) <= 1.0, lines[-3:]


def test_demo_family_quick():
    lines = _run("demo_family.py")
    assert re.match(r"seed 1: winner α=[\d.]+ .* B0 \d+px .* (rising|not rising); \d+ s$", lines[-3]), lines[-3:]
    assert "--batch-size 16" in lines[-2]  # it read the demo's own commands from the Makefile
    assert re.match(r"families whose val top-1 rises with φ: [01] of 1;", lines[-1])


def test_demo_family_reads_the_makefile(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import demo_family

    cmds = demo_family.demo_commands()
    assert cmds["search"][:2] == ["--trials", "4"] and cmds["scale"][:2] == ["--from-run", "latest"]
    bad = tmp_path / "Makefile"
    bad.write_text("demo: venv\n\t$(ORCH) search --trials 1\n")
    with pytest.raises(SystemExit, match="expected search and scale"):
        demo_family.demo_commands(bad)


def test_data_path_quick():
    lines = _run("data_path.py")
    at = lines.index("tiers:")
    m = re.search(r"CPU loader, 224 px .*: ([\d,]+) images/s .*bare Pillow .*: ([\d,]+) images/s", lines[at - 2])
    assert m and all(float(g.replace(",", "")) > 0 for g in m.groups()), lines[at - 2]
    m = re.search(r"B0@32 bs8 on cpu: data path ([\d,.]+) images/s, bare step ([\d,.]+) -> (\d+\.\d+)", lines[at - 1])
    assert m and float(m.group(1).replace(",", "")) > 0 and float(m.group(3)) > 0, lines[at - 1]
    assert lines[at - 3] == "scaled jobs' stream:"
    at -= 3
    kinds = [line.split(" images/s")[0].strip().rsplit(None, 1) for line in lines[at - 3:at]]
    assert [k[0] for k in kinds] == ["baseline JPEG", "PNG", "large JPEG"] and all(float(k[1]) > 0 for k in kinds)
    assert "0 re-encoded" in lines[at - 3] and "40 re-encoded" in lines[at - 2]  # kept byte for byte vs converted
    at += 3
    assert re.search(r"gather from a 64-px tier .*: [\d,]+ images/s", lines[at + 1])
    m = re.search(r"= (\d+\.\d+) x the file", lines[at + 2])
    assert m and float(m.group(1)) <= 1.1  # one copy between the four processes


def test_compile_gpu_quick(tmp_path):
    """benchmarks/compile_gpu.py's code paths at CPU size (the tests' aot_eager backend)."""
    import json

    _run("compile_gpu.py", "--only", "B0,packing", "--out", str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "compile_gpu.jsonl").read_text().splitlines()]
    assert not [r for r in rows if r["section"] == "error"], rows
    fig = {k: v for r in rows if r["section"] == "B0@32" for k, v in r.items()}
    assert fig["orch_compiled_ips"] > 0 and fig["compiled"] == 1.0 and fig["compile_s_first"] > 0
    assert fig["rerun_rc"] == 0 and fig["compile_s_second_process"] > 0
    assert fig["auto_compiled"] == 0.0  # CPU: auto is off
    assert set(fig["profile_ms"]) >= {"orch.data", "orch.forward_backward", "orch.optimizer", "orch.ema"}
    packed = [r for r in rows if r["section"] == "packing"]
    assert [r["trials_per_gpu"] for r in packed] == [1, 2] and all(r["aggregate_ips"] > 0 for r in packed)
