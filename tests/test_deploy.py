"""deploy/ as CI can check it without a Docker engine or a cluster: the YAML parses, the Kubernetes
manifests validate against the Kubernetes schemas, every command and environment variable they use
is one the code really has, the KEDA list is the Redis key Celery queues into, and the worker's
liveness probe fails for a worker that stopped consuming. Images are not built here."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tomllib
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import botocore
import click
import kubernetes_validate
import pytest
import redis
import yaml

from clipbatch.cli import main as clipbatch_cli
from clipbatch.orchestration.client import Client
from clipbatch.core.config import Settings
from clipbatch.orchestration.schedule_file import load_schedule
from clipbatch.core.broker import EMBED_SHARD
from clipbatch.core.specs import JobSpec, ModelSpec
from tests.conftest import BIN, service_env, wait_for

ROOT = Path(__file__).resolve().parent.parent
DEPLOY, K8S = ROOT / "deploy", ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"  # the oldest release the manifests promise to work on
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}  # CRDs: no schema ships with kubernetes-validate
CODE_DIRS = ("clipbatch", "core", "orchestration", "tasks", "workers")
# Variables deploy/ sets that clipbatch does not read, and who does.
FOREIGN_ENV = {
    "REDIS_PASSWORD": "redis-server --requirepass and KEDA (keda.yaml)",
    "HOSTNAME": "set by Docker and Kubernetes; names the Celery node in probes",
    "MINIO_ROOT_USER": "MinIO", "MINIO_ROOT_PASSWORD": "MinIO", "MC_HOST_local": "the mc client",
    "CLIPBATCH_DATA": "compose: the host folder the mc tool mounts",
    "PYTHONDONTWRITEBYTECODE": "Python", "PYTHONUNBUFFERED": "Python", "PIP_NO_CACHE_DIR": "pip",
    "DEBIAN_FRONTEND": "apt", "VIRTUAL_ENV": "venv", "PATH": "the shell", "HOME": "the shell",
    "MINIO_APP_USER": "compose: the MinIO user limited to the bucket, made by createbucket",
    "MINIO_APP_SECRET": "compose: that user's secret", "FLOWER_BASIC_AUTH": "Flower",
    "FLOWER_PASSWORD": "compose: Flower's basic-auth password", "HF_HOME": "huggingface_hub (open_clip downloads)",
    "TORCH_HOME": "torch.hub", "XDG_CACHE_HOME": "libraries caching under ~/.cache",
}


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def generated_secrets() -> list[dict[str, Any]]:
    """The Secrets kustomize's secretGenerator makes, from each env file's committed ``.example``
    (the env files themselves hold the real values and are git-ignored)."""
    secrets = []
    for generator in kustomization().get("secretGenerator", []):
        data = {}
        for env_file in generator["envs"]:
            for line in (K8S / f"{env_file}.example").read_text().splitlines():
                if line.strip() and not line.startswith("#"):
                    key, _, value = line.partition("=")
                    data[key] = value
        secrets.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": generator["name"]},
                        "type": "Opaque", "stringData": data})
    return secrets


def manifests() -> list[dict[str, Any]]:
    return [d for name in kustomization()["resources"] for d in yaml_docs(K8S / name)] + generated_secrets()


def find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name)


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (DEPLOY / "Dockerfile").read_text().splitlines()
                                            if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def containers() -> Iterator[dict[str, Any]]:
    for doc in manifests():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        yield from spec.get("containers", [])


def commands() -> Iterator[list[str]]:
    """Every argv deploy/ runs: compose services, container commands and probes, Dockerfile CMD/HEALTHCHECK."""
    for service in compose()["services"].values():
        yield service.get("entrypoint", []) + service.get("command", [])
    for c in containers():
        yield c.get("command", [c["image"]]) + c.get("args", [])  # no command: args go to the image's entrypoint
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if "exec" in c.get(probe, {}):
                yield c[probe]["exec"]["command"]
    for instruction, rest in dockerfile_instructions():
        if instruction == "CMD":
            yield yaml.safe_load(rest)
        elif instruction == "HEALTHCHECK":
            yield ["sh", "-c", rest.split(" CMD ", 1)[1]]


def argvs() -> Iterator[list[str]]:
    """Commands with ``sh -c`` scripts split into their simple commands."""
    for argv in commands():
        if argv[:2] in (["sh", "-c"], ["/bin/sh", "-c"]):
            for part in re.split(r"\|\||&&|\||;", argv[2]):
                words = [w for w in shlex.split(part) if not w.startswith(">")]
                while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
                    words = words[1:]
                yield words[1:] if words[:1] == ["exec"] else words
        else:
            yield argv


def parse_clipbatch(argv: list[str]) -> click.Context:
    """Parse ``argv`` with the real CLI, down to its leaf command, without running anything."""
    command, args, ctx = clipbatch_cli, argv[1:], None
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        ctx = command.make_context(command.name or "clipbatch", [], parent=ctx, resilient_parsing=True)
        command, args = command.get_command(ctx, args[0]), args[1:]
        assert command is not None, f"{argv}: no such command"
    if args in ([], ["--help"]):  # an entrypoint that takes its arguments at run time, or help
        assert "--help" in command.get_help_option_names(click.Context(command))
        return click.Context(command, parent=ctx)
    return command.make_context(command.name, args, parent=ctx)


def env_names() -> dict[str, str]:
    """Every environment variable deploy/ sets or expands -> where."""
    names: dict[str, str] = {}
    for name, service in compose()["services"].items():
        for var in service.get("environment", {}):
            names[var] = f"compose.yaml {name}"
    for doc in manifests():
        if doc["kind"] in ("ConfigMap", "Secret"):
            for var in {**doc.get("data", {}), **doc.get("stringData", {})}:
                if re.fullmatch(r"[A-Z][A-Z0-9_]+", var):
                    names[var] = f"k8s {doc['kind']} {doc['metadata']['name']}"
    for c in containers():
        for var in c.get("env", []):
            names[var["name"]] = f"k8s container {c['name']}"
    text = (DEPLOY / "Dockerfile").read_text() + "\n".join(" ".join(a) for a in commands())
    text += (DEPLOY / "compose.yaml").read_text()
    for var in re.findall(r"\$\(?\{?([A-Z_][A-Z0-9_]*)", text):  # $(lowercase) is a shell command
        names.setdefault(var, "a $reference")
    build_args = set()
    for instruction, rest in dockerfile_instructions():
        for var in re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", rest):
            if instruction == "ENV":
                names[var] = "Dockerfile ENV"
            elif instruction == "ARG":  # build arguments, not the containers' environment
                build_args.add(var)
    return {var: where for var, where in names.items() if var not in build_args}


def test_every_yaml_file_parses_and_kustomization_lists_every_manifest():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.name for p in files} >= {"compose.yaml", "kustomization.yaml", "worker.yaml", "keda.yaml"}
    for path in files:
        assert yaml_docs(path), f"{path} is empty"
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_kubernetes_manifests_validate_against_the_kubernetes_schemas():
    # given: the strict schemas (unknown fields are errors), which do reject a typo
    worker = find("Deployment", "clipbatch-worker")
    typo = {**worker, "spec": {**worker["spec"], "replica": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)

    # when/then: every built-in object validates; the KEDA objects are the only ones without a schema
    validated, skipped = [], []
    for doc in manifests():
        if doc["kind"] in KEDA_KINDS:
            skipped.append(doc["kind"])
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        validated.append(doc["kind"])
    print(f"\n[k8s {KUBERNETES_VERSION}] validated {validated}; no schema (CRDs): {skipped}")
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret"} <= set(validated)


def test_keda_objects_have_the_fields_keda_reads():
    # KEDA's CRDs are not shipped with kubernetes-validate: check what its redis scaler needs by hand
    scaled = next(d for d in manifests() if d["kind"] == "ScaledObject")
    auth = next(d for d in manifests() if d["kind"] == "TriggerAuthentication")
    worker = find("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["minReplicaCount"] == 0 < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis" and all(isinstance(v, str) for v in meta.values()), "KEDA metadata are strings"
    assert {"host", "port", "listName", "listLength"} <= set(meta)
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    secret = find("Secret", auth["spec"]["secretTargetRef"][0]["name"])
    assert auth["spec"]["secretTargetRef"][0]["key"] in secret["stringData"]
    # the scaler talks to the Redis the workers use: same Service, namespace, port and database
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    service = find("Service", meta["host"].split(".")[0])
    assert meta["host"] == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    broker = urlparse(secret["stringData"]["CLIPBATCH_BROKER_URL"])
    assert (broker.hostname, broker.port) == (service["metadata"]["name"], int(meta["port"]))
    assert int(meta.get("databaseIndex", "0")) == int(broker.path.strip("/") or 0)
    assert worker["spec"]["template"]["spec"]["containers"][0]["command"][1] == "worker"


def test_commands_are_the_cli_s_own_and_parse():
    # given: every argv in deploy/ (compose, Kubernetes, Dockerfile, probes)
    parsed, other = [], []
    for argv in argvs():
        if not argv:
            continue
        # when: a clipbatch command is parsed by the real CLI (an unknown option or command fails)
        if argv[0] == "clipbatch":
            ctx = parse_clipbatch(argv)
            parsed.append(" ".join(argv[:3]))
            if argv[1:2] == ["worker"]:
                assert ctx.params["queues"] in ("gpu", "cpu") and ctx.params["hostname"] == "clipbatch@%h"
            if argv[1:2] == ["scheduler"]:
                assert ctx.params["config_path"].startswith("/etc/clipbatch/")
        # then: anything else is a known tool, and Celery's commands load our app
        else:
            assert argv[0] in ("celery", "redis-server", "redis-cli", "redis:7.2.5", "mc", "server", "grep", "exit",
                               "printf", "umask"), argv
            if argv[0] == "celery":
                assert argv[1:3] == ["-A", "clipbatch.tasks.app"] and argv[3] in ("inspect", "flower"), argv
            other.append(argv[0])
    print(f"\n[deploy commands] clipbatch: {sorted(set(parsed))}; other: {sorted(set(other))}")
    assert any("worker" in p for p in parsed) and any("scheduler" in p for p in parsed)


def test_env_vars_are_ones_the_code_or_a_named_tool_reads():
    code = "".join(p.read_text() for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))
    table = (ROOT / "docs" / "configuration.md").read_text()
    botocore_src = "".join(p.read_text() for p in Path(botocore.__file__).parent.glob("*.py"))
    names = env_names()
    for var, where in sorted(names.items()):
        if var.startswith("CLIPBATCH_") and var in FOREIGN_ENV:
            continue
        if var.startswith("CLIPBATCH_"):
            assert f'"{var}"' in code, f"{var} ({where}) is read nowhere in the code"
            assert f"`{var}`" in table, f"{var} ({where}) is missing from docs/configuration.md"
        elif var.startswith("AWS_"):
            known = var in botocore_src or (var.startswith("AWS_ENDPOINT_URL_") and "AWS_ENDPOINT_URL" in botocore_src)
            assert known, f"{var} ({where}) is not an AWS variable botocore reads"
        else:
            assert var in FOREIGN_ENV, f"{var} ({where}): say who reads it"
    assert {"CLIPBATCH_BROKER_URL", "CLIPBATCH_METRICS_PORT", "AWS_ENDPOINT_URL_S3"} <= set(names)


def test_compose_and_dockerfile_match_the_project():
    services = compose()["services"]
    assert "--appendonly yes" in services["redis"]["command"][0]
    assert "mc mb --ignore-existing local/clipbatch" in services["createbucket"]["command"][0]
    (device,) = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == 1 and "gpu" in device["capabilities"]
    assert parse_clipbatch(services["worker-cpu"]["command"]).params["device"] == "cpu"
    assert services["flower"]["command"][:4] == ["celery", "-A", "clipbatch.tasks.app", "flower"]
    # both schedules load with the scheduler's own reader
    assert load_schedule(DEPLOY / "schedule.toml")
    schedule = find("ConfigMap", "clipbatch-schedule")["data"]["schedule.toml"]
    assert tomllib.loads(schedule)["dataset"]
    # Dockerfile: two targets, non-root, a health check each, the Makefile's torch pins
    steps = dockerfile_instructions()
    stages = [rest.split()[-1] for instruction, rest in steps if instruction == "FROM"]
    assert stages == ["producer", "worker"]
    assert [rest for instruction, rest in steps if instruction == "USER"] == ["clipbatch", "clipbatch"]
    assert sum(instruction == "HEALTHCHECK" for instruction, _ in steps) == 2
    aarch64, x86_64 = re.findall(r"^TORCH_PINS := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    text = (DEPLOY / "Dockerfile").read_text()
    assert f'TORCH_PINS="{x86_64}"' in text and f"({aarch64})" in text


def test_workers_grace_period_covers_a_shard_and_liveness_is_short():
    worker = find("Deployment", "clipbatch-worker")["spec"]["template"]["spec"]
    visibility = int(find("ConfigMap", "clipbatch-config")["data"]["CLIPBATCH_VISIBILITY_TIMEOUT"])
    (container,) = worker["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert parse_clipbatch(container["command"]).params["concurrency"] == 1
    # a shard shorter than the visibility timeout always finishes within the grace period
    assert worker["terminationGracePeriodSeconds"] > visibility
    assert container["livenessProbe"]["terminationGracePeriodSeconds"] < visibility
    assert worker["securityContext"]["runAsNonRoot"] is True


@pytest.mark.integration
def test_keda_list_name_is_the_redis_key_holding_the_queue(redis_url, photo_shards, checkpoint, tmp_path):
    # given: the list KEDA measures, and the queue the scaled workers consume
    scaled = next(d for d in manifests() if d["kind"] == "ScaledObject")
    list_name = scaled["spec"]["triggers"][0]["metadata"]["listName"]
    worker = find("Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    queue = parse_clipbatch(worker["spec"]["template"]["spec"]["containers"][0]["command"]).params["queues"]
    assert queue == list_name
    r = redis.Redis.from_url(redis_url)
    r.delete(list_name)
    try:
        # when: a job is submitted to that queue with no worker running
        folder, built = photo_shards
        client = Client(Settings(**{**Settings.from_env().__dict__, "broker_url": redis_url}))
        client.submit(JobSpec(str(folder), str(tmp_path / "out"), ModelSpec("clipbatch-tiny", str(checkpoint)),
                              queue=queue))

        # then: LLEN on exactly that key counts its shard messages
        assert r.llen(list_name) == built["shards"]
        assert all(f'"task": "{EMBED_SHARD}"' in m.decode() for m in r.lrange(list_name, 0, -1))
        sizes = [len(m) for m in r.lrange(list_name, 0, -1)]
        print(f"\n[keda] LLEN {list_name} = {r.llen(list_name)} after submitting {built['shards']} shards "
              f"({sum(sizes) // len(sizes)} bytes a message)")
    finally:
        r.delete(list_name)


@pytest.mark.integration
def test_worker_liveness_probe_fails_for_a_worker_that_stopped_consuming(redis_url, tmp_path):
    # given: the worker container's own command (on the CPU here) and its liveness probe
    container = find("Deployment", "clipbatch-worker")["spec"]["template"]["spec"]["containers"][0]
    argv = [str(BIN / "clipbatch"), *container["command"][1:]]
    argv[argv.index("--device") + 1] = "cpu"
    env = service_env(redis_url, HOSTNAME=socket.gethostname(), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    probe = container["livenessProbe"]["exec"]["command"]
    healthcheck = next(rest for i, rest in dockerfile_instructions() if i == "HEALTHCHECK").split(" CMD ", 1)[1]
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: " ready." in log_path.read_text(errors="replace"), 120, "the worker to be ready")

        # when/then: it answers while consuming, not while stopped, and again once resumed
        assert subprocess.run(probe, env=env, capture_output=True).returncode == 0
        if shutil.which("hostname"):
            assert subprocess.run(["sh", "-c", healthcheck], env=env, capture_output=True).returncode == 0
        proc.send_signal(signal.SIGSTOP)
        stopped = subprocess.run(probe, env=env, capture_output=True, text=True)
        proc.send_signal(signal.SIGCONT)
        assert stopped.returncode != 0, stopped.stdout
        assert subprocess.run(probe, env=env, capture_output=True).returncode == 0
        print(f"\n[liveness] consuming: 0, stopped: {stopped.returncode} ({stopped.stderr.strip()[:80]}), resumed: 0")
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (CI validates with the schemas)")
def test_kustomize_builds_the_manifests_only_with_real_secrets(tmp_path):
    # given: a copy of deploy/k8s, first without secrets.env (as cloned), then with one
    k8s = tmp_path / "k8s"
    shutil.copytree(K8S, k8s, ignore=shutil.ignore_patterns("secrets.env"))
    unset = subprocess.run(["kubectl", "kustomize", str(k8s)], capture_output=True, text=True, timeout=60)
    example = (k8s / "secrets.env.example").read_text()
    (k8s / "secrets.env").write_text(example.replace("REDIS_PASSWORD=\n", "REDIS_PASSWORD=s3cret-for-test\n"))
    built = subprocess.run(["kubectl", "kustomize", str(k8s)], capture_output=True, text=True, timeout=60)

    # then: nothing builds while the values are missing; with them, the Secret holds them
    assert unset.returncode != 0 and "secrets.env" in unset.stderr
    assert built.returncode == 0, built.stderr
    docs = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert all(d["metadata"].get("namespace") == "clipbatch" for d in docs if d["kind"] != "Namespace")
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "clipbatch-secrets" and "REDIS_PASSWORD" in secret["data"]
