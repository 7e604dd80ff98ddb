"""The upstream URL policy with this deployment's settings, as registration applies it.

`url_policy` decides what an address may be; this module gives it the networks
AIMESH_UPSTREAM_ALLOW_PRIVATE opens, and says how strict each way in is:

| who gives the URL                  | host does not resolve here   | resolves to a refused one |
|------------------------------------|------------------------------|---------------------------|
| a worker announcing it (--serve)   | refused: it calls the URL    | refused                   |
| an operator (endpoints add/update) | accepted (its workers may    | refused                   |
|                                    | see another DNS: a cluster's)|                           |

Either way every connection is checked again when it is made (providers/aio.py resolves
through the same policy and never follows a redirect), so a name that resolves to a
refused address later (DNS rebinding) is still never called.
"""

from __future__ import annotations

from aimesh_tasks.registry.url_policy import (
    Resolver,
    UpstreamTarget,
    UpstreamURLRefused,
    resolve_upstream,
)
from aimesh_tasks.settings import get_settings


def allowed_networks() -> list[str]:
    """The loopback and private networks upstream URLs may reach (the setting)."""
    return get_settings().upstream_private_networks


def check_announced_url(url: str, *, resolver: Resolver | None = None) -> UpstreamTarget:
    """`url` checked for a worker that announces it: it must resolve, to allowed
    addresses only; UpstreamURLRefused (field base_url) otherwise."""
    try:
        return resolve_upstream(url, allow_private=allowed_networks(), resolver=resolver)
    except UpstreamURLRefused as exc:
        raise as_base_url(exc) from None


def check_operator_url(url: str, *, resolver: Resolver | None = None) -> bool:
    """`url` checked for an operator: True when it resolves here to allowed addresses,
    False when its host does not resolve from here (accepted); UpstreamURLRefused (field
    base_url) for anything the policy refuses."""
    try:
        resolve_upstream(url, allow_private=allowed_networks(), resolver=resolver)
    except UpstreamURLRefused as exc:
        if exc.reason == "unresolvable":
            return False
        raise as_base_url(exc) from None
    return True


def as_base_url(error: UpstreamURLRefused) -> UpstreamURLRefused:
    """The policy's refusal, naming the endpoint field (`base_url`, the CLI's --url) and,
    for a network that can be opened, the setting that opens it."""
    message = "base_url" + error.message.removeprefix("url")
    if error.reason in ("loopback", "private"):
        message += (f". Fix: add its network to AIMESH_UPSTREAM_ALLOW_PRIVATE (now "
                    f"'{','.join(allowed_networks())}') if endpoints may reach it")
    return UpstreamURLRefused(message, {**error.fields, "field": "base_url"})
