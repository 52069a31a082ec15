"""``photoz simulate``: write a simulated SDSS-like data set to HDF5, in parallel, resumably.

The data set is cut into chunks of ``chunk_size`` galaxies; chunk k is a pure
function of (seed, k, configuration), so the output is identical whatever
the number of worker processes, and an interrupted or extended run only
computes the chunks that are missing.

File layout (one HDF5 file per data set)::

    images            (N, 5, 64, 64) float32, nanomaggies, band order u g r i z
    z                 (N,) float64, true (spectroscopic) redshift
    ebv               (N,) float32, Galactic E(B-V), mag
    truth/<name>      per-object truth: type, sizes, true magnitudes, PSF, ...
    catalogue/<name>  noisy Petrosian photometry measured on the images
    attrs             bands, pixel_scale_arcsec, flux_unit, simulator_version,
                      seed, chunk_size, n_complete_chunks, configs (JSON),
                      sed_library_sha256 (the spectral library's file)
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from photoz.model.conventions import BANDS, CUTOUT_SIZE_PIXELS, FLUX_UNIT, PIXEL_SCALE_ARCSEC
from photoz.progress import Progress
from photoz.training.simulation.instrument import InstrumentConfig
from photoz.training.simulation.population import PopulationConfig
from photoz.training.simulation.render import simulate_chunk
from photoz.training.simulation.sed import REFERENCE

SIMULATOR_VERSION = "1.10.0"
DEFAULT_CHUNK_SIZE = 256


class SimulationMismatch(RuntimeError):
    """An existing file was made with other settings: extending it would mix two data sets."""


def library_digest(pop_cfg: PopulationConfig) -> str:
    """SHA-256 of the spectral library file the population clones (a library refitted without a new simulator
    version must not extend a data set made with the old one)."""
    return hashlib.sha256((REFERENCE / pop_cfg.sed_library).read_bytes()).hexdigest()


def _signature(seed, chunk_size, pop_cfg, inst_cfg) -> dict:
    return {
        "simulator_version": SIMULATOR_VERSION,
        "seed": int(seed),
        "chunk_size": int(chunk_size),
        "population_config": json.dumps(pop_cfg.to_dict(), sort_keys=True),
        "instrument_config": json.dumps(inst_cfg.to_dict(), sort_keys=True),
        "sed_library_sha256": library_digest(pop_cfg),
    }


def _create(h5, signature: dict, first: dict) -> None:
    s = CUTOUT_SIZE_PIXELS
    h5.create_dataset("images", shape=(0, len(BANDS), s, s), maxshape=(None, len(BANDS), s, s),
                      dtype="f4", chunks=(1, len(BANDS), s, s))
    for name, value in first.items():
        if name == "images":
            continue
        path = name.replace("truth_", "truth/", 1).replace("cat_", "catalogue/", 1)
        h5.create_dataset(path, shape=(0,) + value.shape[1:], maxshape=(None,) + value.shape[1:],
                          dtype=value.dtype, chunks=(max(1, 4096 // max(1, int(np.prod(value.shape[1:])))),)
                          + value.shape[1:])
    h5.attrs.update(signature)
    h5.attrs.update({
        "bands": ",".join(BANDS), "pixel_scale_arcsec": PIXEL_SCALE_ARCSEC, "flux_unit": FLUX_UNIT,
        "cutout_size_pixels": CUTOUT_SIZE_PIXELS, "n_complete_chunks": 0,
        "selection": "measured Petrosian r, dereddened, <= 17.77 (SDSS Main Galaxy Sample)",
        "provenance": "photoz simulator (GalSim bulge+disk; spectra of real SDSS galaxies from kcorrect NMF "
                      "templates; speclite SDSS filters)",
        "images_unit": "nanomaggy", "z_unit": "redshift", "ebv_unit": "mag",
    })
    h5["catalogue"].attrs["description"] = (
        "Photometry measured on the noisy images with neighbours deblended: Petrosian (eta = 0.2 radius on r, "
        "fluxes in every band in a circular aperture of 2 Petrosian radii) and model (each band's profile "
        "through its PSF, amplitude fitted); asinh magnitudes; flags: bits 0-4 a cosmic ray interpolated in "
        "u, g, r, i, z; bit 5 a neighbour within 3 arcsec; bit 6 saturated pixels; bit 7 a bad column "
        "interpolated over.")


def _append(h5, chunk: dict, n_keep: int) -> None:
    for name, value in chunk.items():
        path = name.replace("truth_", "truth/", 1).replace("cat_", "catalogue/", 1)
        ds = h5[path]
        start = ds.shape[0]
        ds.resize(start + n_keep, axis=0)
        ds[start:] = value[:n_keep]


def _work(args):
    pop_cfg, inst_cfg, seed, chunk, n = args
    return chunk, simulate_chunk(pop_cfg, inst_cfg, seed, chunk, n)


def simulate(out: str | Path, n: int, seed: int = 0, workers: int | None = None,
             chunk_size: int = DEFAULT_CHUNK_SIZE, pop_cfg: PopulationConfig | None = None,
             inst_cfg: InstrumentConfig | None = None, progress: bool = True) -> Path:
    """Make ``out`` hold ``n`` galaxies, computing only the chunks it lacks.

    A new file is created; an existing one with the same seed and settings
    is resumed or extended; one with other settings raises
    :class:`SimulationMismatch`. Returns the path.
    """
    import h5py

    out = Path(out)
    pop_cfg, inst_cfg = pop_cfg or PopulationConfig(), inst_cfg or InstrumentConfig()
    signature = _signature(seed, chunk_size, pop_cfg, inst_cfg)
    workers = workers or mp.cpu_count()
    n_chunks = -(-n // chunk_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(out, "a") as h5:
        if "images" in h5:
            differing = [k for k, v in signature.items() if h5.attrs.get(k) != v]
            if differing:
                raise SimulationMismatch(f"{out} was simulated with other settings ({', '.join(differing)}); "
                                         "use a new file or the same --seed and settings")
            if h5["images"].shape[0] >= n:
                return out  # a smaller n never truncates an existing data set
            done = int(h5.attrs["n_complete_chunks"])
            for ds in _datasets(h5):  # drop a partly written or short last chunk
                ds.resize(done * chunk_size, axis=0)
        else:
            done = 0
        todo = [(pop_cfg, inst_cfg, seed, k, chunk_size) for k in range(done, n_chunks)]
        if not todo:
            return out
        bar = Progress(n, min(done * chunk_size, n), "simulate", "gal", progress)
        workers = min(workers, len(todo))
        # one BLAS/OpenMP thread per worker: the workers are the parallelism (threads fighting them cost ~20%)
        with threadpool_limits(limits=1), _chunk_results(todo, workers, pop_cfg, inst_cfg) as results:
            for chunk, data in results:
                if "images" not in h5:
                    _create(h5, signature, data)
                keep = min(chunk_size, n - chunk * chunk_size)
                _append(h5, data, keep)
                h5.attrs["n_complete_chunks"] = chunk + 1 if keep == chunk_size else chunk
                h5.flush()
                bar.update(keep)
        bar.close()
    return out


@contextmanager
def _chunk_results(todo: list, workers: int, pop_cfg: PopulationConfig,
                   inst_cfg: InstrumentConfig) -> Iterator[Iterator[tuple[int, dict]]]:
    """Yield an iterator over ``(chunk, data)`` in chunk order, computed here (one worker) or by ``workers``
    processes.

    The worker processes come from a forkserver, never from a fork of this process: the caller may hold
    threads (a dask client, a test runner's servers, an OpenMP pool) whose locks a forked child would inherit
    held and wait on for ever. A worker that dies raises ``BrokenProcessPool`` here instead of leaving the
    run waiting. Each worker builds the spectral tables once (~5 s, all workers at the same time)."""
    if workers <= 1:
        _prepare(pop_cfg, inst_cfg)
        yield map(_work, todo)
        return
    methods = mp.get_all_start_methods()
    context = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
    if context.get_start_method() == "forkserver":
        context.set_forkserver_preload([__name__])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(pop_cfg, inst_cfg))
    try:
        yield pool.map(_work, todo)
    finally:  # an interrupted run waits for the chunks under way, not for the whole queue
        pool.shutdown(wait=True, cancel_futures=True)


def _start_worker(pop_cfg: PopulationConfig, inst_cfg: InstrumentConfig) -> None:
    _one_thread()
    _prepare(pop_cfg, inst_cfg)


def _prepare(pop_cfg: PopulationConfig, inst_cfg: InstrumentConfig) -> None:
    """Build the spectral tables and the sampling grids of targets and neighbours once per process (a few
    seconds), before its first chunk."""
    from photoz.training.simulation.population import NEIGHBOUR_Z_MAX, draw_candidates

    rng = np.random.default_rng(0)
    draw_candidates(pop_cfg, 1, rng)
    draw_candidates(pop_cfg, 1, rng, r_limit=inst_cfg.neighbour_r_limit_mag, z_max=NEIGHBOUR_Z_MAX)


def _one_thread() -> None:
    threadpool_limits(limits=1)


def _datasets(h5):
    found = []
    h5.visititems(lambda name, obj: found.append(obj) if hasattr(obj, "resize") else None)
    return found
