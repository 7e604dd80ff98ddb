"""A worker announces the endpoints it serves: checked, then created or joined.

    aimesh worker --serve local-llama --url http://127.0.0.1:11434 --model llama3.1 \\
        --price-in 0 --price-out 0          (or --serve-file endpoints.yaml for several)

Before its worker starts, `announce` checks, in order, and refuses the whole
announcement at the first failure:

1. the registration credential (registry/registration.py);
2. each endpoint as `add_endpoint` checks it (EndpointSpec), and its base URL through
   the upstream URL policy: it must resolve from this worker, to allowed addresses only
   (registry/upstream.py);
3. each id against the registry: a new id is created as a self-registered endpoint
   (`origin` 'announced'); an existing one is joined only if every field the worker gives
   equals the registered one, else AnnouncementConflict names each differing field with
   both values. Nothing is merged: the operator changes an endpoint, workers follow it.

Joining an operator's endpoint is allowed (same fields): the worker serves its queue too,
and the endpoint stays routable whether or not any announcing worker lives, as an
operator's endpoint always was. A self-registered one is routable only while one of its
servers beats (registry/servers.py, resilience/servers.py).

A serve file lists endpoints under `endpoints:`, each with the fields of `add_endpoint`:

    endpoints:
      - id: local-llama
        base_url: http://127.0.0.1:11434
        model: llama3.1
        input_usd_per_1k: "0"
        output_usd_per_1k: "0"
        capacity: 4
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.exc import IntegrityError

from aimesh_tasks.errors import InvalidInput, NotFound
from aimesh_tasks.money import usd_to_nusd
from aimesh_tasks.registry.endpoints import (
    Endpoint,
    EndpointSpec,
    get_endpoint,
    insert_endpoint,
    parse_spec,
)
from aimesh_tasks.registry.registration import check_registration_token
from aimesh_tasks.registry.upstream import check_announced_url
from aimesh_tasks.settings import get_settings

logger = logging.getLogger(__name__)

JOIN_ATTEMPTS = 3
# The fields a server must agree on with the registered endpoint, in the order named.
COMPARED = ("provider", "base_url", "model", "input_usd_per_1k", "output_usd_per_1k",
            "capacity", "tags", "max_output_tokens", "api_key_env", "api_key_file")


class AnnouncementConflict(InvalidInput):
    """An announced endpoint differs from the registered one with its id; `differences`
    maps each differing field to {registered, announced}."""

    code = "announcement_conflict"


@dataclass(frozen=True, slots=True)
class Announced:
    """One endpoint a worker announced: as registered, and whether this created it."""

    endpoint: Endpoint
    created: bool


def announce(specs: Sequence[EndpointSpec], *, worker: str) -> list[Announced]:
    """Check the credential, then each endpoint's URL, then create or join each one
    (module docstring); refuses the whole announcement at the first failure."""
    settings = get_settings()
    token = settings.registration_token
    by = check_registration_token(token.get_secret_value() if token else None,
                                  settings.registration_token_hashes)
    _no_id_twice(specs)
    for spec in specs:
        check_announced_url(spec.base_url)
    for spec in specs:
        _refuse_conflicts(spec)  # all checked before any is created
    done = [_join(spec) for spec in specs]
    for one in done:
        logger.info("endpoint.announced", extra={
            "endpoint_id": one.endpoint.id, "worker": worker, "token": by,
            "created": one.created, "origin": one.endpoint.origin})
    return done


def _no_id_twice(specs: Sequence[EndpointSpec]) -> None:
    ids = [spec.id for spec in specs]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise InvalidInput(f"id: endpoint '{twice[0]}' is announced twice; give each id once",
                           field="id", errors=[])


def _join(spec: EndpointSpec) -> Announced:
    """Create the endpoint, or join the registered one if it agrees."""
    for _ in range(JOIN_ATTEMPTS):
        registered = _refuse_conflicts(spec)
        if registered is not None:
            return Announced(registered, False)
        try:
            created = insert_endpoint(spec, "announced")
        except IntegrityError:  # another worker created it a moment ago: compare with it
            continue
        if created is not None:
            return Announced(created, True)
    raise InvalidInput(f"id: endpoint '{spec.id}' kept appearing and disappearing while "
                       "this worker announced it; try again", field="id", errors=[])


def _refuse_conflicts(spec: EndpointSpec) -> Endpoint | None:
    """The registered endpoint with `spec`'s id if it agrees with `spec` (None: no such
    endpoint yet); AnnouncementConflict naming every difference otherwise."""
    try:
        registered = get_endpoint(spec.id)
    except NotFound:
        return None
    differences = differing_fields(registered, spec)
    if differences:
        raise conflict(spec.id, registered, differences)
    return registered


def comparable(endpoint: Endpoint) -> dict[str, Any]:
    """The compared fields of a registered endpoint, in one form (prices in nano-USD)."""
    return {"provider": endpoint.provider, "base_url": endpoint.base_url,
            "model": endpoint.model, "input_usd_per_1k": endpoint.input_nusd_per_1k,
            "output_usd_per_1k": endpoint.output_nusd_per_1k, "capacity": endpoint.capacity,
            "tags": sorted(endpoint.tags), "max_output_tokens": endpoint.max_output_tokens,
            "api_key_env": endpoint.api_key_env, "api_key_file": endpoint.api_key_file}


def differing_fields(registered: Endpoint, spec: EndpointSpec) -> dict[str, dict[str, Any]]:
    """Each compared field whose announced value differs: {registered, announced}, as
    given (prices in USD per 1k tokens)."""
    have = comparable(registered)
    want = {**{name: getattr(spec, name) for name in COMPARED},
            "input_usd_per_1k": usd_to_nusd(spec.input_usd_per_1k),
            "output_usd_per_1k": usd_to_nusd(spec.output_usd_per_1k),
            "tags": sorted(set(spec.tags))}
    shown = registered.to_dict()
    return {name: {"registered": shown[name],
                   "announced": str(getattr(spec, name)) if "usd" in name else want[name]}
            for name in COMPARED if have[name] != want[name]}


def conflict(endpoint_id: str, registered: Endpoint,
             differences: dict[str, dict[str, Any]]) -> AnnouncementConflict:
    """The refusal of an announcement that differs from the registered endpoint."""
    listed = "; ".join(f"{name} {d['announced']!r} announced, {d['registered']!r} registered"
                       for name, d in differences.items())
    return AnnouncementConflict(
        f"{next(iter(differences))}: endpoint '{endpoint_id}' is registered "
        f"({registered.origin}) with other values: {listed}. A worker joins an endpoint "
        f"only with its registered values: serve it with those, change it first "
        f"(`aimesh endpoints update {endpoint_id} ...`, then restart its servers), or "
        "announce another id",
        field=next(iter(differences)), endpoint_id=endpoint_id, differences=differences,
        errors=[])


def parse_announcement(item: Any, where: str = "") -> EndpointSpec:
    """One endpoint of an announcement (a serve file's entry at `where`, or the --serve
    options); InvalidInput names where and the field."""
    prefix = f"{where}." if where else ""
    if not isinstance(item, dict):
        raise InvalidInput(f"{where or 'endpoint'}: expected a mapping of endpoint fields",
                           field=where or "endpoint", errors=[])
    if "enabled" in item:
        raise InvalidInput(f"{prefix}enabled: an operator enables or disables an endpoint "
                           "(`aimesh endpoints disable ID`), not its servers",
                           field=f"{prefix}enabled", errors=[])
    try:
        return parse_spec(item)
    except InvalidInput as exc:
        if not where:
            raise
        raise InvalidInput(f"{prefix}{exc.message}",
                           {**exc.fields, "field": f"{prefix}{exc.field}"}) from None


def read_serve_file(path: str | Path) -> list[EndpointSpec]:
    """The endpoints a serve file lists (module docstring); InvalidInput names the file,
    the entry and the field of the first problem."""
    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidInput(f"{source}: cannot read the serve file ({exc.strerror})",
                           field="serve_file", errors=[]) from None
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{source}: not valid YAML ({str(exc).splitlines()[0]})",
                           field="serve_file", errors=[]) from None
    items = data.get("endpoints") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items or set(data) != {"endpoints"}:
        raise InvalidInput(f"{source}: expected one key, 'endpoints', holding a list of "
                           "endpoints (id, base_url, model, input_usd_per_1k, "
                           "output_usd_per_1k, ...)", field="serve_file", errors=[])
    return [parse_announcement(item, f"{source}: endpoints[{n}]")
            for n, item in enumerate(items)]
