"""docker-compose.yml, the Dockerfile, deploy/k8s, Prometheus and the Grafana dashboard,
parsed and cross-checked against the code (no Docker engine or cluster here): schemas
validated offline (check-jsonschema's bundled compose-spec, kubernetes-validate's bundled
Kubernetes schemas), every `aimesh` command parsed by the real CLI, every AIMESH_*
variable a Settings field, every queue served and scaled, every scrape target a
service, every dashboard metric one the code exports."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError as K8sValidationError

from aimesh_tasks import keys
from aimesh_tasks.cli.main import cli
from aimesh_tasks.ingress.metrics import DURATION, IN_PROGRESS, REQUESTS
from aimesh_tasks.observability.exporter import ClusterCollector
from aimesh_tasks.observability.metrics import ALL_METRICS
from aimesh_tasks.settings import Settings
from tests.deploy_parts import (
    AIMESH_IMAGE,
    K8S_VERSION,
    NON_AIMESH_ENV,
    SETTINGS_ENV,
    command_queues,
    documented_secret,
    load_docs,
    parse_aimesh,
)

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
K8S = load_docs(sorted((ROOT / "deploy/k8s").glob("*.yaml")))
CHECK_JSONSCHEMA = str(Path(sys.executable).with_name("check-jsonschema"))
INGRESS_METRICS = (REQUESTS, DURATION, IN_PROGRESS)  # the ingress's own registry


def _aimesh_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in SERVICES.items() if s.get("image", "").startswith(AIMESH_IMAGE)}


# --- docker-compose.yml -------------------------------------------------------------------


def test_compose_file_is_valid_against_the_compose_spec() -> None:
    done = subprocess.run([CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec",
                           str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["redis"]["ports"] = {"not": "a list"}
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    done = subprocess.run([CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True)
    assert done.returncode != 0


def test_compose_has_every_role_and_each_aimesh_command_parses() -> None:
    services = _aimesh_services()
    commands = {name: s["command"] for name, s in services.items()}
    for command in commands.values():
        parse_aimesh(command)
    roles = {tuple(c[1:2]) for c in commands.values()}
    assert {("db",), ("worker",), ("flower",), ("metrics",), ("simulate",)} <= roles
    assert ["aimesh", "db", "upgrade"] in commands.values()
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name, service in services.items():
        if commands[name][1] == "worker":
            assert service["depends_on"]["migrate"]["condition"] == \
                "service_completed_successfully"
    assert {"redis", "postgres", "prometheus", "grafana"} <= set(SERVICES)


def test_compose_serves_every_queue_of_the_registered_endpoints(clean: None) -> None:
    """Register the endpoints with compose's own commands (the real CLI, the test
    database), then resolve each worker command's queues as `aimesh worker` does at start.
    A worker given `--endpoints all` also follows later registrations (the session's
    test workers run that way, so every end-to-end test relies on it)."""
    from typer.testing import CliRunner

    from aimesh_tasks.cli.worker import worker_queues
    from aimesh_tasks.registry import list_endpoints

    commands = [s["command"] for s in _aimesh_services().values()]
    adds = [c for c in commands if c[1:3] == ["endpoints", "add"]]
    assert adds, "no endpoint is registered"
    for command in adds:
        done = CliRunner().invoke(cli, command[1:])
        assert done.exit_code == 0, done.output
    registered = {e.id for e in list_endpoints()}
    assert registered == {c[3] for c in adds}
    served: set[str] = set()
    for command in (c for c in commands if c[1] == "worker"):
        params = parse_aimesh(command).params
        served |= set(worker_queues(params["router"], params["endpoints"], params["queues"]))
    assert keys.ROUTE_QUEUE in served
    missing = {keys.endpoint_queue(e) for e in registered} - served
    assert not missing, f"registered endpoints no worker serves: {missing}"


def test_compose_redis_keeps_every_message() -> None:
    command = SERVICES["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_compose_images_are_pinned_and_ours_is_built_here() -> None:
    for name, service in SERVICES.items():
        image = service["image"]
        if image.startswith(AIMESH_IMAGE):
            assert service.get("build") == ".", name
        else:
            assert ":" in image and not image.endswith(":latest"), name
    assert (ROOT / "Dockerfile").is_file()


def test_compose_environment_names_only_settings_fields() -> None:
    for name, service in _aimesh_services().items():
        env = set(service.get("environment", {}))
        unknown = {v for v in env if v not in SETTINGS_ENV and v not in NON_AIMESH_ENV}
        assert not unknown, f"{name}: {unknown} are not Settings fields"
    assert "AIMESH_FLOWER_BASIC_AUTH" in SERVICES["flower"]["environment"]
    for name, service in _aimesh_services().items():
        env = service["environment"]
        if "AIMESH_WORKER_METRICS_PORT" in env:
            assert "PROMETHEUS_MULTIPROC_DIR" in env, name


def test_compose_mounts_exist() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source}"


def _port_of(service: dict[str, Any]) -> set[int]:
    command = service.get("command", [])
    ports = {int(command[command.index("--port") + 1])} if "--port" in command else set()
    env = service.get("environment", {})
    if "AIMESH_WORKER_METRICS_PORT" in env:
        ports.add(int(env["AIMESH_WORKER_METRICS_PORT"]))
    return ports


def test_every_prometheus_target_is_a_service_listening_on_that_port() -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    targets: list[tuple[str, int]] = []
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets += [(t.split(":")[0], int(t.split(":")[1])) for t in static["targets"]]
        for dns in job.get("dns_sd_configs", []):
            targets += [(n, int(dns["port"])) for n in dns["names"]]
    assert targets
    for host, port in targets:
        assert host in SERVICES, host
        assert port in _port_of(SERVICES[host]), (host, port)
    scraped = {h for h, _ in targets}
    for name, service in _aimesh_services().items():
        if "AIMESH_WORKER_METRICS_PORT" in service["environment"] or \
                service["command"][1] == "metrics":
            assert name in scraped, f"{name} exports metrics nobody scrapes"
    mount = SERVICES["prometheus"]["volumes"][0]
    assert mount.startswith("./deploy/prometheus.yml:")


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+(?: \S+)*) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


# --- Kubernetes ---------------------------------------------------------------------------


def test_kubernetes_manifests_are_valid_against_bundled_schemas() -> None:
    kinds = set()
    for _, doc in K8S:
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: checked field by field below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    assert {"Deployment", "Service", "ConfigMap", "Job", "ScaledObject"} <= kinds


def test_kubernetes_validation_rejects_a_broken_deployment() -> None:
    deployment = next(copy.deepcopy(d) for _, d in K8S if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(K8sValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _containers(kind: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for _, doc in K8S:
        if doc["kind"] == kind:
            spec = doc["spec"]["template"]["spec"]
            found += [(doc["metadata"]["name"], c) for c in spec["containers"]]
    return found


def test_kubernetes_commands_parse_and_env_names_settings_fields() -> None:
    config_maps = {d["metadata"]["name"]: d for _, d in K8S if d["kind"] == "ConfigMap"}
    for cm in config_maps.values():
        unknown = set(cm["data"]) - SETTINGS_ENV
        assert not unknown, unknown
    for name, container in _containers("Deployment") + _containers("Job"):
        parse_aimesh(container["command"])
        assert container["image"].startswith(AIMESH_IMAGE)
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                assert source["configMapRef"]["name"] in config_maps, name
            else:
                assert source["secretRef"]["name"] == "aimesh-secrets", name
        env = {e["name"] for e in container.get("env", [])}
        assert env <= SETTINGS_ENV | NON_AIMESH_ENV, (name, env)
    assert any(c["command"] == ["aimesh", "db", "upgrade"] for _, c in _containers("Job"))


def test_every_worker_queue_has_a_worker_group_and_a_keda_scaler() -> None:
    workers = {name: c for name, c in _containers("Deployment") if c["command"][1] == "worker"}
    served = {name: command_queues(c["command"]) for name, c in workers.items()}
    scalers = [d for _, d in K8S if d["kind"] == "ScaledObject"]
    scaled: dict[str, set[str]] = {}
    for scaler in scalers:
        target = scaler["spec"]["scaleTargetRef"]["name"]
        assert target in workers, f"ScaledObject targets unknown Deployment {target}"
        for trigger in scaler["spec"]["triggers"]:
            assert trigger["type"] == "redis"
            meta = trigger["metadata"]
            assert meta["listName"] in served[target], (target, meta["listName"])
            assert int(meta["listLength"]) > 0 and meta["databaseIndex"] == "0"
            scaled.setdefault(target, set()).add(meta["listName"])
    assert keys.ROUTE_QUEUE in set().union(*served.values())
    assert any(q.startswith(keys.ENDPOINT_QUEUE_PREFIX) for qs in served.values() for q in qs)
    for name, queues in served.items():
        assert queues, f"{name} serves no fixed queue: KEDA cannot scale it"
        assert scaled.get(name) == queues, f"{name}: queues {queues}, scaled {scaled.get(name)}"
    broker = documented_secret()["AIMESH_BROKER_URL"]  # it carries the Redis password
    assert broker.endswith("/0")  # the database index the scalers read


def test_workers_get_time_to_finish_their_tasks_on_shutdown() -> None:
    hard_limit_s = Settings.model_fields["task_time_limit_s"].default
    for _, doc in K8S:
        if doc["kind"] == "Deployment":
            spec = doc["spec"]["template"]["spec"]
            if spec["containers"][0]["command"][1] == "worker":
                assert spec["terminationGracePeriodSeconds"] > hard_limit_s
                assert spec["securityContext"]["runAsNonRoot"] is True


# --- Grafana ------------------------------------------------------------------------------


def _exported() -> dict[str, set[str]]:
    """Every sample name the code exports -> its label names."""
    names: dict[str, set[str]] = {}
    for metric in (*ALL_METRICS, *INGRESS_METRICS):
        labels = set(metric._labelnames)
        family = metric.describe()[0]
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                    "gauge": [""]}
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    for family in ClusterCollector(broker=None).describe():  # type: ignore[arg-type]
        names[family.name] = set(family._labelnames)
    return names


def test_dashboard_queries_name_only_exported_metrics_and_labels() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/aimesh.json").read_text())
    exported = _exported()
    panels = _dashboard_panels(dashboard)
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert exprs
    used: set[str] = set()
    for expr in exprs:
        metrics = set(re.findall(r"\baimesh_[a-z0-9_]+", expr))
        assert metrics and metrics <= set(exported), (expr, metrics - set(exported))
        used |= metrics
        labels = set().union(*(exported[m] for m in metrics))
        for group in re.findall(r"by \(([^)]*)\)", expr):
            grouped = {g.strip() for g in group.split(",")}
            assert grouped <= labels, (expr, grouped - labels)
        for selector in re.findall(r"\{([^}]*)\}", expr):
            assert {s.split("=")[0] for s in selector.split(",")} <= labels, expr
    wanted = {"aimesh_end_to_end_latency_seconds_bucket", "aimesh_agent_cost_usd_total",
              "aimesh_queue_depth_messages", "aimesh_ingress_requests_total",
              "aimesh_ingress_request_duration_seconds_bucket"}
    assert wanted <= used
    provisioning = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yaml").read_text())
    uids = {d["uid"] for d in provisioning["datasources"]}
    assert {p["datasource"]["uid"] for p in panels} <= uids
    ids = [p["id"] for p in dashboard["panels"]] + [
        c["id"] for p in dashboard["panels"] for c in p.get("panels", [])]
    assert len(ids) == len(set(ids)), "two panels share an id"


def _dashboard_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel with queries: rows hold none (a collapsed row keeps its panels inside)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found
