"""deploy/ stays honest: every manifest and config is valid against its tool's published schema
(KubeRay's CRDs, Ray's cluster-launcher schema and checks, the compose specification), is of the
right kind, carries no secret, and every `orch …` command line in it (and in the READMEs) parses
with the real CLI, so an option that does not exist fails here."""

import copy
import functools
import gzip
import json
import re
import shlex
from pathlib import Path

import click
import pytest
import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / "tests" / "data" / "schemas"  # vendored: SOURCES.md says from where
#: The KubeRay releases the manifests are checked against: the oldest deploy/README.md supports
#: (`authOptions.secretName` is 1.6.0's) and the newest.
KUBERAY = ("v1.6.0", "v1.7.0")


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


# --------------------------------------------------------------------------- published schemas


def _strict(node):
    """A Kubernetes schema as `kubectl apply --validate=strict` reads it: an object with declared
    properties accepts no other field (a typo such as `minReplica` fails), unless it says it keeps
    unknown fields."""
    if isinstance(node, dict):
        if (node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for v in node.values():
            _strict(v)
    elif isinstance(node, list):
        for v in node:
            _strict(v)
    return node


@functools.cache
def _crd(version: str, plural: str) -> dict:
    doc = yaml.safe_load(gzip.decompress((SCHEMAS / f"kuberay-{version}-ray.io_{plural}.yaml.gz").read_bytes()))
    (v1,) = [v for v in doc["spec"]["versions"] if v["name"] == "v1"]
    return _strict(copy.deepcopy(v1["schema"]["openAPIV3Schema"]))


def _sub(schema: dict, *path: str) -> dict:
    for key in path:
        schema = schema["items"] if key == "[]" else schema["properties"][key]
    return schema


def _errors(schema: dict, doc) -> list[str]:
    import jsonschema

    return [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message[:200]}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]


def kube_errors(doc: dict, version: str) -> list[str]:
    """``doc`` against KubeRay ``version``'s CRDs. Core kinds are checked against the same
    Kubernetes schemas as the CRDs embed them (a Pod's spec is the pod template's, a claim's spec
    the ephemeral volume's claim template's); a ServiceAccount carries metadata only."""
    kind = doc.get("kind")
    if kind == "RayCluster":
        return _errors(_crd(version, "rayclusters"), doc)
    if kind == "RayJob":
        return _errors(_crd(version, "rayjobs"), doc)
    template = _sub(_crd(version, "rayclusters"), "spec", "headGroupSpec", "template")
    top = {"apiVersion": {"const": "v1"}, "kind": {"const": kind},
           "metadata": _sub(template, "metadata") | {"required": ["name"]}}
    if kind == "Pod":
        body = {"spec": _sub(template, "spec")}
    elif kind == "PersistentVolumeClaim":
        body = {"spec": _sub(template, "spec", "volumes", "[]", "ephemeral", "volumeClaimTemplate", "spec")}
    elif kind == "ServiceAccount":
        body = {}
    else:
        return [f"{kind}: no schema for this kind here; add one to tests/test_deploy.py"]
    schema = {"type": "object", "required": ["apiVersion", "kind", "metadata", *body], "additionalProperties": False,
              "properties": top | body}
    return _errors(schema, doc)


KUBE_DOCS = [(p.name, i) for p in sorted((DEPLOY / "kuberay").glob("*.yaml"))
             for i, _ in enumerate(yaml.safe_load_all(p.read_text()))]


@pytest.mark.parametrize("version", KUBERAY)
@pytest.mark.parametrize("name,index", KUBE_DOCS)
def test_kubernetes_manifests_are_valid_against_kuberay_schemas(name, index, version):
    doc = list(yaml.safe_load_all((DEPLOY / "kuberay" / name).read_text()))[index]
    assert kube_errors(doc, version) == []


def test_the_kubernetes_schema_check_catches_what_it_should():
    cluster = _yaml("kuberay/raycluster.yaml")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 0
    assert any("minReplica" in e for e in kube_errors(typo, "v1.7.0"))
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "eight"
    assert any("maxReplicas" in e for e in kube_errors(wrong, "v1.7.0"))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "c", "image": "i", "volumeMount": []}]}}
    assert any("volumeMount" in e for e in kube_errors(pod, "v1.6.0"))
    claim = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "x"},
             "spec": {"accessModes": "ReadWriteMany"}}
    assert any("accessModes" in e for e in kube_errors(claim, "v1.6.0"))


def test_ray_cluster_launcher_config_is_valid():
    """Ray's own checks, as `ray up` runs them: its defaults merged in, then its JSON schema
    (ray/autoscaler/ray-schema.json of the pinned Ray) and its extra rules."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _yaml("ray-cluster/aws.yaml")
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    # Ray's AWS defaults add a system-wide `pip install boto3` to the head's setup, which
    # Ubuntu 24.04 refuses (PEP 668): only the venv's pip may run
    for cmd in prepared["head_setup_commands"] + prepared["worker_setup_commands"]:
        for m in re.finditer(r"(\S*)pip install", cmd):
            assert m.group(1).endswith("venv/bin/"), cmd
    import jsonschema

    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        validate_config(prepare_config(dict(copy.deepcopy(cfg), max_wokers=3)))


def test_compose_file_is_valid_against_the_compose_specification():
    spec = json.loads((SCHEMAS / "compose-spec.json").read_text())
    assert _errors(spec, _yaml("compose/docker-compose.yaml")) == []
    assert _errors(spec, {"services": {"x": {"image": "i", "portz": ["1:1"]}}})  # it does catch typos


def test_the_dataset_volume_is_mounted_where_the_jobs_read_it():
    cluster = _yaml("kuberay/raycluster.yaml")
    claims = {d["metadata"]["name"] for d in yaml.safe_load_all((DEPLOY / "kuberay/prereqs.yaml").read_text())
              if d["kind"] == "PersistentVolumeClaim"}
    pods = [cluster["spec"]["headGroupSpec"]["template"]["spec"]] + \
        [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    accounts = {d["metadata"]["name"] for d in yaml.safe_load_all((DEPLOY / "kuberay/prereqs.yaml").read_text())
                if d["kind"] == "ServiceAccount"}
    mounts = []
    for pod in pods:  # the driver (head) and every trial's node see the same folder
        assert pod["serviceAccountName"] in accounts  # what grants the bucket
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            for m in c.get("volumeMounts", []):
                if volumes[m["name"]].get("persistentVolumeClaim", {}).get("claimName") in claims:
                    mounts.append((m["mountPath"], m.get("readOnly", False)))
    assert len({p for p, _ in mounts}) == 1 and len(mounts) == len(pods), mounts
    mount = mounts[0][0]
    _, values = parse_orch(_yaml("kuberay/rayjob-search.yaml")["spec"]["entrypoint"])
    assert values["dataset"].startswith(f"imagefolder:{mount.rstrip('/')}/"), values["dataset"]


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
    assert "KubeRay ≥ 1.6.0" in readme
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
