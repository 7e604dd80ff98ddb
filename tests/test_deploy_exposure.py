"""A cluster others can join must not be open to them: the exposure lint
(tests/deploy_parts.py) on docker-compose.yml with and without its RabbitMQ override,
on deploy/k8s (and its RabbitMQ variant), and on the rendered chart; and the lint itself,
shown to catch each thing it looks for."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from aimesh_tasks import keys
from tests.deploy_parts import (
    K8S_VERSION,
    ROOT,
    Doc,
    chart_values,
    compose_problems,
    documented_secret,
    kubernetes_problems,
    load_docs,
    merge_compose,
    render_chart,
)

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
RABBIT_OVERRIDE = yaml.safe_load((ROOT / "docker-compose.rabbitmq.yml").read_text())
K8S = load_docs(sorted((ROOT / "deploy/k8s").glob("*.yaml")))
K8S_RABBIT = load_docs(sorted((ROOT / "deploy/k8s/rabbitmq").glob("*.yaml")))
CHECK_JSONSCHEMA = str(Path(sys.executable).with_name("check-jsonschema"))


# --- compose -----------------------------------------------------------------------------


def test_compose_is_closed_to_strangers() -> None:
    assert compose_problems(COMPOSE) == []
    assert compose_problems(merge_compose(COMPOSE, RABBIT_OVERRIDE)) == []


def test_compose_publishes_only_authenticated_services_on_loopback() -> None:
    published = {name for name, s in COMPOSE["services"].items() if s.get("ports")}
    assert published == {"flower", "ingress", "grafana"}  # basic auth, keys, a password


def test_the_rabbitmq_override_is_valid_and_moves_every_broker_user() -> None:
    done = subprocess.run([CHECK_JSONSCHEMA, "--builtin-schema", "vendor.compose-spec",
                           str(ROOT / "docker-compose.rabbitmq.yml")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    merged = merge_compose(COMPOSE, RABBIT_OVERRIDE)
    for name, service in merged["services"].items():
        command = service.get("command") or []
        if command[:2] in (["aimesh", "worker"], ["aimesh", "flower"], ["aimesh", "metrics"],
                           ["aimesh", "ingress"]):
            assert service["environment"]["AIMESH_BROKER_URL"].startswith("amqp://"), name
            assert service["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
            assert service["environment"]["AIMESH_REDIS_URL"].startswith("redis://")
            assert service["depends_on"]["migrate"]["condition"] == \
                "service_completed_successfully", "the override keeps the base's order"


def test_the_env_example_names_every_variable_compose_requires() -> None:
    text = (ROOT / "docker-compose.yml").read_text() + \
        (ROOT / "docker-compose.rabbitmq.yml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+):\?", text))
    example = (ROOT / ".env.example").read_text()
    given = set(re.findall(r"^#? ?([A-Z_]+)=", example, re.M))
    assert required and required <= given, required - given
    assert ".env" in (ROOT / ".gitignore").read_text().split()
    assert ".env" in (ROOT / ".dockerignore").read_text().split()


def _broken(change: Any) -> list[str]:
    compose = copy.deepcopy(COMPOSE)
    change(compose["services"])
    return compose_problems(compose)


@pytest.mark.parametrize("change,expected", [
    (lambda s: s["flower"].update(ports=["5555:5555"]), "binds to all addresses"),
    (lambda s: s["ingress"].update(ports=["${BIND:-0.0.0.0}:8080:8080"]), "binds to 0.0.0.0"),
    (lambda s: s["grafana"].update(ports=[{"target": 3000, "published": 3000}]),
     "binds to all"),
    (lambda s: s["prometheus"].update(ports=["127.0.0.1:9090:9090"]), "prometheus: publishes"),
    (lambda s: s["redis"].update(ports=["127.0.0.1:6379:6379"]), "redis: publishes"),
    (lambda s: s["redis"].update(command=["redis-server", "--appendonly", "yes"]),
     "redis: --requirepass must be"),
    (lambda s: s["redis"].update(command=["redis-server", "--requirepass", "hunter2"]),
     "redis: --requirepass must be"),
    (lambda s: s["postgres"]["environment"].update(POSTGRES_PASSWORD="${PG:-aimesh}"),
     "postgres: POSTGRES_PASSWORD must be"),
    (lambda s: s["router"].update(environment={"AIMESH_BROKER_URL": "redis://redis:6379/0"}),
     "router: AIMESH_BROKER_URL: the URL's password"),
    (lambda s: s["router"].update(environment={
        "AIMESH_DATABASE_URL": "postgresql://aimesh:aimesh@postgres:5432/aimesh"}),
     "the URL's password"),
    (lambda s: s["router"].update(environment={
        "AIMESH_REDIS_URL": "redis://:${OTHER:?x}@redis:6379/1"}),
     "the password is $OTHER, but redis requires $REDIS_PASSWORD"),
])
def test_the_compose_lint_catches_each_opening(change: Any, expected: str) -> None:
    problems = _broken(change)
    assert any(expected in p for p in problems), problems


# --- Kubernetes: raw manifests and the rendered chart ------------------------------------


def test_the_raw_manifests_are_closed_to_strangers() -> None:
    assert kubernetes_problems(K8S) == []
    assert kubernetes_problems(K8S + K8S_RABBIT) == []
    stores = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
              for _, d in K8S + K8S_RABBIT if d["kind"] == "StatefulSet"}
    assert stores == {"redis", "postgres", "rabbitmq"}


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_the_rendered_chart_is_closed_to_strangers(broker: str) -> None:
    docs = render_chart(chart_values(broker))
    assert kubernetes_problems(docs) == []
    stores = {d["metadata"]["name"] for _, d in docs if d["kind"] == "StatefulSet"}
    assert stores == {"aimesh-redis", "aimesh-postgres"} | (
        {"aimesh-rabbitmq"} if broker == "rabbitmq" else set())


def test_the_broker_admits_keda_and_the_database_does_not() -> None:
    policies = {d["metadata"]["name"]: d for _, d in K8S + K8S_RABBIT
                if d["kind"] == "NetworkPolicy"}

    def namespaces(name: str) -> list[Any]:
        return [p.get("namespaceSelector") for rule in policies[name]["spec"]["ingress"]
                for p in rule["from"] if "namespaceSelector" in p]
    assert namespaces("redis") == namespaces("rabbitmq") == \
        [{"matchLabels": {"kubernetes.io/metadata.name": "keda"}}]
    assert namespaces("postgres") == []


def test_the_rabbitmq_variant_scales_the_same_deployments_on_rabbitmq() -> None:
    base = {d["metadata"]["name"]: d for _, d in K8S if d["kind"] == "ScaledObject"}
    variant = {d["metadata"]["name"]: d for _, d in K8S_RABBIT if d["kind"] == "ScaledObject"}
    assert set(variant) == set(base)
    for name, scaler in variant.items():
        assert scaler["spec"]["scaleTargetRef"] == base[name]["spec"]["scaleTargetRef"]
        (old,), (new,) = base[name]["spec"]["triggers"], scaler["spec"]["triggers"]
        assert new["type"] == "rabbitmq" and new["metadata"]["mode"] == "QueueLength"
        assert new["metadata"]["queueName"] == old["metadata"]["listName"]
        assert new["authenticationRef"] == old["authenticationRef"] == {"name": "aimesh-broker"}
    auth = {d["metadata"]["name"]: d for _, d in K8S_RABBIT
            if d["kind"] == "TriggerAuthentication"}
    assert auth["aimesh-broker"]["spec"]["secretTargetRef"][0]["key"] == "AIMESH_BROKER_URL"
    assert keys.ROUTE_QUEUE in {s["spec"]["triggers"][0]["metadata"]["queueName"]
                                for s in variant.values()}
    for _, doc in K8S_RABBIT:
        if not doc["apiVersion"].startswith("keda.sh/"):
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_documented_secret_puts_the_passwords_in_the_urls() -> None:
    secret = documented_secret()
    for key in ("AIMESH_BROKER_URL", "AIMESH_RESULT_BACKEND", "AIMESH_REDIS_URL"):
        assert secret[key].startswith(f"redis://:{secret['REDIS_PASSWORD']}@redis."), key
    assert f":{secret['POSTGRES_PASSWORD']}@postgres." in secret["AIMESH_DATABASE_URL"]
    auth = next(d for _, d in K8S if d["kind"] == "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"][0]["key"] in secret


def _doc(docs: list[tuple[str, Doc]], kind: str, name: str) -> Doc:
    return next(d for _, d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def _k8s_broken(change: Any) -> list[str]:
    docs = copy.deepcopy(K8S)
    change(docs)
    return kubernetes_problems(docs)


@pytest.mark.parametrize("change,expected", [
    (lambda d: _doc(d, "Service", "aimesh-flower")["spec"].update(type="NodePort"),
     "type NodePort"),
    (lambda d: _doc(d, "Service", "redis")["spec"].update(type="LoadBalancer"),
     "type LoadBalancer"),
    (lambda d: _doc(d, "Service", "aimesh-metrics")["spec"].update(externalIPs=["1.2.3.4"]),
     "externalIPs"),
    (lambda d: _doc(d, "ConfigMap", "aimesh-config")["data"].update(
        AIMESH_REDIS_URL="redis://redis:6379/1"), "holds a URL"),
    (lambda d: _doc(d, "Deployment", "aimesh-router")["spec"]["template"]["spec"].update(
        hostNetwork=True), "host networking"),
    (lambda d: d.remove(next(x for x in d if x[1]["kind"] == "NetworkPolicy"
                             and x[1]["metadata"]["name"] == "redis")),
     "redis: no NetworkPolicy selects it"),
    (lambda d: _doc(d, "NetworkPolicy", "postgres")["spec"]["ingress"][0].update(
        {"from": []}), "admits everyone"),
    (lambda d: _doc(d, "NetworkPolicy", "postgres")["spec"]["ingress"][0]["from"].append(
        {"podSelector": {}}), "not only aimesh clients"),
    (lambda d: _doc(d, "NetworkPolicy", "redis")["spec"]["ingress"][0]["from"].append(
        {"namespaceSelector": {}}), "another namespace's pods"),
    (lambda d: _doc(d, "NetworkPolicy", "redis")["spec"]["ingress"][0]["from"].append(
        {"ipBlock": {"cidr": "0.0.0.0/0"}}), "ipBlock"),
    (lambda d: _doc(d, "NetworkPolicy", "redis")["spec"]["ingress"][0].update(
        ports=[{"port": 6379}, {"port": 16379}]), "not only 6379"),
    (lambda d: _doc(d, "StatefulSet", "redis")["spec"]["template"]["spec"]["containers"][0]
     .update(command=["redis-server"]), "needs --requirepass"),
    (lambda d: _doc(d, "StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"][0]
     ["env"].__setitem__(2, {"name": "POSTGRES_PASSWORD", "value": "aimesh"}),
     "POSTGRES_PASSWORD must come from a Secret"),
    (lambda d: _doc(d, "Deployment", "aimesh-simulator")["spec"]["template"]["metadata"]
     ["labels"].update({"aimesh-tasks/client": "true"}), "the simulator"),
])
def test_the_kubernetes_lint_catches_each_opening(change: Any, expected: str) -> None:
    problems = _k8s_broken(change)
    assert any(expected in p for p in problems), problems
