"""For a migration that redefines a SQL function an earlier migration created: that
revision's module, loaded from beside it (a revision file starts with digits, so it
cannot be imported by name), and the function's text with edits made, each of which
must match exactly once (an earlier text that changed makes the migration fail loudly,
never apply half its edits)."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType


def sibling(migration_file: str, filename: str) -> ModuleType:
    """The revision module `filename` in the folder of `migration_file` (its __file__)."""
    path = Path(migration_file).with_name(filename)
    spec = importlib.util.spec_from_file_location(f"aimesh_migration_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"migration {filename} not found beside {migration_file}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def edited(text: str, edits: Sequence[tuple[str, str]], revision: str) -> str:
    """`text` with each (old, new) of `edits` made; RuntimeError naming `revision` and
    the edit when an `old` is not in it exactly once."""
    for old, new in edits:
        if text.count(old) != 1:
            raise RuntimeError(f"{revision}: the function text it edits no longer has "
                               f"{old!r} once; update its edits")
        text = text.replace(old, new)
    return text
