"""Labelled cutout data sets in HDF5, streamed from disk.

The format is the simulator's, and is also how users bring their own
labelled (real) cutouts::

    images  (N, 5, 64, 64) float32, nanomaggies, band order of the bundle
            (channel-last (N, 64, 64, 5) is accepted too)
    z       (N,) spectroscopic redshift
    ebv     (N,) Galactic E(B-V) in mag (optional; 0 when absent)
    split   (N,) uint8, optional: 0 train, 1 validation, 2 test (e.g. by sky
            position, as ``photoz sdss-dataset`` writes); ``photoz train``
            then trains on 0 and validates on 1, ``photoz evaluate --split``
            scores one of them; without it the validation split is random

Anything else in the file (``truth/``, ``catalogue/``, attributes) is kept
for evaluation but not needed for training. Reading is per object, so a
data set never needs to fit in memory; each DataLoader worker opens its own
file handle.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from photoz.model.conventions import BANDS, CHANNEL_LAST_AXIS, stack_band_axis


class DataFormatError(ValueError):
    pass


def inspect(path: str | Path) -> dict:
    """Size, layout and provenance of a labelled data set; raise DataFormatError if unusable."""
    import h5py

    with h5py.File(path, "r") as h5:
        for key in ("images", "z"):
            if key not in h5:
                raise DataFormatError(f"{path}: missing dataset '{key}' (need images (N,5,64,64) and z (N,))")
        shape = h5["images"].shape
        axis = stack_band_axis(shape, len(BANDS), shape[2] if len(shape) == 4 and shape[2] == shape[3] else shape[1])
        if axis is None:
            nb = len(BANDS)
            raise DataFormatError(f"{path}: images must be (N, {nb}, S, S) or (N, S, S, {nb}), got {shape}")
        if h5["z"].shape != (shape[0],):
            raise DataFormatError(f"{path}: z has shape {h5['z'].shape}, images hold {shape[0]} objects")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
        return {
            "n": shape[0],
            "channel_last": axis == CHANNEL_LAST_AXIS,
            "has_ebv": "ebv" in h5,
            "name": Path(path).name,
            "provenance": str(attrs.get("provenance", "user data set")),
            "seed": int(attrs["seed"]) if "seed" in attrs else None,
            "simulator_version": attrs.get("simulator_version"),
        }


class CutoutDataset:
    """Map-style dataset over an HDF5 file: item i -> (image (5,S,S), ebv (1,), z).

    ``indices`` restricts it to a subset (e.g. a train or validation split).
    ``augment`` applies a random 90-degree rotation and flip (the sky has no
    preferred orientation), drawn from ``numpy``'s per-worker generator.
    """

    def __init__(self, path: str | Path, indices: np.ndarray | None = None, augment: bool = False):
        info = inspect(path)
        self.path = str(path)
        self.channel_last = info["channel_last"]
        self.has_ebv = info["has_ebv"]
        self.indices = np.arange(info["n"]) if indices is None else np.asarray(indices)
        self.augment = augment
        self._h5 = None

    def __len__(self) -> int:
        return len(self.indices)

    def _file(self):
        if self._h5 is None:
            import h5py

            self._h5 = h5py.File(self.path, "r")
        return self._h5

    def __getitem__(self, item: int):
        h5 = self._file()
        i = int(self.indices[item])
        image = np.asarray(h5["images"][i], dtype=np.float32)
        if self.channel_last:
            image = np.moveaxis(image, -1, 0)
        if self.augment:
            image = np.rot90(image, k=np.random.randint(4), axes=(1, 2))
            if np.random.randint(2):
                image = image[:, :, ::-1]
            image = np.ascontiguousarray(image)
        ebv = np.float32(h5["ebv"][i]) if self.has_ebv else np.float32(0)
        return image, np.array([ebv], np.float32), np.float32(h5["z"][i])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_h5"] = None  # h5py handles do not cross process boundaries
        return state


def split_indices(n: int, validation_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train / validation object indices, fixed by the seed."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * validation_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


SPLIT_NAMES = ("train", "validation", "test")


def split_rows(path: str | Path, name: str) -> np.ndarray | None:
    """Rows of the file's ``split`` dataset named ``name`` (train, validation, test); None if it has none."""
    import h5py

    if name not in SPLIT_NAMES:
        raise DataFormatError(f"unknown split {name!r}: expected one of {', '.join(SPLIT_NAMES)}")
    with h5py.File(path, "r") as h5:
        if "split" not in h5:
            return None
        return np.flatnonzero(np.asarray(h5["split"][:]) == SPLIT_NAMES.index(name))


def read_labels(path: str | Path, indices: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """z, ebv and the catalogue (if any) of a data set, small enough for memory."""
    import h5py

    with h5py.File(path, "r") as h5:
        sel = slice(None) if indices is None else np.asarray(indices)
        out = {"z": np.asarray(h5["z"][sel], dtype=np.float64)}
        out["ebv"] = np.asarray(h5["ebv"][sel], dtype=np.float32) if "ebv" in h5 else \
            np.zeros_like(out["z"], np.float32)
        if "catalogue" in h5:
            for name, ds in h5["catalogue"].items():
                out[f"catalogue/{name}"] = np.asarray(ds[sel])
        if "truth" in h5:
            for name, ds in h5["truth"].items():
                out[f"truth/{name}"] = np.asarray(ds[sel])
        return out


def read_cutouts(path: str | Path, n: int | None = None, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``images`` (N, 5, S, S) and ``ebv`` (N,) of rows ``start .. start + n`` of a labelled HDF5 data set."""
    import h5py

    with h5py.File(path, "r") as h5:
        stop = h5["images"].shape[0] if n is None else min(start + n, h5["images"].shape[0])
        images = np.asarray(h5["images"][start:stop], np.float32)
        ebv = np.asarray(h5["ebv"][start:stop], np.float64) if "ebv" in h5 else np.zeros(stop - start)
    if images.shape[-1] == len(BANDS) and images.shape[1] != len(BANDS):
        images = np.ascontiguousarray(np.moveaxis(images, -1, 1))
    return images, ebv
