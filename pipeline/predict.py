"""``photoz predict``: a bundle over files, offline, resumable, the service's numbers.

Inputs: FITS / .npy / .npz files, directories of them, or HDF5 data sets
(``images`` + optional ``ebv``, ``ids``). Objects are numbered in input order
and processed in chunks of ``chunk_size``; each finished chunk is saved under
``OUT.parts/``, so an interrupted run resumes without redoing finished
chunks (the manifest records every input's size and modification time: a
changed input starts the run afresh rather than mixing old and new rows).
Reading the next chunk overlaps with inference of the current one. The
decoders, engine and table writers are the service's (``photoz.formats``,
``photoz.model.runtime``), so the numbers are the service's numbers. The
model runs here, on a running service (``url``), or on Dask workers.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import json
import queue
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from photoz.formats.cutouts import (
    Cutouts,
    Geometry,
    canonical_stack,
    concatenate,
    ebv_per_object,
    flag_unusable_pixels,
    merge_problems,
)
from photoz.formats.errors import InputError
from photoz.formats.inputs import decode, kind_for_suffix, parse_list_field
from photoz.formats.results import TABLE_SUFFIXES, ResultRows, write_table
from photoz.model.isolation import ROW_ERRORS
from photoz.model.pdf import RedshiftBins
from photoz.model.priors import LIST_FIELDS, ZERO_OVERLAP, Prior, PriorError, for_population
from photoz.model.priors import apply as apply_prior
from photoz.model.priors import resolve as resolve_prior
from photoz.pipeline.completeness import read_selection
from photoz.pipeline.engines import Engine, LocalEngine, open_engine
from photoz.pipeline.jobs import PredictJob
from photoz.progress import Progress


class InputFileError(ValueError):
    """An input file that cannot be read, named with what is wrong with it."""


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """A damaged file's error, whatever its reader raises, as an :class:`InputFileError` naming the file."""
    try:
        yield
    except InputError:
        raise
    except Exception as exc:  # h5py, numpy and astropy raise many kinds for damaged files
        raise InputFileError(f"{path}: unreadable {kind_for_suffix(path.name) or 'input'} file ({exc})") from None


@dataclass
class Source:
    """One input file: ``n`` objects, read by slices."""

    path: Path
    n: int

    @property
    def kind(self) -> str | None:
        return kind_for_suffix(self.path.name)

    def read(self, start: int, stop: int, geometry: Geometry) -> Cutouts:
        """Objects [start, stop) as cutouts; an E(B-V) that is not a finite value in 0-10 mag is that
        object's problem, like non-finite pixels."""
        with _reading(self.path):
            images, ebv, ids, decoded_problems = self._read(start, stop, geometry)
        n = images.shape[0]
        ids = ids if ids is not None else [f"{self.path.name}:{i}" for i in range(start, start + n)]
        ebv, ebv_problems = ebv_per_object(ebv, n, f"{self.path}[ebv]")
        # a decoded file's problems already hold its pixels' (and its E(B-V)'s, whose values are now 0)
        pixel_problems = decoded_problems if decoded_problems is not None else \
            flag_unusable_pixels(images, geometry.bands)
        problems = [merge_problems(a, b) for a, b in zip(pixel_problems, ebv_problems, strict=True)]
        return Cutouts(images, ebv, ids, problems)

    def _read(self, start: int, stop: int,
              geometry: Geometry) -> tuple[np.ndarray, Any, list[str] | None, list[str | None] | None]:
        """images, E(B-V), ids and (for decoded files) the decoder's per-object problems."""
        if self.kind == "hdf5":
            import h5py

            with h5py.File(self.path, "r") as h5:
                images = canonical_stack(h5["images"][start:stop], geometry, f"{self.path}[images]")
                ebv = h5["ebv"][start:stop] if "ebv" in h5 else None
                ids = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in h5["ids"][start:stop]] \
                    if "ids" in h5 else None
            return images, ebv, ids, None
        if self.kind == "npy":
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            images = canonical_stack(array if array.ndim == 3 else array[start:stop], geometry, str(self.path))
            return images, None, None, None
        cut = _decoded_file(self.path, geometry)  # its E(B-V) problems are in cut.problems, its values 0
        return cut.images[start:stop], cut.ebv[start:stop], cut.ids[start:stop], cut.problems[start:stop]


def count_objects(path: Path, geometry: Geometry) -> int:
    """How many cutouts a file holds, reading no more than its header where the format allows."""
    kind = kind_for_suffix(path.name)
    with _reading(path):
        if kind == "hdf5":
            import h5py

            with h5py.File(path, "r") as h5:
                return int(h5["images"].shape[0])
        if kind == "npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            return 1 if len(shape) == 3 else int(shape[0])
        return len(_decoded_file(path, geometry))


@functools.lru_cache(maxsize=1)
def _decoded_file(path: Path, geometry: Geometry) -> Cutouts:
    """A whole FITS/.npz file, decoded once: counting it and reading its chunks reuse it
    (one file held at a time, so memory stays bounded by the largest file)."""
    body = path.read_bytes()
    if path.name.lower().endswith(".gz"):  # a local file the user named: gzip as astropy writes it
        body = gzip.decompress(body)
    return decode(body, kind_for_suffix(path.name) or "sniff", geometry, field=str(path))


def find_sources(inputs: list[str | Path], geometry: Geometry) -> list[Source]:
    """Every input file (directories searched recursively for known suffixes), in a stable order."""
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and kind_for_suffix(p.name) not in (None, "json"))
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not paths:
        raise FileNotFoundError(f"no FITS, .npy, .npz or HDF5 files in {', '.join(map(str, inputs))}")
    return [Source(p, count_objects(p, geometry)) for p in paths]


Plan = list[list[tuple[Source, int, int]]]


def chunk_plan(sources: list[Source], chunk_size: int) -> Plan:
    """Object ranges per chunk: chunk k holds objects [k * chunk_size, (k + 1) * chunk_size) of all inputs."""
    if chunk_size < 1:
        raise ValueError(f"chunk size must be at least 1, got {chunk_size}")
    chunks: Plan = []
    current: list[tuple[Source, int, int]] = []
    room = chunk_size
    for src in sources:
        start = 0
        while start < src.n:
            take = min(room, src.n - start)
            current.append((src, start, start + take))
            start += take
            room -= take
            if room == 0:
                chunks.append(current)
                current, room = [], chunk_size
    if current:
        chunks.append(current)
    return chunks


def _read_chunk(plan: list[tuple[Source, int, int]], geometry: Geometry) -> Cutouts:
    return concatenate([src.read(a, b, geometry) for src, a, b in plan])


def _signature(sources: list[Source], chunk_size: int, engine: Engine) -> dict[str, Any]:
    """What a finished chunk depends on: each input's path, size, modification time and count; the model."""
    files = [{"path": str(s.path.resolve()), "bytes": s.path.stat().st_size, "mtime_ns": s.path.stat().st_mtime_ns,
              "objects": s.n} for s in sources]
    return {"inputs": files, "chunk_size": chunk_size, "model": engine.model.as_dict()}


def predict_files(job: PredictJob) -> dict[str, Any]:
    """Run a model over files into one table (:class:`PredictJob`); resumes from ``OUT.parts/``.

    Returns ``objects`` (inputs), ``written`` (table rows), ``out``, ``format`` and ``model``.
    """
    out, fmt = _checked(job)
    engine = open_engine(job.model, job.url, job.api_key, job.providers, job.batch_size)
    bins = RedshiftBins(engine.edges)
    try:  # checked before any work
        given = {name: _list_field(getattr(job, name), name) for name in LIST_FIELDS}
        if job.selection is not None:
            if job.selection_edges is not None or job.selection_completeness is not None:
                raise ValueError("--selection FILE or --selection-edges/--selection-completeness: not both")
            given["selection_edges"], given["selection_completeness"] = read_selection(job.selection)
        chosen = resolve_prior(job.prior, bins, engine.train_prior, *given.values())
    except PriorError as exc:
        raise InputError(exc.field, exc.expected, exc.received) from None
    sources = find_sources(job.inputs, engine.geometry)
    plan = chunk_plan(sources, job.chunk_size)
    parts_dir = out.with_name(out.name + ".parts")
    manifest_path = parts_dir / "manifest.json"
    signature = _signature(sources, job.chunk_size, engine)
    if manifest_path.exists() and json.loads(manifest_path.read_text())["signature"] != signature:
        raise RuntimeError(f"{parts_dir} holds a run over other inputs (or changed files) or another model: "
                           "remove it to start afresh")
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps({"signature": signature}))
    todo = [k for k in range(len(plan)) if not _part(parts_dir, k).exists()]
    total = sum(s.n for s in sources)
    done = total - sum(b - a for k in todo for _, a, b in plan[k])
    with Progress(total, done, "predict", "objects", not job.quiet) as bar:
        if job.dask:
            _run_on_dask(job.dask, Path(str(job.model)).resolve(), job.providers, job.batch_size, plan, todo, engine,
                         parts_dir.resolve(), bar)
        else:
            _run_here(engine, plan, todo, parts_dir, bar)
    parts = sorted(parts_dir.glob("chunk-*.npz"))
    blocks, applied = with_prior((ResultRows.load(p) for p in parts), parts, chosen, engine.train_prior, bins)
    n_written = write_table(blocks, out, fmt, engine.edges, engine.model, applied)
    if job.keep_parts:
        manifest_path.write_text(json.dumps({"signature": signature, "parts": [p.name for p in parts]}, indent=1))
    else:
        shutil.rmtree(parts_dir)
    return {"objects": total, "written": n_written, "out": str(out), "format": fmt, "model": engine.model.as_dict()}


def _checked(job: PredictJob) -> tuple[Path, str]:
    """The output path and table format, once the job's options are known to fit together."""
    if job.dask and job.url:
        raise ValueError("--dask and --url are two different routes: choose one")
    if job.dask and job.model is None:
        raise ValueError("--dask needs a model bundle")
    if job.chunk_size < 1 or job.batch_size < 1:
        raise ValueError(f"chunk size and batch size must be at least 1, got {job.chunk_size} and {job.batch_size}")
    out = Path(job.out)
    fmt = TABLE_SUFFIXES.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"output must end in .fits, .parquet or .hdf5 (qp-readable), got {out.name}")
    return out, fmt


def _list_field(value: Any, name: str) -> Any:
    """A prior's or selection's numbers as given: a list, or the command line's comma or JSON list."""
    return parse_list_field(value, name) if isinstance(value, str) else value


def with_prior(blocks: Iterator[ResultRows], parts: list[Path], prior: Prior, train: np.ndarray | None,
               bins: RedshiftBins) -> tuple[Iterator[ResultRows], dict[str, Any]]:
    """The row blocks under ``prior`` (``self``: the n(z) of every valid row of ``parts``, read once first),
    and the prior's description for the table."""
    if prior.is_identity:
        return blocks, prior.describe()
    assert train is not None
    if prior.name == "self":
        valid = [rows.probs[rows.valid] for rows in (ResultRows.load(p) for p in parts)]
        try:
            prior = for_population(prior, np.concatenate(valid) if valid else np.zeros((0, bins.n_bins)), train)
        except PriorError as exc:
            raise InputError(exc.field, exc.expected, exc.received) from None
    return (_rows_with_prior(rows, prior, train, bins) for rows in blocks), prior.describe()


def _rows_with_prior(rows: ResultRows, prior: Prior, train: np.ndarray, bins: RedshiftBins) -> ResultRows:
    valid = np.flatnonzero(rows.valid)
    outputs, ok = apply_prior({"probs": rows.probs[valid], **{k: v[valid] for k, v in rows.estimates.items()},
                               "flag_bits": rows.flag_bits[valid]}, prior, train, bins)
    rows.fill(valid, outputs)
    for i in valid[~ok]:  # the prior excludes every redshift its PDF allows
        rows.valid[i], rows.errors[i] = False, ZERO_OVERLAP
        rows.probs[i] = np.nan
        rows.flag_bits[i] = 0
        for key in rows.estimates:
            rows.estimates[key][i] = np.nan
    return rows


def _part(parts_dir: Path, k: int) -> Path:
    return parts_dir / f"chunk-{k:06d}.npz"


def process_chunk(engine: Engine, plan_k: list[tuple[Source, int, int]], parts_dir: Path, k: int,
                  data: Cutouts | None = None) -> int:
    """Predict one chunk and save it as ``chunk-K.npz`` (atomically); returns its number of objects."""
    rows = predict_rows(engine, data if data is not None else _read_chunk(plan_k, engine.geometry))
    rows.save(_part(parts_dir, k))
    return len(rows)


def predict_rows(engine: Engine, cutouts: Cutouts) -> ResultRows:
    """One row per cutout: the valid ones through ``engine``; a cutout refused before (its problem), failed by
    the model alone or refused by a service is an invalid row with its error."""
    rows = ResultRows.empty(cutouts.ids, cutouts.problems, len(engine.edges) - 1)
    if rows.valid.any():
        valid = np.flatnonzero(rows.valid)
        outputs = engine.run(cutouts.images[valid], cutouts.ebv[valid])
        errors = outputs.pop(ROW_ERRORS, np.full(len(valid), None, object))  # the objects the model failed on
        rows.fill(valid, outputs)
        unanswered = ~np.isfinite(outputs["probs"]).all(axis=1)  # those, and any a service refused
        rows.valid[valid[unanswered]] = False
        for i, error in zip(valid[unanswered], errors[unanswered], strict=True):
            rows.errors[i] = error or "no PDF: refused by the service, or non-finite model output"
    return rows


def _run_here(engine: Engine, plan: Plan, todo: list[int], parts_dir: Path, bar: Progress) -> None:
    """Reading and decoding run one chunk ahead of inference, in a thread."""
    ready: queue.Queue[tuple[int | None, Any]] = queue.Queue(maxsize=2)

    def reader() -> None:
        try:
            for k in todo:
                ready.put((k, _read_chunk(plan[k], engine.geometry)))
        except BaseException as exc:  # handed to the main thread
            ready.put((None, exc))
        ready.put((None, None))

    threading.Thread(target=reader, daemon=True, name="photoz-reader").start()
    while True:
        k, item = ready.get()
        if k is None:
            if isinstance(item, BaseException):
                raise item
            return
        bar.update(process_chunk(engine, plan[k], parts_dir, k, data=item))


_WORKER_ENGINES: dict[tuple[str, str, int], LocalEngine] = {}


def _dask_task(model: str, providers: str, batch_size: int, plan_k: list[tuple[Source, int, int]],
               parts_dir: str, k: int) -> int:
    """One partition on a Dask worker; the bundle is loaded once per worker process."""
    from distributed import get_worker

    key = (model, providers, batch_size)
    if key not in _WORKER_ENGINES:
        # as many ORT threads as the worker has task threads: workers sharing a machine do not oversubscribe it
        _WORKER_ENGINES[key] = LocalEngine(model, providers, batch_size, threads=get_worker().state.nthreads)
    return process_chunk(_WORKER_ENGINES[key], plan_k, Path(parts_dir), k)


def _run_on_dask(address: str, model: Path, providers: str, batch_size: int, plan: Plan, todo: list[int],
                 engine: Engine, parts_dir: Path, bar: Progress) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    if address.startswith("local:"):
        cluster = LocalCluster(n_workers=int(address.split(":", 1)[1]), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(address)
    try:
        futures = [client.submit(_dask_task, str(model), providers, batch_size, plan[k], str(parts_dir), k,
                                 pure=False) for k in todo]
        for future in as_completed(futures):
            bar.update(future.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
