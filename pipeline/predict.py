"""``photoz predict``: the service's model over files, offline (no HTTP), resumable.

Inputs: FITS / .npy / .npz files, directories of them, or HDF5 data sets
(``images`` + optional ``ebv``, ``ids``). Objects are numbered in input order
and processed in chunks of ``chunk_size``; each finished chunk is saved under
``OUT.parts/``, so an interrupted run resumes without redoing finished
chunks. Reading the next chunk overlaps with inference of the current one.
The same decoders and engine as the service are used, so the numbers are
the service's numbers. Output: one table (FITS, Parquet, or a qp-readable
HDF5 file) with ids, validity, point estimates, flags and PDFs.
"""
from __future__ import annotations

import functools
import json
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photoz.model.bundle import load_bundle
from photoz.model.runtime import OnnxPredictor
from photoz.formats.inputs import Geometry, canonical_stack, decode, ebv_vector, flag_non_finite, kind_for_filename
from photoz.formats.results import EDGE_BINS, EDGE_PROBABILITY, ESTIMATES, write_qp_hdf5

FILE_SUFFIXES = (".fits", ".fit", ".fts", ".fz", ".npy", ".npz", ".h5", ".hdf5")
#: qp.read takes ".hdf5" for h5py files (".h5" means pandas HDF5 to it), hence no ".h5" here.
OUTPUT_FORMATS = {".fits": "fits", ".fit": "fits", ".parquet": "parquet", ".hdf5": "hdf5"}


@dataclass
class Source:
    """One input file: ``n`` objects, read by slices."""

    path: Path
    n: int

    def read(self, start: int, stop: int, geometry: Geometry):
        suffix = self.path.suffix.lower()
        if suffix in (".h5", ".hdf5"):
            import h5py

            with h5py.File(self.path, "r") as h5:
                images = canonical_stack(h5["images"][start:stop], geometry, f"{self.path.name}[images]")
                ebv = h5["ebv"][start:stop] if "ebv" in h5 else None
                ids = [i.decode() if isinstance(i, bytes) else str(i) for i in h5["ids"][start:stop]] \
                    if "ids" in h5 else None
        elif suffix == ".npy":
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
            images = canonical_stack(array if array.ndim == 3 else array[start:stop], geometry, self.path.name)
            ebv, ids = None, None
        else:
            cut = _decoded_file(self.path, geometry)
            images, ebv, ids = cut.images[start:stop], cut.ebv[start:stop], cut.ids[start:stop]
        n = images.shape[0]
        ids = ids if ids is not None else [f"{self.path.name}:{i}" for i in range(start, start + n)]
        return images, ebv_vector(ebv, n, f"{self.path.name}[ebv]"), ids


def count_objects(path: Path, geometry: Geometry) -> int:
    suffix = path.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as h5:
            return int(h5["images"].shape[0])
    if suffix == ".npy":
        shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        return 1 if len(shape) == 3 else int(shape[0])
    return len(_decoded_file(path, geometry))


@functools.lru_cache(maxsize=1)
def _decoded_file(path: Path, geometry: Geometry):
    """A whole FITS/.npz file, decoded once: counting it and reading its chunks reuse it
    (one file held at a time, so memory stays bounded by the largest file)."""
    return decode(path.read_bytes(), kind_for_filename(path.name, None), geometry, field=path.name)


def find_sources(inputs: list[str | Path], geometry: Geometry) -> list[Source]:
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in FILE_SUFFIXES and p.is_file())
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    if not paths:
        raise FileNotFoundError(f"no FITS, .npy, .npz or HDF5 files in {', '.join(map(str, inputs))}")
    return [Source(p, count_objects(p, geometry)) for p in paths]


def chunk_plan(sources: list[Source], chunk_size: int) -> list[list[tuple[Source, int, int]]]:
    """Object ranges per chunk: chunk k holds objects [k * chunk_size, (k + 1) * chunk_size) of all inputs."""
    chunks, current, room = [], [], chunk_size
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


def _read_chunk(plan, geometry):
    parts = [src.read(a, b, geometry) for src, a, b in plan]
    images = np.concatenate([p[0] for p in parts])
    return images, np.concatenate([p[1] for p in parts]), [i for p in parts for i in p[2]]


class _LocalEngine:
    def __init__(self, bundle_path, providers: str, batch_size: int, threads: int = 0):
        self.bundle = load_bundle(bundle_path)
        self.predictor = OnnxPredictor(self.bundle, providers, intra_op_threads=threads)
        self.batch_size = batch_size

    def run(self, images, ebv):
        outs = [self.predictor.predict_with_estimates(images[i:i + self.batch_size], ebv[i:i + self.batch_size])
                for i in range(0, len(images), self.batch_size)]
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


class _RemoteEngine:
    """The same work sent to a running service through the Python client."""

    def __init__(self, url: str, api_key: str | None):
        from photoz.service.client import PhotozClient

        self.client = PhotozClient(url, api_key=api_key)

    def run(self, images, ebv):
        res = self.client.predict(images, ebv=ebv, ids=[str(i) for i in range(len(images))])
        self.bins = res.bins
        self.model = res.model
        order = np.array([int(i) for i in res.ids], dtype=int)
        return {"probs": res.pdfs, **res.estimates, "_rows": order}


def predict_files(inputs, out, model=None, url=None, api_key=None, providers="auto", chunk_size=4096,
                  batch_size=64, progress=True, dask: str | None = None, keep_parts: bool = False) -> dict:
    """Run the model over ``inputs`` into the table ``out``; returns a summary dict.

    ``dask``: ``"local:N"`` (a LocalCluster of N single-threaded worker
    processes) or a scheduler address; chunks are then the partitions, each
    worker loads the bundle once. ``keep_parts`` keeps the per-chunk files
    and their manifest beside the table.
    """
    if dask and url:
        raise ValueError("--dask and --url are two different routes: choose one")
    out = Path(out)
    fmt = OUTPUT_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise ValueError(f"output must end in .fits, .parquet or .hdf5 (qp-readable), got {out.name}")
    engine = _RemoteEngine(url, api_key) if url else _LocalEngine(model, providers, batch_size)
    if url:
        info = engine.client.models()["models"][0]
        geometry = Geometry(tuple(info["bands"]), info["cutout_size_pixels"])
        bins = np.asarray(_edges_from(info["metadata"]["redshift_bins"]))
        model_info = {"name": info["name"], "version": info["version"], "sha256": info["sha256"]}
    else:
        md = engine.bundle.metadata
        geometry, bins = Geometry(md.bands, md.cutout_size), md.bins.edges
        model_info = {"name": md.name, "version": md.version, "sha256": engine.bundle.sha256}
    sources = find_sources(inputs, geometry)
    plan = chunk_plan(sources, chunk_size)
    parts_dir = out.with_name(out.name + ".parts")
    manifest_path = parts_dir / "manifest.json"
    signature = {"inputs": [str(s.path) for s in sources], "counts": [s.n for s in sources],
                 "chunk_size": chunk_size, "model": model_info}
    if manifest_path.exists() and json.loads(manifest_path.read_text())["signature"] != signature:
        raise RuntimeError(f"{parts_dir} holds a run with other inputs or model: remove it to start afresh")
    parts_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps({"signature": signature}))
    todo = [k for k in range(len(plan)) if not (parts_dir / f"chunk-{k:06d}.npz").exists()]
    total = sum(s.n for s in sources)
    bar = _Progress(total, total - sum(sum(b - a for _, a, b in plan[k]) for k in todo), progress)

    if dask:
        _run_on_dask(dask, Path(model).resolve(), providers, batch_size, plan, todo, geometry, len(bins) - 1,
                     parts_dir.resolve(), bar)
    else:
        _run_local(engine, plan, todo, geometry, len(bins) - 1, parts_dir, bar)
    bar.close()
    n_written = write_table(sorted(parts_dir.glob("chunk-*.npz")), out, fmt, bins, model_info)
    if keep_parts:
        manifest = json.loads(manifest_path.read_text())
        manifest["parts"] = [p.name for p in sorted(parts_dir.glob("chunk-*.npz"))]
        manifest_path.write_text(json.dumps(manifest, indent=1))
    else:
        shutil.rmtree(parts_dir)
    return {"objects": total, "written": n_written, "out": str(out), "format": fmt, "model": model_info}


def process_chunk(engine, plan_k, geometry: Geometry, n_bins: int, parts_dir: Path, k: int, data=None) -> int:
    """Predict one chunk and save it as ``chunk-K.npz``; returns its number of objects."""
    images, ebv, ids = data if data is not None else _read_chunk(plan_k, geometry)
    problems = flag_non_finite(images, geometry.bands)
    valid = np.array([p is None for p in problems])
    result = {"probs": np.full((len(ids), n_bins), np.nan, np.float32),
              **{key: np.full(len(ids), np.nan) for key in ESTIMATES}}
    if valid.any():
        outputs = engine.run(images[valid], ebv[valid])
        rows = outputs.pop("_rows", None)
        rows = np.flatnonzero(valid) if rows is None else np.flatnonzero(valid)[rows]
        result["probs"][rows] = outputs["probs"]
        for key in ESTIMATES:
            result[key][rows] = outputs[key]
    tmp = parts_dir / f"unfinished-{k:06d}.npz"
    np.savez(tmp, ids=np.asarray(ids), valid=valid, errors=np.asarray([p or "" for p in problems]), **result)
    tmp.replace(parts_dir / f"chunk-{k:06d}.npz")  # a chunk file exists only once complete
    return len(ids)


def _run_local(engine, plan, todo, geometry, n_bins, parts_dir, bar) -> None:
    """Reading and decoding run one chunk ahead of inference, in a thread."""
    ready: queue.Queue = queue.Queue(maxsize=2)

    def reader():
        try:
            for k in todo:
                ready.put((k, _read_chunk(plan[k], geometry)))
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
        bar.update(process_chunk(engine, plan[k], geometry, n_bins, parts_dir, k, data=item))


_WORKER_ENGINES: dict = {}


def _dask_task(model, providers, batch_size, plan_k, geometry, n_bins, parts_dir, k) -> int:
    """One partition on a Dask worker; the bundle is loaded once per worker process."""
    from distributed import get_worker

    key = (str(model), providers, batch_size)
    if key not in _WORKER_ENGINES:
        # as many ORT threads as the worker has task threads: workers sharing a machine do not oversubscribe it
        _WORKER_ENGINES[key] = _LocalEngine(model, providers, batch_size, threads=get_worker().state.nthreads)
    return process_chunk(_WORKER_ENGINES[key], plan_k, geometry, n_bins, Path(parts_dir), k)


def _run_on_dask(address, model, providers, batch_size, plan, todo, geometry, n_bins, parts_dir, bar) -> None:
    from dask.distributed import Client, LocalCluster, as_completed

    if address.startswith("local:"):
        cluster = LocalCluster(n_workers=int(address.split(":", 1)[1]), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        client = Client(cluster)
    else:
        cluster, client = None, Client(address)
    try:
        futures = [client.submit(_dask_task, str(model), providers, batch_size, plan[k], geometry, n_bins,
                                 str(parts_dir), k, pure=False) for k in todo]
        for future in as_completed(futures):
            bar.update(future.result())
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _edges_from(doc: dict):
    from photoz.model.pdf import RedshiftBins

    return RedshiftBins.from_metadata(doc).edges


def _flags(probs: np.ndarray) -> np.ndarray:
    at_edge = np.nan_to_num(probs[:, -EDGE_BINS:]).sum(axis=1) >= EDGE_PROBABILITY
    return np.where(at_edge, "pdf_at_grid_edge", "")


def write_table(parts: list[Path], out: Path, fmt: str, bins: np.ndarray, model_info: dict) -> int:
    """Assemble chunk files into the output table, streaming for Parquet and HDF5."""
    tmp = out.with_name(out.name + ".tmp")
    n = 0
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        writer = None
        for part in parts:
            d = np.load(part, allow_pickle=False)
            table = pa.table({"id": d["ids"].astype(str), "valid": d["valid"], "error": d["errors"].astype(str),
                              **{k: d[k] for k in ESTIMATES}, "flags": _flags(d["probs"]),
                              "pdf": pa.FixedSizeListArray.from_arrays(pa.array(d["probs"].ravel()), d["probs"].shape[1])})
            if writer is None:
                meta = {b"photoz": json.dumps({"z_bin_edges": list(map(float, bins)), "model": model_info}).encode()}
                writer = pq.ParquetWriter(tmp, table.schema.with_metadata(meta))
            writer.write_table(table)
            n += len(d["ids"])
        writer.close()
    elif fmt == "hdf5":
        import h5py

        with h5py.File(tmp, "w") as h5:
            first = True
            rejected = []
            for part in parts:
                d = np.load(part, allow_pickle=False)
                v = d["valid"]
                rejected += [(i, e) for i, e in zip(d["ids"][~v].astype(str), d["errors"][~v].astype(str))]
                ancil = {"ids": d["ids"][v].astype("S"), **{k: d[k][v] for k in ESTIMATES},
                         "flags": _flags(d["probs"][v]).astype("S")}
                if first:
                    write_qp_hdf5(h5, bins, d["probs"][v], ancil)
                    for ds in [h5["data/pdfs"], *h5["ancil"].values()]:
                        _make_extendable(h5, ds)
                    first = False
                else:
                    _append(h5["data/pdfs"], d["probs"][v])
                    for key, value in ancil.items():
                        _append(h5["ancil"][key], value)
                n += int(v.sum())
            h5.attrs.update({"model_name": model_info["name"], "model_version": model_info["version"],
                             "model_sha256": model_info["sha256"], "rejected": json.dumps(rejected)})
    else:
        from astropy.table import Table, vstack

        tables = []
        for part in parts:
            d = np.load(part, allow_pickle=False)
            tables.append(Table({"ID": d["ids"].astype(str), "VALID": d["valid"], "ERROR": d["errors"].astype(str),
                                 **{k.upper(): d[k] for k in ESTIMATES}, "FLAGS": _flags(d["probs"]),
                                 "PDF": d["probs"]}))
        table = vstack(tables)
        table.meta.update({"MODEL": model_info["name"], "MODELVER": model_info["version"]})
        n = len(table)
        from astropy.io import fits

        hdus = fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table),
                             fits.BinTableHDU.from_columns([fits.Column("Z_EDGES", "D", array=bins)], name="BINS")])
        hdus[1].name = "PHOTOZ"
        hdus.writeto(tmp, overwrite=True)
    tmp.replace(out)
    return n


def _make_extendable(h5, ds) -> None:
    name, data, dtype = ds.name, ds[...], ds.dtype
    del h5[name]
    h5.create_dataset(name, data=data, maxshape=(None,) + data.shape[1:], dtype=dtype,
                      chunks=(max(1, min(4096, len(data))),) + data.shape[1:])


def _append(ds, values) -> None:
    start = ds.shape[0]
    ds.resize(start + len(values), axis=0)
    ds[start:] = values


class _Progress:
    def __init__(self, total: int, done: int, enabled: bool):
        self.total, self.done, self.enabled = total, done, enabled
        self.start, self.base = time.perf_counter(), done

    def update(self, k: int) -> None:
        self.done += k
        if self.enabled:
            rate = (self.done - self.base) / max(time.perf_counter() - self.start, 1e-9)
            sys.stderr.write(f"\rpredict: {self.done}/{self.total} objects, {rate:.0f} objects/s")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")

