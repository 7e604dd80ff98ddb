"""What the deploy tests share: the deployment files loaded, `aimesh` command lines parsed
by the real CLI, the chart rendered, and the exposure lint ("closed to strangers") run on
compose files and Kubernetes documents alike."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import typer.main
import yaml

from aimesh_tasks import keys
from aimesh_tasks.cli.main import cli
from aimesh_tasks.settings import Settings
from tests.helm_template import Chart, manifests, render

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.30.0"
AIMESH_IMAGE = "aimesh-tasks"
NON_AIMESH_ENV = {"PROMETHEUS_MULTIPROC_DIR"}  # prometheus-client's own variable
CHART = ROOT / "deploy/helm/aimesh-tasks"
THREE_GROUPS = ROOT / "deploy/helm/examples/three-groups.yaml"
Doc = dict[str, Any]


def settings_env_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(f"AIMESH_{name.upper()}")
        alias = field.validation_alias
        names.update(getattr(alias, "choices", []) or [])
    return names


SETTINGS_ENV = settings_env_names()


def parse_aimesh(command: list[str]) -> Any:
    """Parse an `aimesh ...` command line with the real CLI, without running it (typer
    vendors its own click, so commands are told apart by their `commands` attribute)."""
    assert command[0] == "aimesh", command
    node: Any = typer.main.get_command(cli)
    args = command[1:]
    while hasattr(node, "commands"):
        sub = node.get_command(node.context_class(node), args[0])
        assert sub is not None, f"no command {args[0]!r} in {command}"
        node, args = sub, args[1:]
    return node.make_context(node.name or "", list(args), resilient_parsing=False)


def command_queues(command: list[str]) -> set[str]:
    """The fixed queues an `aimesh worker` command line consumes."""
    params = parse_aimesh(command).params
    queues = {keys.ROUTE_QUEUE} if params.get("router") else set()
    for endpoint_id in (params.get("endpoints") or "").split(","):
        if endpoint_id and endpoint_id != "all":
            queues.add(keys.endpoint_queue(endpoint_id))
    return queues


def load_docs(paths: Iterable[Path]) -> list[tuple[str, Doc]]:
    return [(path.name, doc) for path in paths
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def documented_secret() -> dict[str, str]:
    """The Secret `aimesh-secrets` as the `kubectl create secret` command in the header of
    deploy/k8s/configmap.yaml makes it (its $VARIABLES left as they are)."""
    text = (ROOT / "deploy/k8s/configmap.yaml").read_text()
    return dict(re.findall(r"--from-literal=([A-Z_]+)=(\S+)", text))


TEST_PASSWORDS = {"redisPassword": "r" * 24, "postgresPassword": "p" * 24,
                  "rabbitmqPassword": "q" * 24, "flowerBasicAuth": "admin:f00"}


def chart_values(broker: str = "redis", **more: Any) -> dict[str, Any]:
    """The three-group example with passwords set (as --set would), on `broker`."""
    values = yaml.safe_load(THREE_GROUPS.read_text())
    values["broker"] = broker
    values.setdefault("secrets", {}).update(TEST_PASSWORDS)
    values.update(more)
    return values


def render_chart(values: dict[str, Any]) -> list[tuple[str, Doc]]:
    return manifests(render(Chart.load(CHART), values))


# --- the exposure lint -------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
STORE_PORTS = {"redis": 6379, "postgres": 5432, "rabbitmq": 5672}
URL_SCHEMES = ("redis://", "rediss://", "amqp://", "amqps://", "postgresql://")


def with_defaults(text: str) -> str:
    """`text` as compose interpolates it with no variable set (defaults applied)."""
    return _INTERPOLATION.sub(lambda m: m.group(3) if m.group(2) in (":-", "-") else "", text)


def required_variable(text: str) -> str | None:
    """The variable `text` is, if it is exactly one `${VAR:?...}` (set, non-empty, no default)."""
    match = _INTERPOLATION.fullmatch(text)
    return match.group(1) if match and match.group(2) == ":?" else None


def merge_compose(base: Doc, override: Doc) -> Doc:
    """Compose's merge of an override file: services merge key by key, mappings merge."""
    merged = yaml.safe_load(yaml.safe_dump(base))
    for section in ("services", "volumes"):
        for name, value in (override.get(section) or {}).items():
            old = merged.setdefault(section, {}).get(name)
            merged[section][name] = _merge(old, value) if isinstance(old, dict) else value
    return merged


def _merge(old: Any, new: Any) -> Any:
    if isinstance(old, dict) and isinstance(new, dict):
        return {**old, **{k: _merge(old.get(k), v) for k, v in new.items()}}
    return new


def compose_problems(compose: Doc) -> list[str]:
    """What in a compose project is open to strangers: ports bound beyond loopback, data
    stores or Prometheus published, stores without passwords, URLs without them."""
    problems: list[str] = []
    services: dict[str, Doc] = compose["services"]
    for name, service in services.items():
        problems += _published_problems(name, service)
    problems += _store_password_problems(services)
    for name, service in services.items():
        for variable, value in _environment(service).items():
            problems += _url_problems(f"{name}: {variable}", str(value), services)
    return problems


def _published_problems(name: str, service: Doc) -> list[str]:
    ports = service.get("ports") or []
    if ports and (name in STORE_PORTS or name == "prometheus"):
        return [f"{name}: publishes {ports}; it has no business on the host network"]
    problems = []
    for port in ports:
        host_ip = port.get("host_ip", "") if isinstance(port, dict) else _host_ip(str(port))
        if with_defaults(host_ip) != "127.0.0.1":
            problems.append(f"{name}: port {port!r} binds to {with_defaults(host_ip) or 'all'}"
                            " addresses by default, not 127.0.0.1")
    return problems


def _host_ip(port: str) -> str:
    """The host address of a short-syntax port ('IP:HOST:CONTAINER'), '' if it has none."""
    parts = re.split(r":(?![^{]*\})", port)  # colons outside ${...}
    return parts[0] if len(parts) == 3 else ""


def _environment(service: Doc) -> dict[str, Any]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return dict(env)


_STORE_SETTING = {"redis": "--requirepass", "postgres": "POSTGRES_PASSWORD",
                  "rabbitmq": "RABBITMQ_DEFAULT_PASS"}


def _store_password_problems(services: dict[str, Doc]) -> list[str]:
    return [f"{store}: {_STORE_SETTING[store]} must be ${{VAR:?...}} (a password from the "
            "environment, no default)"
            for store in STORE_PORTS if store in services
            and _store_variable(services, store) is None]


def _store_variable(services: dict[str, Doc], store: str) -> str | None:
    """The variable a store's password comes from (None: none, a literal, a default)."""
    service = services.get(store) or {}
    if store == "redis":
        command = service.get("command") or []
        flag = command.index("--requirepass") if "--requirepass" in command else -2
        return required_variable(command[flag + 1]) if flag >= 0 else None
    return required_variable(str(_environment(service).get(_STORE_SETTING[store], "")))


def _url_problems(where: str, value: str, services: dict[str, Doc]) -> list[str]:
    if not value.startswith(URL_SCHEMES):
        return []
    # ${VAR:?message} holds '?' and ':': park each one while the URL is split
    parked: list[str] = []

    def park(match: re.Match[str]) -> str:
        parked.append(match.group())
        return f"parked{len(parked) - 1}"

    parts = urlsplit(_INTERPOLATION.sub(park, value))
    host = parts.hostname or ""
    password = parts.password or ""
    if re.fullmatch(r"parked\d+", password):
        password = parked[int(password.removeprefix("parked"))]
    variable = required_variable(password)
    if variable is None:
        return [f"{where}: the URL's password must be ${{VAR:?...}} (none, or a literal)"]
    store = {"redis": "redis", "postgres": "postgres", "rabbitmq": "rabbitmq"}.get(host)
    if store and _store_variable(services, store) != variable:
        return [f"{where}: the password is ${variable}, but {store} requires "
                f"${_store_variable(services, store)}"]
    return []


def kubernetes_problems(docs: list[tuple[str, Doc]]) -> list[str]:
    """What in Kubernetes documents is open to strangers: Services beyond ClusterIP, host
    networking, URLs in ConfigMaps, data stores without a password or a NetworkPolicy that
    admits only aimesh client pods (and KEDA's operator) on their port."""
    problems = []
    policies = [d for _, d in docs if d["kind"] == "NetworkPolicy"]
    for source, doc in docs:
        where = f"{source}: {doc['kind']} {doc['metadata']['name']}"
        if doc["kind"] == "Service":
            problems += _service_problems(where, doc)
        if doc["kind"] == "ConfigMap":
            problems += [f"{where}: {k} holds a URL; URLs carry passwords, put it in the "
                         "Secret" for k, v in doc.get("data", {}).items()
                         if str(v).startswith(URL_SCHEMES)]
        pod = _pod_spec(doc)
        if pod is not None:
            problems += _pod_problems(where, doc, pod, policies)
    return problems


def _service_problems(where: str, doc: Doc) -> list[str]:
    spec = doc["spec"]
    problems = []
    if spec.get("type", "ClusterIP") != "ClusterIP":
        problems.append(f"{where}: type {spec['type']}; Services are ClusterIP (put an "
                        "Ingress with TLS and auth in front of what must be reached)")
    if spec.get("externalIPs"):
        problems.append(f"{where}: externalIPs")
    return problems


def _pod_spec(doc: Doc) -> Doc | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return dict(doc["spec"]["template"]["spec"])
    return None


def _component(doc: Doc) -> str:
    return str(doc["spec"]["template"]["metadata"]["labels"].get(
        "app.kubernetes.io/component", ""))


def _pod_problems(where: str, doc: Doc, pod: Doc, policies: list[Doc]) -> list[str]:
    problems = []
    if pod.get("hostNetwork") or any(p.get("hostPort") for c in pod["containers"]
                                     for p in c.get("ports", [])):
        problems.append(f"{where}: host networking or a hostPort")
    labels = doc["spec"]["template"]["metadata"]["labels"]
    component = _component(doc)
    if component == "simulator" and labels.get("aimesh-tasks/client"):
        problems.append(f"{where}: the simulator stands for a provider, it must not be a "
                        "client of the data stores")
    if component in STORE_PORTS:
        problems += _store_pod_problems(where, component, labels, pod, policies)
    return problems


def _store_pod_problems(where: str, store: str, labels: dict[str, str], pod: Doc,
                        policies: list[Doc]) -> list[str]:
    problems = []
    container = pod["containers"][0]
    env = {e["name"]: e for e in container.get("env", [])}
    secret_env = {"redis": "REDIS_PASSWORD", "postgres": "POSTGRES_PASSWORD",
                  "rabbitmq": "RABBITMQ_DEFAULT_PASS"}[store]
    if "secretKeyRef" not in env.get(secret_env, {}).get("valueFrom", {}):
        problems.append(f"{where}: {secret_env} must come from a Secret")
    if store == "redis" and "$(REDIS_PASSWORD)" not in container.get("command", []):
        problems.append(f"{where}: redis-server needs --requirepass $(REDIS_PASSWORD)")
    guarding = [p for p in policies if _selects(p["spec"]["podSelector"], labels)]
    if not guarding:
        problems.append(f"{where}: no NetworkPolicy selects it")
    for policy in guarding:
        problems += _policy_problems(f"{where}: NetworkPolicy {policy['metadata']['name']}",
                                     policy, STORE_PORTS[store])
    return problems


def _selects(selector: Doc, labels: dict[str, str]) -> bool:
    wanted = selector.get("matchLabels", {})
    return bool(wanted) and all(labels.get(k) == v for k, v in wanted.items())


def _policy_problems(where: str, policy: Doc, port: int) -> list[str]:
    spec = policy["spec"]
    if "Ingress" not in spec.get("policyTypes", []):
        return [f"{where}: does not restrict Ingress"]
    problems = []
    for rule in spec.get("ingress", []):
        if [p.get("port") for p in rule.get("ports", [])] != [port]:
            problems.append(f"{where}: a rule opens {rule.get('ports')}, not only {port}")
        peers = rule.get("from", [])
        if not peers:
            problems.append(f"{where}: a rule admits everyone")
        for peer in peers:
            problems += _peer_problems(where, peer)
    return problems


def _peer_problems(where: str, peer: Doc) -> list[str]:
    if "ipBlock" in peer:
        return [f"{where}: admits an ipBlock"]
    pods = peer.get("podSelector", {}).get("matchLabels", {})
    namespaces = peer.get("namespaceSelector")
    if namespaces is None:
        if pods.get("aimesh-tasks/client") != "true":
            return [f"{where}: admits pods {pods} of its namespace, not only aimesh clients"]
        return []
    if not namespaces.get("matchLabels", {}).get("kubernetes.io/metadata.name") or not pods:
        return [f"{where}: admits another namespace's pods without naming both"]
    return []
