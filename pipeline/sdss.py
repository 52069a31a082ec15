"""``photoz sdss-dataset``: a training file of real SDSS galaxies with spectroscopic redshifts, from the archive.

    photoz sdss-dataset --out mgs.h5 --n 20000
    photoz sdss-dataset --out stripe82.h5 --region 0,30,-1.25,1.25 --cache ~/sdss-frames

1. **Selection** (SkyServer SQL, :func:`selection_sql`): Main Galaxy Sample
   targets (``legacy_target1`` GALAXY bit) with clean spectra (``class =
   'GALAXY'``, ``zWarning = 0``, science primary), dereddened Petrosian r <=
   17.77, 0 < z < 0.4; run/camcol/field, RA/Dec, model and Petrosian
   magnitudes, extinction per band and the r Petrosian half-light radius kept
   as the catalogue. Paged by ``specObjID`` (keyset paging: each page is a
   query of its own); pages are kept as they arrive, so an interrupted
   selection resumes. ``--n`` keeps the first N by ``specObjID``, ``--region``
   bounds RA/Dec.
2. **Frames** from the Science Archive Server (``frame-{band}-{run:06d}-
   {camcol}-{field:04d}.fits.bz2``, calibrated nanomaggies) into a cache:
   downloaded once, resumed with HTTP ranges after an interruption, retried
   on 5xx/429/connection errors with backoff, at most ``--concurrency``
   at a time, and checked before use (the size the server declared, bzip2's
   block checksums over the whole file, a FITS image inside).
3. **Cutouts** with ``photoz cutouts``' own registration onto the r band's
   grid (:func:`~photoz.pipeline.cutouts.cut_registered`: the stamps that
   ``cut(align(...))`` gives, resampling only the stamps' pixels, as an SDSS
   field holds a few galaxies on 3 million pixels), 64 x 64. A galaxy whose stamp runs off its field's frame is
   cut from the previous or next field of the same run and camcol when it
   lies wholly inside that one (consecutive SDSS fields overlap by about 128
   rows), as Pasquet et al. (2019) did with their mosaics; otherwise it is
   left out and listed in ``skipped/`` with the reason.
4. **Splits** by sky position: every HEALPix pixel (``nside`` 32 by default,
   3.4 deg^2) goes wholly to train, validation or test, so neighbours (and
   the large-scale structure they share) do not leak across splits.
5. **The training file** (:mod:`photoz.training.fit.data`'s contract): ``images``
   (N, 5, 64, 64) float32 nanomaggies, ``z``, ``ebv`` (= extinction_r / 2.285,
   SDSS's SFD98-based value), ``split`` (0 train, 1 validation, 2 test; ``photoz
   train`` and ``photoz evaluate`` honour it), ``catalogue/*`` and provenance
   attributes (data release, query, services, dates). Objects are in a fixed
   order (run, camcol, field, specObjID). Work is done in chunks kept in
   ``OUT.parts/`` (atomic files): a killed run resumes where it stopped and the
   final file is assembled from the chunks, streaming, so a 500k-galaxy set
   never sits in memory.

The real services are the defaults; ``--skyserver`` and ``--sas`` point at
mirrors (the test suite points them at a local fake).
"""
from __future__ import annotations

import datetime
import io
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from photoz.model.conventions import BANDS, CUTOUT_SIZE_PIXELS, EXTINCTION_A_OVER_EBV
from photoz.pipeline.jobs import SdssJob
from photoz.pipeline.sdss_archive import (
    DATA_RELEASE,
    RERUN,
    SAS_URL,
    SKYSERVER_URL,
    Catalogue,
    Fetcher,
    FrameCache,
    Region,
    SDSSArchiveError,
    select,
    selection_sql,
    write_atomic,
)

__all__ = ["SAS_URL", "SKYSERVER_URL", "Region", "SDSSArchiveError", "build", "sky_splits"]
SPLITS = ("train", "validation", "test")
#: What an SDSS field's neighbours are: the previous and next field of the same run and camcol.
NEIGHBOUR_FIELDS = (-1, 1)


# -- 3. cutouts -------------------------------------------------------------------------------------------

@dataclass
class Chunk:
    """The outcome for objects ``start .. stop`` of the ordered selection."""

    kept: list[int] = field(default_factory=list)  # indices into the ordered selection
    images: list[np.ndarray] = field(default_factory=list)
    source_field: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


class Cutter:
    """The bands of the last few fields read (kept in memory) and stamps registered from them."""

    def __init__(self, frames: FrameCache, size: int = CUTOUT_SIZE_PIXELS) -> None:
        self.frames, self.size = frames, size
        self.bands = lru_cache(maxsize=4)(self._bands)

    def _bands(self, run: int, camcol: int, field_: int) -> dict[str, Any] | None:
        from photoz.pipeline.cutouts import read_band_image

        paths = self.frames.fetch_field(run, camcol, field_)
        if paths is None:
            return None
        return {band: read_band_image(path, band) for band, path in paths.items()}

    def cutout(self, run: int, camcol: int, field_: int, ra: float, dec: float) -> tuple[np.ndarray | None, int, str]:
        """The stamp (from the object's field, else a neighbour that holds it whole), the field used, or why not."""
        from photoz.pipeline.cutouts import cut_registered

        tried = []
        for candidate in (field_, *(field_ + d for d in NEIGHBOUR_FIELDS)):
            if candidate < 0:
                continue
            bands = self.bands(run, camcol, candidate)
            if bands is None:
                if candidate == field_:
                    return None, field_, f"no frames for run {run} camcol {camcol} field {field_} in the archive"
                continue
            images, near_edge = cut_registered(bands, np.array([ra]), np.array([dec]), self.size)
            if not near_edge[0]:
                return images[0], candidate, ""
            tried.append(candidate)
        return None, field_, f"stamp runs off the frames of fields {', '.join(map(str, tried))} (run {run}, " \
                             f"camcol {camcol})"


def ordered(cat: Catalogue) -> Catalogue:
    """The fixed object order: by field (run, camcol, field), then specObjID."""
    order = np.lexsort((cat["specObjID"], cat["field"], cat["camcol"], cat["run"]))
    return {name: values[order] for name, values in cat.items()}


def cut_chunk(cutter: Cutter, cat: Catalogue, start: int, stop: int) -> Chunk:
    chunk = Chunk()
    for i in range(start, stop):
        image, used, reason = cutter.cutout(int(cat["run"][i]), int(cat["camcol"][i]), int(cat["field"][i]),
                                            float(cat["ra"][i]), float(cat["dec"][i]))
        if image is None:
            chunk.skipped.append(i)
            chunk.reasons.append(reason)
        else:
            chunk.kept.append(i)
            chunk.images.append(image)
            chunk.source_field.append(used)
    return chunk


def fields_of(cat: Catalogue, start: int = 0, neighbours: bool = False) -> set[tuple[int, int, int]]:
    """The fields (run, camcol, field) of objects ``start ..``, with their neighbours if asked."""
    steps = (0, *NEIGHBOUR_FIELDS) if neighbours else (0,)
    keys = set(zip(cat["run"][start:].tolist(), cat["camcol"][start:].tolist(), cat["field"][start:].tolist(),
                   strict=True))
    return {(run, camcol, field_ + d) for run, camcol, field_ in keys for d in steps}


def save_chunk(path: Path, chunk: Chunk, size: int) -> None:
    images = np.stack(chunk.images) if chunk.images else np.zeros((0, len(BANDS), size, size), np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, images=images.astype(np.float32), kept=np.asarray(chunk.kept, np.int64),
             source_field=np.asarray(chunk.source_field, np.int64), skipped=np.asarray(chunk.skipped, np.int64),
             reasons=np.asarray(chunk.reasons, dtype=str))
    write_atomic(path, buffer.getvalue())


def chunk_index(path: Path) -> dict[str, np.ndarray]:
    """A chunk's row indices, source fields and reasons, without its images (an .npz member is read only when
    asked for, so the images of a whole data set never sit in memory together)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files if key != "images"}


# -- 4. splits --------------------------------------------------------------------------------------------

def sky_splits(ra: np.ndarray, dec: np.ndarray, fractions: tuple[float, float, float], nside: int = 32,
               seed: int = 0) -> np.ndarray:
    """0/1/2 (train/validation/test) per object, decided per HEALPix pixel (nested, ``nside``): every pixel
    goes wholly to one split with the given probabilities, fixed by ``seed``."""
    import astropy.units as u
    from astropy_healpix import HEALPix

    pixels = HEALPix(nside=nside, order="nested").lonlat_to_healpix(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg)
    draw = pixel_draws(np.asarray(pixels, np.int64), seed)
    edges = np.cumsum(fractions[:2]) / sum(fractions)
    return np.searchsorted(edges, draw, side="right").astype(np.uint8)


def pixel_draws(pixels: np.ndarray, seed: int) -> np.ndarray:
    """``np.random.default_rng(seed).random(12 * nside**2)[pixels]`` without drawing the whole sky (at nside 8192
    that is 805 million numbers, 6.4 GB and ~25 s): the generator's stream is advanced to each pixel the objects
    occupy (one 64-bit output per double), so the splits are the same numbers as before."""
    unique, inverse = np.unique(pixels, return_inverse=True)
    bits = np.random.PCG64(seed)  # what default_rng(seed) wraps
    generator = np.random.Generator(bits)
    draws = np.empty(unique.size)
    position = 0
    for k, pixel in enumerate(unique.tolist()):
        bits.advance(pixel - position)
        draws[k] = generator.random()
        position = pixel + 1
    return draws[inverse.reshape(-1)]


# -- 5. the training file ---------------------------------------------------------------------------------

def _catalogue(cat: Catalogue, index: np.ndarray) -> dict[str, np.ndarray]:
    out = {name.lower(): cat[name][index] for name in ("specObjID", "objID", "run", "rerun", "camcol", "field")}
    out.update(ra=cat["ra"][index], dec=cat["dec"][index], petro_r50_r_arcsec=cat["petroR50_r"][index])
    for key, prefix in (("model_mag", "modelMag"), ("petro_mag", "petroMag"), ("extinction_mag", "extinction")):
        out[key] = np.stack([cat[f"{prefix}_{b}"][index] for b in BANDS], axis=1)
    return out


def write_training_file(out: Path, cat: Catalogue, chunk_paths: list[Path], provenance: dict[str, Any],
                        fractions: tuple[float, float, float], nside: int, seed: int) -> dict[str, Any]:
    """Stream the chunks into the training HDF5 (written beside ``out``, then moved into place)."""
    import h5py

    chunks = [chunk_index(p) for p in chunk_paths]  # small: the images are copied chunk by chunk below
    kept = np.concatenate([c["kept"] for c in chunks]) if chunks else np.zeros(0, np.int64)
    skipped = np.concatenate([c["skipped"] for c in chunks]) if chunks else np.zeros(0, np.int64)
    reasons = [str(r) for c in chunks for r in c["reasons"]]
    catalogue = _catalogue(cat, kept)
    z = cat["z"][kept]
    ebv = (catalogue["extinction_mag"][:, BANDS.index("r")] / EXTINCTION_A_OVER_EBV["r"]).astype(np.float32)
    split = sky_splits(catalogue["ra"], catalogue["dec"], fractions, nside, seed)
    tmp = out.with_name(out.name + ".tmp")
    with h5py.File(tmp, "w") as h5:
        images = h5.create_dataset("images", (len(kept), len(BANDS), CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS),
                                   np.float32, chunks=(1, len(BANDS), CUTOUT_SIZE_PIXELS, CUTOUT_SIZE_PIXELS))
        at = 0
        for path, c in zip(chunk_paths, chunks, strict=True):
            n = len(c["kept"])
            if n:
                with np.load(path, allow_pickle=False) as data:
                    images[at:at + n] = data["images"]
            at += n
        h5["z"], h5["ebv"], h5["split"] = z, ebv, split
        h5["split"].attrs["names"] = ",".join(SPLITS)
        group = h5.create_group("catalogue")
        for name, values in catalogue.items():
            group[name] = values
        group["source_field"] = np.concatenate([c["source_field"] for c in chunks]) if chunks else np.zeros(0)
        group.attrs["description"] = ("SDSS PhotoObj/SpecObj values of each object (magnitudes as observed, "
                                      "not dereddened; extinction_mag per band; source_field: the field the "
                                      "cutout was cut from, a neighbour of `field` for objects near a frame edge)")
        lost = h5.create_group("skipped")
        lost["specobjid"] = cat["specObjID"][skipped]
        lost["reason"] = np.array(reasons, dtype=h5py.string_dtype())
        for key, value in provenance.items():
            h5.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value)
        h5.attrs["ebv"] = f"E(B-V) = extinction_r / {EXTINCTION_A_OVER_EBV['r']} (SDSS's SFD98-based extinction)"
        h5.attrs["split_scheme"] = (f"HEALPix nside {nside} (nested) pixels assigned wholly to train/validation/test "
                                    f"with fractions {list(fractions)}, seed {seed}")
    tmp.replace(out)
    counts = np.bincount(split, minlength=3)
    return {"out": str(out), "objects": int(len(kept)), "skipped": int(len(skipped)),
            "splits": {name: int(c) for name, c in zip(SPLITS, counts, strict=True)}}


def chunk_ranges(n: int, chunk_size: int) -> Iterator[tuple[int, int, int]]:
    for k, start in enumerate(range(0, n, chunk_size)):
        yield k, start, min(start + chunk_size, n)


def build(job: SdssJob, log: Callable[[str], None] = print) -> dict:
    """Select, download, cut and write (see the module docstring and :class:`SdssJob`); resumes from
    ``OUT.parts/``."""
    out = Path(job.out)
    region = Region.parse(job.region) if isinstance(job.region, str) else job.region
    skyserver, sas = job.skyserver or SKYSERVER_URL, job.sas or SAS_URL
    if job.n is None and region is None:
        raise ValueError("give --n (the first N galaxies of the selection) or --region (a box on the sky), or both")
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    settings = {"n": job.n, "region": None if region is None else list(vars(region).values()),
                "skyserver": skyserver, "page_size": job.page_size, "chunk_size": job.chunk_size}
    stamp = parts / "settings.json"
    if stamp.exists() and json.loads(stamp.read_text()) != settings:
        raise ValueError(f"{parts} holds a run with other settings ({stamp.read_text().strip()}); remove it, "
                         "or run with those settings to resume it")
    write_atomic(stamp, json.dumps(settings).encode())
    fetcher = Fetcher(retries=job.retries, backoff_s=job.backoff_s)
    try:
        log(f"selecting Main Galaxy Sample galaxies from {skyserver} ...")
        cat = ordered(select(fetcher, skyserver, parts, job.n, region, job.page_size, log))
        n_selected, fields = len(cat["z"]), fields_of(cat)
        log(f"{n_selected} galaxies on {len(fields)} fields; frames from {sas}")
        frames = FrameCache(Path(job.cache) if job.cache else parts / "frames", sas, fetcher, job.concurrency)
        chunk_paths = _cut_chunks(Cutter(frames), cat, parts, job, log)
        provenance = {"data_release": DATA_RELEASE, "skyserver": skyserver, "sas": sas, "rerun": RERUN,
                      "query": selection_sql(job.page_size, 0, region), "paging": "keyset on specObjID",
                      "n_requested": -1 if job.n is None else job.n,
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "photoz_command": "photoz sdss-dataset", "object_order": "run, camcol, field, specObjID"}
        summary = write_training_file(out, cat, chunk_paths, provenance, job.fractions, job.nside, job.seed)
    finally:
        fetcher.close()
    # the file is complete: the work folder goes (a cache given with --cache stays)
    shutil.rmtree(parts)
    return {**summary, "selected": n_selected, "fields": len(fields)}


def _cut_chunks(cutter: Cutter, cat: dict, parts: Path, job: SdssJob, log: Callable[[str], None]) -> list[Path]:
    """Every chunk of the selection cut and saved under ``parts`` (those already there kept): their paths."""
    frames = cutter.frames
    chunk_paths = []
    for k, start, stop in chunk_ranges(len(cat["z"]), job.chunk_size):
        path = parts / f"chunk-{k:05d}.npz"
        chunk_paths.append(path)
        if path.exists():
            continue
        chunk = cut_chunk(cutter, cat, start, stop)
        save_chunk(path, chunk, cutter.size)
        if job.cache is None:  # no cache asked for: frames go as soon as no later object needs them
            frames.prune(fields_of(cat, stop, neighbours=True))
        log(f"  objects {start}-{stop - 1}: {len(chunk.kept)} cut, {len(chunk.skipped)} skipped "
            f"({frames.downloaded_bytes / 2**20:.0f} MiB downloaded so far)")
    return chunk_paths

