"""A per-process copy of the endpoint registry, reloaded when the Redis version moves."""

from __future__ import annotations

import threading

from aimesh_tasks.registry.endpoints import Endpoint, list_endpoints


class EndpointCache:
    """Endpoints as of a registry version; `at(version)` reloads from the database if stale."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version: str | None = None
        self._endpoints: tuple[Endpoint, ...] = ()

    def at(self, version: str) -> tuple[Endpoint, ...]:
        """The endpoints for `version`, reading the database only when it changed."""
        if version == self._version:
            return self._endpoints
        with self._lock:
            if version != self._version:
                self._endpoints = tuple(list_endpoints())
                self._version = version
        return self._endpoints

    def ids(self) -> list[str]:
        """Ids of the endpoints last loaded."""
        return [e.id for e in self._endpoints]

    def announced_ids(self) -> list[str]:
        """Ids of the self-registered endpoints last loaded."""
        return [e.id for e in self._endpoints if e.announced]

    def clear(self) -> None:
        """Forget the copy: the next call reloads."""
        with self._lock:
            self._version = None
            self._endpoints = ()


ENDPOINTS = EndpointCache()
