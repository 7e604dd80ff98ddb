"""The Helm chart (deploy/helm/aimesh-tasks), rendered by tests/helm_template.py for the
three-group example on Redis and on RabbitMQ: every document valid against the Kubernetes
schemas (KEDA's CRDs field by field), every `aimesh` command parsed by the real CLI, every
endpoint queue scaled, and bad values refused naming the field."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from aimesh_tasks import keys
from aimesh_tasks.settings import Settings
from tests.deploy_parts import (
    AIMESH_IMAGE,
    K8S_VERSION,
    NON_AIMESH_ENV,
    SETTINGS_ENV,
    THREE_GROUPS,
    Doc,
    chart_values,
    command_queues,
    parse_aimesh,
    render_chart,
)
from tests.helm_template import TemplateError

BROKERS = ["redis", "rabbitmq"]


def rendered(broker: str = "redis", **more: Any) -> list[Doc]:
    return [doc for _, doc in render_chart(chart_values(broker, **more))]


def of_kind(docs: list[Doc], kind: str) -> dict[str, Doc]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def example_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(THREE_GROUPS.read_text())["endpointGroups"])


@pytest.mark.parametrize("broker", BROKERS)
def test_the_chart_renders_valid_kubernetes_documents(broker: str) -> None:
    docs = rendered(broker)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Secret", "Job",
            "NetworkPolicy", "ScaledObject", "TriggerAuthentication",
            "HorizontalPodAutoscaler"} <= kinds
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # CRDs: checked field by field below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two documents share a kind and name"
    assert {d["metadata"]["namespace"] for d in docs} == {"aimesh"}


@pytest.mark.parametrize("broker", BROKERS)
def test_every_endpoint_queue_of_every_group_has_a_scaler_or_a_fixed_count(broker: str) -> None:
    docs = rendered(broker)
    deployments = of_kind(docs, "Deployment")
    scalers = of_kind(docs, "ScaledObject")
    auth = of_kind(docs, "TriggerAuthentication")
    groups = example_groups()
    assert len(groups) == 3
    for group in groups:
        name = f"aimesh-endpoints-{group['name']}"
        command = deployments[name]["spec"]["template"]["spec"]["containers"][0]["command"]
        assert command_queues(command) == {keys.endpoint_queue(e) for e in group["endpoints"]}
        params = parse_aimesh(command).params
        assert params["endpoints"] == ",".join(group["endpoints"])
        if "keda" in group:
            assert "replicas" not in deployments[name]["spec"], "KEDA owns the count"
            scaler = scalers[name]
            assert scaler["spec"]["scaleTargetRef"]["name"] == name
            assert scaler["spec"]["minReplicaCount"] == group["keda"].get("minReplicas", 1)
            assert scaler["spec"]["maxReplicaCount"] == group["keda"]["maxReplicas"]
            assert scaled_queues(scaler, broker, auth) == command_queues(command)
        else:
            assert name not in scalers
            assert deployments[name]["spec"]["replicas"] == group["replicas"]
    router = deployments["aimesh-router"]["spec"]["template"]["spec"]["containers"][0]
    assert scaled_queues(scalers["aimesh-router"], broker, auth) == \
        command_queues(router["command"]) == {keys.ROUTE_QUEUE}
    assert set(scalers) <= set(deployments)


def scaled_queues(scaler: Doc, broker: str, auth: dict[str, Doc]) -> set[str]:
    """The queues a ScaledObject's triggers read, each trigger checked for `broker`."""
    queues = set()
    for trigger in scaler["spec"]["triggers"]:
        assert trigger["type"] == broker
        meta = trigger["metadata"]
        assert set(trigger) == {"type", "metadata", "authenticationRef"}
        assert trigger["authenticationRef"]["name"] in auth
        if broker == "redis":
            assert meta["address"] == "aimesh-redis.aimesh.svc.cluster.local:6379"
            assert meta["databaseIndex"] == "0" and int(meta["listLength"]) > 0
            queues.add(meta["listName"])
        else:
            assert meta["protocol"] == "amqp" and meta["mode"] == "QueueLength"
            assert int(meta["value"]) > 0
            queues.add(meta["queueName"])
        assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata is strings"
    return queues


@pytest.mark.parametrize("broker", BROKERS)
def test_the_secret_carries_urls_the_settings_accept_and_keda_logs_in_from_it(
        broker: str) -> None:
    docs = rendered(broker)
    secret = of_kind(docs, "Secret")["aimesh-secrets"]["stringData"]
    settings = Settings(**{k.removeprefix("AIMESH_").lower(): v for k, v in secret.items()
                           if k.startswith("AIMESH_")})
    broker_url = urlsplit(settings.broker_url)
    assert broker_url.scheme == ("redis" if broker == "redis" else "amqp")
    assert broker_url.password == secret.get("REDIS_PASSWORD" if broker == "redis"
                                             else "RABBITMQ_PASSWORD")
    if broker == "redis":
        assert broker_url.path == "/0", "the database index the scalers read"
    for url in (settings.result_backend, settings.redis_url):
        assert urlsplit(url).password == secret["REDIS_PASSWORD"]
    assert urlsplit(settings.database_url).password == secret["POSTGRES_PASSWORD"]
    assert settings.flower_basic_auth is not None
    (auth,) = of_kind(docs, "TriggerAuthentication").values()
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["name"] == "aimesh-secrets" and ref["key"] in secret
    assert ref["parameter"] == ("password" if broker == "redis" else "host")


def test_every_aimesh_container_runs_a_real_command_with_settings_fields_only() -> None:
    docs = rendered("redis")
    config = of_kind(docs, "ConfigMap")["aimesh-config"]["data"]
    assert set(config) <= SETTINGS_ENV
    for doc in docs:
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = doc["spec"]["template"]["spec"]
        for container in spec["containers"]:
            assert container["image"] == f"{AIMESH_IMAGE}:0.1.0"
            parse_aimesh(container["command"])
            env = {e["name"] for e in container.get("env", [])}
            assert env <= SETTINGS_ENV | NON_AIMESH_ENV, (doc["metadata"]["name"], env)
        assert spec["securityContext"]["runAsNonRoot"] is True
        if spec["containers"][0]["command"][1] == "worker":
            hard_limit_s = Settings.model_fields["task_time_limit_s"].default
            assert spec["terminationGracePeriodSeconds"] > hard_limit_s
    job = of_kind(docs, "Job")["aimesh-migrate"]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == \
        ["aimesh", "db", "upgrade"]
    assert "pre-upgrade" in job["metadata"]["annotations"]["helm.sh/hook"]


def test_a_group_without_keda_or_replicas_or_with_both_is_refused() -> None:
    both = [{"name": "g", "endpoints": ["a"], "replicas": 1, "keda": {"maxReplicas": 2}}]
    with pytest.raises(TemplateError, match=r"endpointGroups\[0\] \(g\): give replicas or "
                                            r"keda, not both"):
        rendered(endpointGroups=both)
    with pytest.raises(TemplateError, match="give replicas .* or keda"):
        rendered(endpointGroups=[{"name": "g", "endpoints": ["a"]}])
    assert rendered(endpointGroups=[{"name": "g", "endpoints": ["a"], "replicas": 0}])


def test_an_endpoint_in_two_groups_or_two_groups_of_one_name_are_refused() -> None:
    twice = [{"name": "a", "endpoints": ["x"], "replicas": 1},
             {"name": "b", "endpoints": ["y", "x"], "replicas": 1}]
    with pytest.raises(TemplateError, match="endpoint x is also in group a"):
        rendered(endpointGroups=twice)
    same = [{"name": "a", "endpoints": ["x"], "replicas": 1},
            {"name": "a", "endpoints": ["y"], "replicas": 1}]
    with pytest.raises(TemplateError, match="another group has this name"):
        rendered(endpointGroups=same)


@pytest.mark.parametrize("values,field", [
    ({"endpointGroups": [{"name": "Bad_Name", "endpoints": ["a"], "replicas": 1}]},
     "endpointGroups.0.name"),
    ({"endpointGroups": [{"name": "g", "endpoints": ["Not An Id"], "replicas": 1}]},
     "endpointGroups.0.endpoints.0"),
    ({"endpointGroups": [{"name": "g", "endpoints": [], "replicas": 1}]},
     "endpointGroups.0.endpoints"),
    ({"endpointGroups": [{"name": "g", "endpoints": ["a"], "keda": {"minReplicas": 1}}]},
     "endpointGroups.0.keda"),
    ({"endpointGroups": [{"name": "g", "endpoints": ["a"], "replicas": 1, "pol": "x"}]},
     "endpointGroups.0"),
    ({"broker": "kafka"}, "broker"),
    ({"config": {"AIMESH_BROKER_URL": "redis://x"}}, "config"),
    ({"config": {"LOG_LEVEL": "INFO"}}, "config"),
    ({"secrets": {"redisPassword": "short"}}, "secrets.redisPassword"),
    ({"secrets": {"redisPassword": "has/slash@and:colon-long-enough"}}, "secrets.redisPassword"),
])
def test_values_outside_the_schema_are_refused_naming_the_field(
        values: dict[str, Any], field: str) -> None:
    full = chart_values()
    full.update({k: v for k, v in values.items() if k != "secrets"})
    full["secrets"].update(values.get("secrets", {}))
    with pytest.raises(TemplateError, match=rf"- {field}: "):
        render_chart(full)


def test_missing_passwords_stop_the_render_with_the_way_to_give_them() -> None:
    values = chart_values()
    values["secrets"] = {}
    with pytest.raises(TemplateError, match="secrets.redisPassword: give Redis a password"):
        render_chart(values)
    values = chart_values("rabbitmq")
    values["secrets"].pop("rabbitmqPassword")
    with pytest.raises(TemplateError, match="secrets.rabbitmqPassword"):
        render_chart(values)


def test_an_existing_secret_and_external_stores_render_no_secret_or_store() -> None:
    values = chart_values(redis={"enabled": False, "host": "redis.example.internal"},
                          postgres={"enabled": False, "host": "pg.example.internal"})
    values["secrets"] = {"create": False, "existingSecret": "my-secrets"}
    docs = [d for _, d in render_chart(values)]
    assert not of_kind(docs, "Secret") and not of_kind(docs, "StatefulSet")
    for doc in docs:
        if doc["kind"] == "Deployment":
            refs = doc["spec"]["template"]["spec"]["containers"][0].get("envFrom", [])
            assert {"secretRef": {"name": "my-secrets"}} in refs or \
                doc["metadata"]["name"] == "aimesh-simulator"
    trigger = of_kind(docs, "ScaledObject")["aimesh-router"]["spec"]["triggers"][0]
    assert trigger["metadata"]["address"] == "redis.example.internal:6379"
    values["redis"] = {"enabled": False}
    with pytest.raises(TemplateError, match="redis.host: give your Redis server's host"):
        render_chart(values)
