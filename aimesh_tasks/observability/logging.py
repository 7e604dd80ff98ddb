"""Structured JSON logs with redaction: one JSON object per line, secrets never written.

`configure_logging()` puts one handler on the root logger (a worker calls it through
Celery's `setup_logging` signal, which replaces Celery's own log set-up). Every line,
from any library, passes the same handler, which

- drops task arguments and return values that Celery attaches to its own records (a
  return value is an AiResult with the answer text; arguments carry the prompt);
- replaces with `<redacted>`: `Authorization:`/`Bearer`/`api_key=`-style credentials,
  secret query parameters (`?key=`), credentials in URLs, pydantic's echo of the input
  (`input_value=...`), and the literal value of every secret-looking environment variable
  (names with KEY, TOKEN, SECRET, PASSWORD, PASSWD, CRED or AUTH) and of every endpoint's
  `api_key_env` variable once the endpoint is seen (`REDACTOR.add_env`).

httpx logs one INFO line per request with the full URL, and some providers take the API
key in the query string (Gemini's `?key=`): the `httpx` and `httpcore` loggers are set to
WARNING, so those lines are not written at all (a request per call is the decision log's
job, with ids instead of URLs); the query-string rule above is a second guard.
Prompt text is left out of the decision log unless AIMESH_LOG_PROMPTS is true.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any

REDACTED = "<redacted>"
_SECRET_ENV_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CRED|AUTH", re.IGNORECASE)
_MIN_SECRET_LEN = 6
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?)(?:(?:bearer|basic|token)\s+)?"
                r"[^\s'\",}]+"), rf"\g<1>{REDACTED}"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"), rf"\g<1> {REDACTED}"),
    (re.compile(r"(?i)((?:x-)?api[_-]?key['\"]?\s*[:=]\s*['\"]?)[^\s'\",}&]+"),
     rf"\g<1>{REDACTED}"),
    (re.compile(r"(?i)([?&](?:key|api_key|apikey|token|access_token|password|secret)=)"
                r"[^&\s'\"]+"), rf"\g<1>{REDACTED}"),
    (re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://)[^/\s:@]*:[^/\s@]+@"), rf"\g<1>{REDACTED}@"),
    (re.compile(r"input_value=.*?(?=, input_type=|$)", re.DOTALL), f"input_value={REDACTED}"),
)
# Matches wherever any of _PATTERNS could: text without it skips the six substitutions.
_TRIGGER = re.compile(r"(?i)authorization|bearer|basic|api[_-]?key|input_value=|://|"
                      r"[?&](?:key|api_key|apikey|token|access_token|password|secret)=")
# Attributes Celery and others attach to records that may hold task arguments or results.
_DROPPED_ARGS = ("args", "kwargs", "return_value", "argsrepr", "kwargsrepr")
# Attributes of a LogRecord itself; everything else on a record is an `extra` field.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_EXTRA_TYPES = (str, int, float, bool, type(None), list, dict)


class Redactor:
    """Removes credentials and known secret values from text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()  # longest first
        self._envs_seen: set[str] = set()

    def add_secret(self, value: str | None) -> None:
        """Never write `value` (and its ':' or ','-separated parts) again."""
        if not value:
            return
        parts = {value, *re.split(r"[:,]", value)}
        new = {p for p in parts if len(p) >= _MIN_SECRET_LEN}
        with self._lock:
            self._secrets = tuple(sorted(set(self._secrets) | new, key=len, reverse=True))

    def add_env(self, name: str | None) -> None:
        """Treat the value of environment variable `name` as a secret."""
        if not name or name in self._envs_seen:
            return
        self._envs_seen.add(name)
        self.add_secret(os.environ.get(name))

    def add_secret_looking_env(self) -> None:
        """Treat every environment variable whose name looks secret as a secret."""
        for name in os.environ:
            if _SECRET_ENV_NAME.search(name):
                self.add_env(name)

    def scrub(self, text: str) -> str:
        """`text` with every credential pattern and known secret replaced."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if _TRIGGER.search(text) is None:
            return text
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


REDACTOR = Redactor()


def _drop_task_data(record: logging.LogRecord) -> None:
    if isinstance(record.args, dict):
        record.args = {k: (REDACTED if k in _DROPPED_ARGS else v) for k, v in record.args.items()}
    data = getattr(record, "data", None)
    if isinstance(data, dict):
        record.data = {k: v for k, v in data.items() if k not in _DROPPED_ARGS}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, event, the extra fields, error."""

    def __init__(self, redactor: Redactor = REDACTOR) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        _drop_task_data(record)
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            "process": record.processName,
        }
        for name, value in vars(record).items():
            if name not in _RECORD_FIELDS and name != "data" and isinstance(value, _EXTRA_TYPES):
                entry.setdefault(name, value)
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(self._scrubbed(entry), ensure_ascii=False)

    def _scrubbed(self, value: Any) -> Any:
        # Scrubbed before JSON encoding, so that escaping cannot hide a secret from the match.
        if isinstance(value, str):
            return self.redactor.scrub(value)
        if isinstance(value, dict):
            return {k: self._scrubbed(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._scrubbed(v) for v in value]
        if value is None or isinstance(value, int | float):
            return value
        return self.redactor.scrub(str(value))


def configure_logging(level: str | int = logging.INFO, aimesh_level: str | None = None) -> None:
    """Replace the root logger's handlers by one JSON handler on stderr, with redaction."""
    REDACTOR.add_secret_looking_env()
    handler = logging.StreamHandler(sys.__stderr__ or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aimesh_tasks").setLevel(aimesh_level or level)
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
