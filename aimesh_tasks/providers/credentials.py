"""Where an endpoint's API key comes from, read on the worker at call time.

An endpoint names where its key is, never the key itself (the registry lives in the
database and travels in every envelope):

| endpoint field | the key is                          | read                               |
|----------------|-------------------------------------|------------------------------------|
| `api_key_env`  | the value of that environment       | at every call, from this process's |
|                | variable                            | environment                        |
| `api_key_file` | the content of that file, stripped  | at every call; the file is read    |
|                | (a mounted Kubernetes Secret, say)  | again whenever it changed          |
| neither        | none: no auth header (a local model)| -                                  |

A key that is named but not there (variable unset or empty, file absent, unreadable or
empty) is `key_missing`: the call fails before any HTTP request with a ProviderError
(action `fallback`) that says which variable or file, instead of an upstream 401/500.
Every key read is handed to the log redactor, and `redact` keeps keys and key-like
tokens out of the provider error excerpts that reach results, audits and logs.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import Counter
from typing import Protocol

from aimesh_tasks.errors import ProviderError
from aimesh_tasks.observability.logging import REDACTED, REDACTOR

# A key file is small; anything larger is not one (and is not read into memory).
MAX_KEY_FILE_BYTES = 64 * 1024
# Prefixes of the API keys of well-known providers and gateways.
KEY_PREFIXES = ("sk-", "sk_", "pk-", "rk-", "AIza", "gsk_", "xai-", "hf_", "ghp_", "Bearer ")
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_TOKEN = re.compile(r"[A-Za-z0-9_\-+/=.~]{19,}[A-Za-z0-9_\-+/=~]")  # not a final '.'
_MIN_KEY_LIKE_CHARS = 20
_MIN_ENTROPY_BITS = 3.5


class KeySource(Protocol):
    """What credentials need of an endpoint (registry.Endpoint has it)."""

    @property
    def id(self) -> str: ...
    @property
    def api_key_env(self) -> str | None: ...
    @property
    def api_key_file(self) -> str | None: ...


def describe(endpoint: KeySource) -> str | None:
    """Where the endpoint's key is, in words ('environment variable X', 'file /p'), or
    None when it needs no key."""
    if endpoint.api_key_env:
        return f"environment variable {endpoint.api_key_env}"
    if endpoint.api_key_file:
        return f"file {endpoint.api_key_file}"
    return None


class _KeyFiles:
    """Key files read once and again only when they change (inode, size or mtime: a
    Kubernetes Secret update swaps a symlink, which changes the inode)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._read: dict[str, tuple[tuple[int, int, int, int], str]] = {}

    def read(self, path: str) -> tuple[str | None, str]:
        """(the key, '') or (None, why it cannot be had)."""
        try:
            info = os.stat(path)
        except OSError as exc:
            return None, f"file {path} {_os_reason(exc)}"
        stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with self._lock:
            cached = self._read.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1] or None, "" if cached[1] else f"file {path} is empty"
        if info.st_size > MAX_KEY_FILE_BYTES:
            return None, f"file {path} is {info.st_size} bytes, too large for a key file"
        try:
            with open(path, encoding="utf-8") as handle:
                value = handle.read(MAX_KEY_FILE_BYTES).strip()
        except (OSError, UnicodeDecodeError) as exc:
            return None, f"file {path} {_os_reason(exc)}"
        with self._lock:
            self._read[path] = (stamp, value)
        return (value, "") if value else (None, f"file {path} is empty")


def _os_reason(exc: Exception) -> str:
    if isinstance(exc, FileNotFoundError):
        return "does not exist on this worker"
    if isinstance(exc, PermissionError):
        return "cannot be read by this worker's user (permission denied)"
    if isinstance(exc, UnicodeDecodeError):
        return "is not UTF-8 text"
    return f"cannot be read ({type(exc).__name__})"


KEY_FILES = _KeyFiles()
_SEEN_LOCK = threading.Lock()
_SEEN: set[str] = set()


def _lookup(endpoint: KeySource) -> tuple[str | None, str]:
    if endpoint.api_key_env:
        value = os.environ.get(endpoint.api_key_env, "").strip()
        if value:
            return value, ""
        state = "is empty" if endpoint.api_key_env in os.environ else "is not set"
        return None, f"environment variable {endpoint.api_key_env} {state}"
    if endpoint.api_key_file:
        return KEY_FILES.read(endpoint.api_key_file)
    return None, ""


def missing_reason(endpoint: KeySource) -> str | None:
    """Why this process has no key for an endpoint that names one; None if it has the
    key or needs none."""
    value, why = _lookup(endpoint)
    return why if value is None and why else None


def api_key(endpoint: KeySource) -> str | None:
    """The endpoint's key, read now (None: it needs none); ProviderError `key_missing`
    (action fallback) when the named variable or file gives none."""
    value, why = _lookup(endpoint)
    if value is None and why:
        raise ProviderError(
            f"endpoint '{endpoint.id}' has no API key on this worker: {why} (set it where "
            f"the endpoint's workers run, or change it with `aimesh endpoints update "
            f"{endpoint.id} --api-key-env NAME` or `--api-key-file PATH`)",
            endpoint_id=endpoint.id, action="fallback", reason="key_missing",
            retryable=True,
        )
    if value is not None:
        _never_log(value)
    return value


def _never_log(value: str) -> None:
    with _SEEN_LOCK:
        if value in _SEEN:
            return
        _SEEN.add(value)
    REDACTOR.add_secret(value)


def _entropy_bits(text: str) -> float:
    counts = Counter(text)
    return -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())


def looks_like_key(text: str) -> bool:
    """True for text that looks like an API key rather than a name: a known key prefix,
    or a long token mixing lower case, upper case and digits with high entropy."""
    value = text.strip()
    if value.startswith(KEY_PREFIXES) and len(value) >= 8:
        return True
    if len(value) < _MIN_KEY_LIKE_CHARS or ENV_NAME.match(value):
        return False
    classes = sum(any(test(c) for c in value) for test in (str.islower, str.isupper,
                                                          str.isdigit))
    return classes == 3 and _entropy_bits(value) >= _MIN_ENTROPY_BITS


def redact(text: str, *keys: str | None) -> str:
    """`text` without the given keys, credential patterns or key-like tokens."""
    for key in keys:
        if key:
            text = text.replace(key, REDACTED)
    text = REDACTOR.scrub(text)
    return _TOKEN.sub(lambda m: REDACTED if looks_like_key(m.group()) else m.group(), text)
