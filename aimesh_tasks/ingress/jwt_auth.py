"""JWT bearer tokens (PyJWT), accepted beside API keys when AIMESH_INGRESS_JWT_ISSUER is set.

A token must be signed with an allowed algorithm by the configured key and carry `exp`,
`iss` and `aud` equal to the settings and the agent claim (AIMESH_INGRESS_JWT_AGENT_CLAIM,
a valid agent id). What an attacker tries is refused as an invalid credential (401):
`alg: none` (never allowed), an algorithm of the other family (the allowlist is one
family, checked at start-up, so a token HMAC-signed with the RSA public key as its secret
is refused for its algorithm), a wrong issuer or audience, a missing or past `exp`.
The optional claim `aimesh_acts_for` lists other agents the token may act for
(X-Source-Agent). A JWT is never an admin credential: admin routes need an admin key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import jwt

from aimesh_tasks.api_keys import InvalidApiKey, KeyInfo
from aimesh_tasks.errors import ConfigError
from aimesh_tasks.messages import AGENT_ID_PATTERN
from aimesh_tasks.settings import get_settings

ACTS_FOR_CLAIM = "aimesh_acts_for"
SYMMETRIC = ("HS256", "HS384", "HS512")
ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
              "ES512", "EdDSA")
REFUSED = "invalid bearer token: signature, algorithm, issuer, audience or expiry"


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """What a token is checked against."""

    issuer: str
    audience: str
    algorithms: tuple[str, ...]
    key: str
    agent_claim: str


def _algorithms(text: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in text.split(",") if a.strip())
    unknown = [a for a in names if a not in SYMMETRIC + ASYMMETRIC]
    if not names or unknown:
        raise ConfigError(f"AIMESH_INGRESS_JWT_ALGORITHMS: {', '.join(unknown) or 'empty'} "
                          f"not allowed; give some of {', '.join(SYMMETRIC + ASYMMETRIC)}",
                          setting="AIMESH_INGRESS_JWT_ALGORITHMS")
    if any(a in SYMMETRIC for a in names) and any(a in ASYMMETRIC for a in names):
        raise ConfigError("AIMESH_INGRESS_JWT_ALGORITHMS: mixes HS* with asymmetric "
                          "algorithms, which lets a public key be used as an HMAC secret; "
                          "give one family", setting="AIMESH_INGRESS_JWT_ALGORITHMS")
    return names


@lru_cache(maxsize=1)
def jwt_config() -> JwtConfig | None:
    """The JWT settings, checked (ConfigError naming the variable); None when off."""
    settings = get_settings()
    if not settings.ingress_jwt_issuer:
        return None
    key = settings.ingress_jwt_key.get_secret_value() if settings.ingress_jwt_key else ""
    if not key or not settings.ingress_jwt_audience:
        raise ConfigError("AIMESH_INGRESS_JWT_KEY and AIMESH_INGRESS_JWT_AUDIENCE are needed "
                          "with AIMESH_INGRESS_JWT_ISSUER", setting="AIMESH_INGRESS_JWT_KEY")
    return JwtConfig(issuer=settings.ingress_jwt_issuer,
                     audience=settings.ingress_jwt_audience,
                     algorithms=_algorithms(settings.ingress_jwt_algorithms), key=key,
                     agent_claim=settings.ingress_jwt_agent_claim)


def looks_like_jwt(token: str) -> bool:
    """Three dot-separated parts: not an aimesh API key."""
    return token.count(".") == 2


def _agents(claims: dict[str, Any], config: JwtConfig) -> tuple[str, tuple[str, ...]]:
    agent = claims.get(config.agent_claim)
    others = claims.get(ACTS_FOR_CLAIM) or []
    if not isinstance(agent, str) or not AGENT_ID_PATTERN.match(agent) or len(agent) > 64:
        raise InvalidApiKey(f"invalid bearer token: claim '{config.agent_claim}' must name an "
                            "agent (lowercase kebab or snake case)")
    if not isinstance(others, list) or not all(isinstance(o, str) and AGENT_ID_PATTERN.match(o)
                                               for o in others):
        raise InvalidApiKey(f"invalid bearer token: '{ACTS_FOR_CLAIM}' must list agent ids")
    return agent, tuple(others[:32])


def verify_jwt(token: str, config: JwtConfig) -> KeyInfo:
    """The credential a valid token stands for, or InvalidApiKey (401)."""
    try:
        claims = jwt.decode(token, config.key, algorithms=list(config.algorithms),
                            audience=config.audience, issuer=config.issuer,
                            options={"require": ["exp", "iss", "aud"]})
    except (jwt.PyJWTError, ValueError, TypeError):
        raise InvalidApiKey(REFUSED) from None
    agent, others = _agents(claims, config)
    issued = claims.get("iat")
    return KeyInfo(prefix=f"jwt:{str(claims.get('jti', ''))[:64]}", agent_id=agent,
                   acts_for=others, admin=False, note="jwt",
                   created_at=datetime.fromtimestamp(float(issued), UTC)
                   if isinstance(issued, int | float) else datetime.now(UTC),
                   expires_at=datetime.fromtimestamp(float(claims["exp"]), UTC),
                   revoked_at=None)
