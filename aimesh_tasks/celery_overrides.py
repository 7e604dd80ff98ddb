"""A deployment's own `celeryconfig` module, applied over aimesh-tasks' Celery settings.

Found on `sys.path` or in the working directory; applied only if it declares
`AIMESH_OVERRIDES = True` (another project's `celeryconfig` is ignored, with a warning),
and never for a setting the delivery guarantees fix (ignored, with a warning naming the
file and the setting).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

OVERRIDES_MODULE = "celeryconfig"
OVERRIDES_MARKER = "AIMESH_OVERRIDES"


def find_overrides() -> ModuleType | None:
    """The deployment's `celeryconfig` module (on sys.path or in the working directory)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        if importlib.util.find_spec(OVERRIDES_MODULE) is None:
            return None
        return importlib.import_module(OVERRIDES_MODULE)
    finally:
        if added:
            sys.path.remove(cwd)


def deployment_overrides(module: ModuleType | None, guaranteed: Mapping[str, Any]
                         ) -> dict[str, Any]:
    """The Celery settings a deployment's `celeryconfig` may change: none from a module
    without the marker, and never a guaranteed one (each refusal is logged)."""
    if module is None:
        return {}
    where = getattr(module, "__file__", OVERRIDES_MODULE)
    if not getattr(module, OVERRIDES_MARKER, False):
        logger.warning("ignoring %s: a module named 'celeryconfig' that does not declare "
                       "%s = True is not aimesh-tasks overrides", where, OVERRIDES_MARKER)
        return {}
    settings = {name: value for name, value in vars(module).items()
                if not name.startswith("_") and name.islower()
                and not isinstance(value, ModuleType)}
    for name, value in list(settings.items()):
        if name in guaranteed and value != guaranteed[name]:
            logger.warning("ignoring %s = %r from %s: aimesh-tasks' delivery guarantees "
                           "need %r", name, value, where, guaranteed[name])
            del settings[name]
    return settings
