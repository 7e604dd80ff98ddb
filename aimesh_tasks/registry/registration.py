"""Who may announce endpoints: the registration credential, checked before anything else.

A worker announces the endpoints it serves (`aimesh worker --serve`) only with a token
the cluster accepts. The cluster lists sha256 digests, never tokens, in
AIMESH_REGISTRATION_TOKENS (one per worker, or one shared; revoking one is removing its
digest); the worker presents its token in AIMESH_REGISTRATION_TOKEN.

| cluster lists | worker presents      | outcome                                        |
|---------------|----------------------|------------------------------------------------|
| nothing       | anything             | refused: nobody may announce                   |
| digests       | nothing              | refused                                        |
| digests       | a token not listed   | refused                                        |
| digests       | a listed token       | accepted; logged by its fingerprint (`sha256:` |
|               |                      | and 12 hex of its digest), never the token     |

The presented token's digest is compared with every listed digest in constant time (no
early exit), and no error repeats the token. What the credential protects is the
announcement itself: a process that holds the database's credentials can write the
registry directly, which is why the database and Redis require passwords in the
deployment files (deploy/README.md).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from aimesh_tasks.errors import ConfigError

_HOW = ("Fix: give this worker a token in AIMESH_REGISTRATION_TOKEN whose sha256 digest "
        "(printf %s \"$TOKEN\" | sha256sum) is listed in AIMESH_REGISTRATION_TOKENS")


class RegistrationRefused(ConfigError):
    """A worker may not announce endpoints: its registration token is missing or not one
    the cluster accepts (`reason`: no_tokens, no_token or unknown_token)."""

    code = "registration_refused"


def token_digest(token: str) -> str:
    """The sha256 hex digest of a token, as AIMESH_REGISTRATION_TOKENS lists it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def fingerprint(digest: str) -> str:
    """What logs and records may show of an accepted token."""
    return f"sha256:{digest[:12]}"


def check_registration_token(presented: str | None, accepted: Sequence[str]) -> str:
    """The fingerprint of the accepted token `presented` is; RegistrationRefused when
    the cluster accepts none, none is presented, or it is not listed."""
    if not accepted:
        raise RegistrationRefused(
            "announcing endpoints is refused: this cluster accepts no registration token "
            "(AIMESH_REGISTRATION_TOKENS is empty). Fix: an operator lists the sha256 "
            "digest of each worker's token there", setting="AIMESH_REGISTRATION_TOKENS",
            reason="no_tokens")
    if not presented:
        raise RegistrationRefused(
            f"announcing endpoints is refused: this worker presents no registration token. "
            f"{_HOW}", setting="AIMESH_REGISTRATION_TOKEN", reason="no_token")
    digest = token_digest(presented)
    matched = ""
    for candidate in accepted:  # every digest is compared: the time says nothing
        if hmac.compare_digest(digest, candidate.lower()):
            matched = candidate.lower()
    if not matched:
        raise RegistrationRefused(
            f"announcing endpoints is refused: the registration token this worker presents "
            f"is not one the cluster accepts. {_HOW}", setting="AIMESH_REGISTRATION_TOKEN",
            reason="unknown_token")
    return fingerprint(matched)
