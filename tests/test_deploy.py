"""deploy/ stays honest: every manifest and config loads and is of the right kind, carries no
secret, and every `orch …` command line in it (and in the READMEs) parses with the real CLI, so
an option that does not exist fails here."""

import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _yaml(rel: str) -> dict:
    return yaml.safe_load((DEPLOY / rel).read_text())


def parse_orch(line: str) -> tuple[str, dict]:
    """Parse an `orch …` command line as the CLI would (unknown options, bad values and missing
    subcommands fail), without running the command or its callbacks (which would, e.g., look
    for the dataset folder on this machine)."""
    argv = shlex.split(line)
    assert argv[0] == "orch", line
    cmd, args, parent, path = main, argv[1:], None, []
    while isinstance(cmd, click.Group):
        ctx = click.Context(cmd, info_name=argv[0] if parent is None else path[-1], parent=parent)
        opts, rest, _ = cmd.make_parser(ctx).parse_args(list(args))
        assert rest, f"{line!r}: no subcommand"
        name, cmd, args = rest[0], cmd.get_command(ctx, rest[0]), rest[1:]
        assert cmd is not None, f"{line!r}: no command {name!r}"
        parent, path = ctx, path + [name]
    ctx = click.Context(cmd, info_name=path[-1], parent=parent)
    opts, rest, _ = cmd.make_parser(ctx).parse_args(list(args))
    values = {}
    for p in cmd.params:
        if opts.get(p.name) is not None:
            values[p.name] = p.type_cast_value(ctx, opts[p.name])
    for p in cmd.params:
        if p.required and p.name not in values and p.envvar is None:
            raise click.MissingParameter(ctx=ctx, param=p)
    return " ".join(path), values


def _orch_lines(text: str) -> list[str]:
    """`orch …` command lines: YAML entrypoints and lines of shell code blocks, with backslash
    continuations joined and trailing comments dropped."""
    text = text.replace("\\\n", " ")
    lines = []
    for raw in text.splitlines():
        line = raw.strip()
        m = re.search(r"(?:^|entrypoint:\s*|--\s+)(orch\s+[a-z].*)$", line)
        if not m:
            continue
        cmd = re.split(r"\s+#\s", m.group(1))[0].strip()
        if "<" in cmd:  # a placeholder in prose, e.g. `orch scale --from-run <id>`
            continue
        lines.append(cmd)
    return lines


DOCS = ["deploy/README.md", "deploy/kuberay/rayjob-search.yaml", "deploy/kuberay/rayjob-scale.yaml", "README.md"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_orch_command_line_parses(doc):
    lines = _orch_lines((ROOT / doc).read_text())
    assert lines, f"no orch command found in {doc}"
    for line in lines:
        parse_orch(line)


def test_the_parser_catches_what_it_should():
    assert parse_orch("orch search --gpus 8 --trials 64")[1]["gpus"] == 8.0
    with pytest.raises(click.NoSuchOption):
        parse_orch("orch search --gpu 8")
    with pytest.raises(click.BadParameter):
        parse_orch("orch scale --from-run x --phis 99x")
    with pytest.raises(click.MissingParameter):
        parse_orch("orch scale --gpus 8")
    with pytest.raises(AssertionError, match="no command"):
        parse_orch("orch train --gpus 8")


def test_kuberay_manifests():
    cluster = _yaml("kuberay/raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"  # the dashboard/job API is not exposed
    assert "nvidia.com/gpu" not in str(head["template"])
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    env = {e["name"]: e for e in head["template"]["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in env["ORCH_DB_URL"]["valueFrom"]  # credentials from a Secret
    # token auth by KubeRay's authOptions (>= 1.5.1), with a Secret the README tells how to make
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": "orch-ray-token"}
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl create secret generic orch-ray-token --from-literal=auth_token=" in readme
    assert "KubeRay ≥ 1.5.1" in readme
    for rel, sub in (("kuberay/rayjob-search.yaml", "search"), ("kuberay/rayjob-scale.yaml", "scale")):
        job = _yaml(rel)
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
        name, values = parse_orch(job["spec"]["entrypoint"])
        assert name == sub and values["gpus"] == 8.0 and values["storage"].startswith("s3://")


def test_ray_cluster_launcher_config():
    cfg = _yaml("ray-cluster/aws.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["head_node_type"] in cfg["available_node_types"]
    gpu = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu and gpu[0]["max_workers"] > gpu[0]["min_workers"]  # autoscaling GPU workers
    assert "--dashboard-host=127.0.0.1" in " ".join(cfg["head_start_ray_commands"])
    # one token on every node: shipped by file_mounts, read by every `ray start`
    token = "/home/ubuntu/.ray/orch-cluster-token"
    assert token in cfg["file_mounts"]
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "RAY_AUTH_MODE=token" in cmd and "RAY_AUTH_TOKEN_PATH=~/.ray/orch-cluster-token" in cmd, cmd


def test_compose_binds_loopback_and_takes_secrets_from_env():
    compose = _yaml("compose/docker-compose.yaml")
    assert set(compose["services"]) >= {"postgres", "mlflow"}
    for svc in compose["services"].values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    for key, value in compose["services"]["postgres"]["environment"].items():
        assert value.startswith("${") and value.endswith("}"), key
    mlflow = compose["services"]["mlflow"]
    # the database URL holds a password: in the environment, never on the command line (`ps`)
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow:${")
    assert "://" not in mlflow["command"] and "PASSWORD" not in mlflow["command"]
    assert "pip install" not in mlflow["command"]  # the driver is in the built image, not installed per start
    assert "psycopg" in mlflow["build"]["dockerfile_inline"]


def test_the_compose_env_file_is_git_ignored():
    import subprocess

    res = subprocess.run(["git", "check-ignore", "-q", "deploy/compose/.env"], cwd=ROOT)
    assert res.returncode == 0, "deploy/compose/.env (the passwords) must be git-ignored"


def test_the_image_builds_as_written():
    # Images cannot be built here; what broke the build, and what the manifests rely on, is checked.
    text = (DEPLOY / "Dockerfile").read_text()
    assert text.startswith("#") and "FROM nvidia/cuda:" in text and "ubuntu24.04" in text
    # Ubuntu 24.04 images ship user `ubuntu` with UID 1000: it must be gone before orch takes 1000
    useradd = text.index("useradd --create-home --uid 1000 orch")
    assert text.rfind("userdel --remove ubuntu", 0, useradd) != -1
    # Ray as the manifests name it, inside pyproject's range
    ray = re.search(r"ARG RAY_VERSION=(\S+)", text).group(1)
    assert '"ray[tune,default]==${RAY_VERSION}"' in text
    for rel in ("kuberay/raycluster.yaml",):
        assert _yaml(rel)["spec"]["rayVersion"] == ray
    pins = re.findall(r'"ray\[[a-z,]+\]>=([0-9.]+),<([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pins and all(tuple(map(int, lo.split("."))) <= tuple(map(int, ray.split("."))) < tuple(map(int, hi.split(".")))
                        for lo, hi in pins), (ray, pins)
    # KubeRay before 1.6 probes health with wget
    assert re.search(r"apt-get install[^\n]*\bwget\b", text)


def test_no_secret_is_baked_in():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert not re.search(r"^(ENV|ARG)\s.*(PASSWORD|TOKEN|SECRET|AWS_)", dockerfile, re.M | re.I)
    for path in DEPLOY.rglob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"password\s*[:=]\s*['\"]?[A-Za-z0-9]", text, re.I), path
        assert not re.search(r"://[^/\s:@]+:[^@\s$]+@", text), path  # user:password@ in a URL
