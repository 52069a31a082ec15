"""Tables the simulator computes from fixed inputs, kept on disk between runs: ``sed.photometry_table`` (~3 s
with speclite, which every simulation worker paid on its first galaxy). A table is filed under a digest of every
number it is made from and the versions of the libraries that compute it, so a table read back is the one the
code would compute, to the bit."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def cache_dir() -> Path | None:
    """``PHOTOZ_CACHE_DIR``, else ``$XDG_CACHE_HOME/photoz`` (``~/.cache/photoz``); ``PHOTOZ_CACHE_DIR=""``:
    none (every table computed)."""
    configured = os.environ.get("PHOTOZ_CACHE_DIR")
    if configured is not None:
        return Path(configured) if configured else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "photoz"


def cached_file(name: str, inputs: Iterable[np.ndarray]) -> Path | None:
    """Where the table ``name`` made from ``inputs`` (arrays, as float64) is kept, or None without a cache."""
    import scipy
    import speclite

    root = cache_dir()
    if root is None:
        return None
    digest = hashlib.sha256(f"{speclite.__version__} {np.__version__} {scipy.__version__}".encode())
    for array in inputs:
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return root / f"{name}-{digest.hexdigest()[:32]}.npy"


def load(path: Path | None) -> np.ndarray | None:
    """The table kept at ``path``; None when there is none, or it was cut short by a writer that died."""
    if path is None:
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None


def save(path: Path | None, table: np.ndarray) -> None:
    """``table`` to ``path`` through a file of this process's own, renamed into place (workers write at once);
    a cache that cannot be written is no error."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(f".{os.getpid()}.tmp")
        with open(part, "wb") as fh:
            np.save(fh, table, allow_pickle=False)
        os.replace(part, path)
    except OSError:
        pass
