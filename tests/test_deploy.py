"""The cluster deployment, checked offline: KubeRay manifests against the vendored CRD schemas (strictly),
the embedded Serve config against Ray's own schema, the job entry points and configs they name, the image."""

import gzip
import os
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import yaml
from conftest import REPO

from jointray.config import load_config

K8S = REPO / "deploy" / "k8s"
SCHEMAS = {"RayCluster": "ray.io_rayclusters", "RayJob": "ray.io_rayjobs", "RayService": "ray.io_rayservices"}
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _documents() -> list[tuple[str, dict]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml"))
            for doc in yaml.load_all(path.read_text(), Loader=Loader) if doc]


def _strict(schema):
    """The schema with ``additionalProperties: false`` on every object that lists its properties and does not
    keep unknown fields on purpose (``x-kubernetes-preserve-unknown-fields``): the API server's strict field
    validation, which plain JSON Schema would not do (it accepts any extra key)."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (strict.get("type") == "object" and isinstance(strict.get("properties"), dict)
            and "additionalProperties" not in strict and not strict.get("x-kubernetes-preserve-unknown-fields")):
        strict["additionalProperties"] = False
    return strict


@cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.load(gzip.decompress((K8S / "schemas" / f"{SCHEMAS[kind]}.yaml.gz").read_bytes()), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _crs() -> list[tuple[str, dict]]:
    return [(name, doc) for name, doc in _documents() if doc["kind"] in SCHEMAS]


def _settings() -> dict[str, str]:
    (settings,) = [doc for _, doc in _documents() if doc["kind"] == "ConfigMap" and
                   doc["metadata"]["name"] == "jointray-settings"]
    return settings["data"]


def _ray_version() -> str:
    return re.search(r"^ray==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def test_every_manifest_is_valid_against_the_kuberay_v1_schema_and_unknown_fields_fail():
    crs = _crs()
    assert sorted(doc["kind"] for _, doc in crs) == ["RayCluster", "RayJob", "RayJob", "RayService"]
    for name, doc in crs:
        assert doc["apiVersion"] == "ray.io/v1", name
        assert set(doc["metadata"]) <= {"name", "namespace", "labels", "annotations"}, name
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in _validator(doc["kind"]).iter_errors(doc)]
        assert not errors, f"{name}: {errors}"
    # The check has teeth: a misspelt field anywhere in the tree, or a wrong type, fails.
    name, job = next((n, d) for n, d in crs if d["kind"] == "RayJob")
    job["spec"]["shutdownAfterJobFinish"] = True
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resource"] = {}
    job["spec"]["ttlSecondsAfterFinished"] = "an hour"
    messages = sorted(e.message for e in _validator("RayJob").iter_errors(job))
    assert len(messages) == 3 and any("shutdownAfterJobFinish" in m for m in messages), messages
    assert any("'resource' was unexpected" in m for m in messages) and any("'an hour'" in m for m in messages)


def test_gpu_workers_cpu_heads_lifetimes_and_storage():
    ray_version = _ray_version()
    for name, doc in _crs():
        spec = doc["spec"]
        cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        assert cluster["rayVersion"] == ray_version, name
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0", name  # the head never holds a training worker
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"], name
        for group in cluster["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            resources = container["resources"]
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"], name
            assert container["image"] == head["template"]["spec"]["containers"][0]["image"], name
        for pod in [head, *cluster["workerGroupSpecs"]]:  # every node reads and writes the S3 store
            (container,) = pod["template"]["spec"]["containers"]
            assert {"configMapRef": {"name": "jointray-settings"}} in container["envFrom"], name
            assert {"secretRef": {"name": "jointray-s3", "optional": True}} in container["envFrom"], name
        claims = [v["persistentVolumeClaim"]["claimName"] for v in head["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert claims == ["jointray-data"], name
        if doc["kind"] == "RayJob":
            assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
            assert spec["activeDeadlineSeconds"] > 0 and spec["submissionMode"] == "K8sJobMode"
    # Runs, checkpoints and searches on an S3-compatible store ...
    assert _settings()["JOINTRAY_RUNS"].startswith("s3://") and _settings()["JOINTRAY_SEARCHES"].startswith("s3://")
    assert _settings()["JOINTRAY_PREPARED"].startswith("/mnt/jointray/")  # ... shards on the shared volume


def test_the_rayservice_serve_config_passes_rays_own_schema_and_builds_our_app():
    from ray.serve.schema import ServeDeploySchema

    from jointray.serve.app import AppArgs

    (service,) = [doc for _, doc in _crs() if doc["kind"] == "RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    schema = ServeDeploySchema.model_validate(config)
    assert schema.http_options.host == "0.0.0.0"  # inside the pod; the local config file keeps the loopback
    assert yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["http_options"]["host"] == "127.0.0.1"
    (app,) = config["applications"]
    assert app["import_path"] == "jointray.serve.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.checkpoint.startswith(_settings()["JOINTRAY_RUNS"] + "/")  # the training run's, served from S3
    load_config(None, args.overrides)  # the overrides name real serve/inference keys
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"Ingress", "ModelServer"}
    assert deployments["ModelServer"]["ray_actor_options"]["num_gpus"] == 1.0
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert sum(g["replicas"] for g in workers) >= deployments["ModelServer"]["num_replicas"]
    probe = workers[0]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": config["http_options"]["port"]}


def _entrypoint_commands() -> list[tuple[str, list[str]]]:
    commands = []
    for name, doc in _crs():
        if doc["kind"] == "RayJob":
            for part in doc["spec"]["entrypoint"].split("&&"):
                commands.append((name, shlex.split(part)))
    return commands


def test_the_job_entrypoints_are_commands_that_exist_with_configs_that_load():
    settings = _settings()
    commands = _entrypoint_commands()
    assert [Path(argv[1]).name for _, argv in commands] == ["prepare.py", "train.py", "tune.py"]
    env = os.environ | {"RAY_ADDRESS": "", "PYTHONPATH": str(REPO)}
    for name, argv in commands:
        assert argv[0] == "python" and (REPO / argv[1]).is_file(), (name, argv)
        shown = subprocess.run([sys.executable, str(REPO / argv[1]), "--help"], capture_output=True, text=True,
                               env=env, timeout=120)
        assert shown.returncode == 0 and "--config" in shown.stdout, (argv[1], shown.stdout, shown.stderr)
        # The config the job would run: the named built-in config with the job's overrides, the pod's settings in.
        config, overrides = argv[argv.index("--config") + 1], argv[argv.index("--config") + 2:]
        expanded = [re.sub(r"\$(\w+)", lambda m: settings[m.group(1)], o) for o in overrides]
        cfg = load_config(config, expanded)
        assert str(cfg.data.root) == settings["JOINTRAY_DATA"] and str(cfg.data.output) == settings["JOINTRAY_PREPARED"]
        if Path(argv[1]).name == "train.py":
            assert cfg.train.storage_path == settings["JOINTRAY_RUNS"] and cfg.train.workers >= 1


def test_the_image_copies_what_exists_and_installs_as_the_makefile_does():
    dockerfile = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1) == _ray_version()
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", dockerfile, re.M):
        *sources, _ = line.split()
        for source in sources:
            assert (REPO / source).exists(), source
    # The same two installs, against the same constraints file: torch first and pinned, then the project.
    ours = re.findall(r"pip install (?:-q )?-c constraints\.txt (torch==\S+|-e \S+)", makefile)
    theirs = re.findall(r"pip install --no-cache-dir -c constraints\.txt (torch==\S+|-e \S+)", dockerfile)
    assert ours == ["torch==2.13.0", '-e ".[dev]"'] and theirs == ["torch==2.13.0", "-e ."]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "tests"} <= set(ignored)
