"""photoz as RAIL stages: redshift PDFs from ugriz cutouts, in this process or through a photoz service.

``PhotozImageInformer`` makes RAIL's model from a photoz bundle (nothing is trained: the bundle is checked and
described). ``PhotozImageEstimator`` reads cutouts chunk by chunk from RAIL's input handle and writes ``qp.hist``
ensembles on the bundle's own redshift bins, with RAIL's point estimates and photoz's as ancillary data.

Input (an HDF5 group, ``hdf5_groupname``; ``""`` is the file's root, as ``photoz simulate`` and
``photoz sdss-dataset`` write it):

``images``  (N, 5, 64, 64) or channel-last (N, 64, 64, 5), nanomaggies, bands u g r i z: the layouts
            ``photoz predict`` reads (the band axis is found by its length), so the same file serves both;
``ebv``     (N,) Galactic E(B-V) in mag, optional (0 when absent, as ``photoz predict``);
any other column of the group is left alone (``object_id`` and ``redshift`` travel to the output as RAIL does).

The work goes through the same engine as ``photoz predict`` (:mod:`photoz.pipeline.engines`): a local ONNX
Runtime session on ``providers``, or, with ``url``, a running ``photoz serve`` through the Python client (the
service must serve the informed bundle: its sha256 is checked). A cutout photoz refuses (non-finite or
impossible pixels, E(B-V) outside 0-10 mag, a model failure on it alone) keeps its row: a flat PDF with
``photoz_valid`` 0 in the ancillary data, counted and explained in the stage's log.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import qp
from ceci.config import StageParameter as Param
from rail.core.common_params import SharedParams
from rail.core.data import DataHandle, ModelHandle, TableHandle, TableLike
from rail.estimation.estimator import CatEstimator
from rail.estimation.informer import CatInformer

#: What the model (RAIL's, the informer's output) records of the bundle.
MODEL_KEYS = ("bundle", "name", "version", "sha256", "bands", "cutout_size_pixels", "bin_edges")
#: Ancillary column saying whether photoz answered the row (1) or refused its cutout (0, flat PDF).
VALID_ANCIL = "photoz_valid"


class StageInputError(ValueError):
    """Bad input through RAIL: the message names the stage and the field, as the photoz CLI's do."""


def _is_hdf5(path: str) -> bool:
    import h5py

    return Path(path).is_file() and h5py.is_hdf5(path)


def _group(h5: Any, name: str, stage: str, path: str) -> Any:
    if not name:
        return h5
    if name not in h5:
        raise StageInputError(f"{stage}: hdf5_groupname: expected a group of {path}, got {name!r} (the file "
                              f"holds {sorted(h5)})")
    return h5[name]


def describe_bundle(path: str | Path) -> dict[str, Any]:
    """RAIL's model for a photoz bundle: its path and what identifies it (name, version, sha256, bands, bins).
    Raises :class:`StageInputError` when ``path`` is not a loadable bundle."""
    from photoz.model.bundle import BundleError, load_bundle

    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"PhotozImageInformer: bundle: expected a photoz bundle (.onnx), got {str(path)!r}, "
                              "which is not a file")
    try:
        bundle = load_bundle(path)
    except (BundleError, ValueError, OSError) as exc:
        raise StageInputError(f"PhotozImageInformer: bundle: expected a photoz bundle (.onnx), got {str(path)!r}: "
                              f"{exc}") from exc
    md = bundle.metadata
    return {"bundle": str(path.resolve()), "name": md.name, "version": md.version, "sha256": bundle.sha256,
            "bands": list(md.bands), "cutout_size_pixels": int(md.cutout_size),
            "bin_edges": np.asarray(md.bins.edges, np.float64)}


class PhotozImageInformer(CatInformer):
    """A photoz bundle as RAIL's model: ``inform`` checks the bundle and records what identifies it.

    photoz's networks are trained with ``photoz train`` on cutouts (see photoz's README); RAIL's inform step
    only adopts a bundle, so it needs no training data (``inform()`` takes none).
    """

    name = "PhotozImageInformer"
    entrypoint_function = "inform"
    config_options = CatInformer.config_options.copy()
    config_options.update(bundle=Param(str, None, required=True, msg="path of the photoz bundle (.onnx)"))
    inputs: list = []

    def inform(self, training_data: TableLike | None = None, **kwargs: Any) -> ModelHandle:
        """RAIL's model for ``config.bundle`` (any ``training_data`` is ignored: the bundle is trained)."""
        if training_data is not None:
            self.log.info(f"{self.name}: training data ignored (photoz bundles are trained with photoz train)")
        self.validate()
        self.run()
        self.finalize()
        return self.get_handle("model")

    def run(self) -> None:
        self.model = describe_bundle(self.config.bundle)
        self.add_data("model", self.model)


class PhotozImageEstimator(CatEstimator):
    """Redshift PDFs of cutouts with a photoz bundle: ``qp.hist`` on the bundle's bins, chunk by chunk.

    Ancillary data per object: RAIL's point estimates (``calculated_point_estimates``), photoz's own
    (``z_mean``, ``z_median``, ``z_mode``, ``z_std``, the 68 and 95 per cent intervals ``z_lo68`` ...
    ``z_hi95``, ``z_epistemic_std``), ``flags`` (photoz's quality flag bits) and ``photoz_valid``.
    With ``calc_summary_stats`` RAIL's own ``z_median`` etc. replace photoz's of the same name (RAIL's come
    from qp's quantiles on the histogram; photoz's from the same histogram's CDF: they agree to the bin's
    interpolation).
    """

    name = "PhotozImageEstimator"
    entrypoint_function = "estimate"
    config_options = CatEstimator.config_options.copy()
    config_options.update(
        hdf5_groupname=Param(str, "", msg="HDF5 group of the cutouts ('' : the file's root)"),
        images_col=Param(str, "images", msg="dataset of the cutouts, nanomaggies, (N, 5, 64, 64) or channel-last"),
        ebv_col=Param(str, "ebv", msg="dataset of Galactic E(B-V), mag (0 when absent)"),
        providers=Param(str, "auto", msg="ONNX Runtime providers of the local engine: auto, tensorrt, cuda, cpu"),
        batch_size=Param(int, 64, msg="cutouts per model call of the local engine"),
        url=Param(str, "", msg="a running photoz service to send the cutouts to instead ('' : run here)"),
        api_key=Param(str, "", msg="the service's API key, if it has any"),
        zmin=SharedParams.copy_param("zmin"),
        zmax=SharedParams.copy_param("zmax"),
        nzbins=SharedParams.copy_param("nzbins"),
    )
    # RAIL's grid for its mode estimate: the bundle's range (0 < z < 0.4), finer than its 180 bins
    config_options["zmin"].set_default(0.0)
    config_options["zmax"].set_default(0.4)
    config_options["nzbins"].set_default(401)
    inputs = [("model", ModelHandle), ("input", TableHandle)]

    def __init__(self, args: Any, **kwargs: Any) -> None:
        super().__init__(args, **kwargs)
        self.engine: Any = None
        self.refused = 0

    def estimate(self, input_data: TableLike, **kwargs: Any) -> Any:
        """RAIL's ``estimate``; a handle to a file is read chunk by chunk as in a pipeline, not loaded whole
        first (a file of cutouts is ~100 kB per object)."""
        if isinstance(input_data, DataHandle) and input_data.has_path and input_data.data is None:
            self.set_data("input", input_data, do_read=False)
            self.validate()
            self.run()
            self.finalize()
            results = self.get_handle("output")
            if self.config.output_mode != "return":
                results.read(force=True)
            return results
        return super().estimate(input_data, **kwargs)

    def input_iterator(self, tag: str, **kwargs: Any) -> Any:
        """Chunks of an HDF5 input read with h5py: only the columns this stage uses (``images``, ``ebv``, and
        RAIL's ``id_col`` / ``redshift_col``), whatever else the group holds (photoz's data sets keep
        ``truth/`` and ``catalogue/`` groups beside the cutouts, which RAIL's table reader cannot size); each
        MPI rank its own chunks (RAIL's split, :func:`tables_io.io_utils.iterator.data_ranges_by_rank`)."""
        handle = self.get_handle(tag, allow_missing=True)
        path = handle.path if handle is not None else None
        if tag != "input" or path in (None, "None", "none") or not _is_hdf5(path):
            return super().input_iterator(tag, **kwargs)
        import h5py

        with h5py.File(path, "r") as h5:
            group = _group(h5, self.config.hdf5_groupname, self.name, path)
            if self.config.images_col not in group:
                raise StageInputError(f"{self.name}: input[{path}:{group.name}]: expected a dataset "
                                      f"{self.config.images_col!r} of cutouts, got {sorted(group)}")
            self._input_length = int(group[self.config.images_col].shape[0])
        return self._chunks(path, int(kwargs.get("chunk_size", self.config.chunk_size)))

    def _chunks(self, path: str, chunk_size: int) -> Any:
        import h5py
        from tables_io.io_utils.iterator import data_ranges_by_rank

        wanted = (self.config.images_col, self.config.ebv_col, self.config.id_col, self.config.redshift_col)
        with h5py.File(path, "r") as h5:
            group = _group(h5, self.config.hdf5_groupname, self.name, path)
            columns = [c for c in wanted if c in group and isinstance(group[c], h5py.Dataset)]
            for start, end in data_ranges_by_rank(self._input_length, chunk_size, self.size, self.rank):
                yield start, end, {c: group[c][start:end] for c in columns}

    def open_model(self, **kwargs: Any) -> Any:
        model = super().open_model(**kwargs)
        missing = [k for k in MODEL_KEYS if not isinstance(model, dict) or k not in model]
        if missing:
            raise StageInputError(f"{self.name}: model: expected the output of PhotozImageInformer "
                                  f"(keys {', '.join(MODEL_KEYS)}), got {type(model).__name__} "
                                  f"lacking {', '.join(missing)}")
        self.engine = self._open_engine(model)
        return model

    def _open_engine(self, model: dict[str, Any]) -> Any:
        from photoz.pipeline.engines import Engine, LocalEngine, RemoteEngine

        engine: Engine
        if self.config.url:
            engine = RemoteEngine(self.config.url, self.config.api_key or None)
            where = f"the service at {self.config.url}"
        else:
            engine = LocalEngine(model["bundle"], self.config.providers, self.config.batch_size)
            where = model["bundle"]
        if engine.model.sha256 != model["sha256"]:
            raise StageInputError(f"{self.name}: model: {where} holds bundle {engine.model.name} "
                                  f"{engine.model.version} (sha256 {engine.model.sha256[:12]}...), not the informed "
                                  f"{model['name']} {model['version']} (sha256 {model['sha256'][:12]}...): "
                                  "inform again")
        return engine

    def _process_chunk(self, start: int, end: int, data: TableLike, first: bool) -> None:
        from photoz.formats.cutouts import finish
        from photoz.formats.errors import InputError
        from photoz.model.pdf import ESTIMATES
        from photoz.pipeline.predict import predict_rows

        column, group = self.config.images_col, self.config.hdf5_groupname or "/"
        if column not in data:
            raise StageInputError(f"{self.name}: input[{group}]: expected a dataset {column!r} of cutouts, got "
                                  f"the columns {sorted(data)}")
        field = f"{self.name}: input[{group}][{column}]"
        try:
            cutouts = finish(data[column], self.engine.geometry, data.get(self.config.ebv_col), None, field)
        except InputError as exc:
            raise StageInputError(str(exc)) from exc
        rows = predict_rows(self.engine, cutouts)  # photoz predict's rows: same engine, same refusals
        probs = np.asarray(rows.probs, np.float64)
        probs[~rows.valid] = 1.0 / probs.shape[1]  # refused rows: flat, marked invalid
        ancil = {**{key: rows.estimates[key] for key in ESTIMATES}, "flags": rows.flag_bits.astype(np.int64),
                 VALID_ANCIL: rows.valid.astype(np.int8)}
        self._report_refused(start, [None if ok else error for ok, error in zip(rows.valid, rows.errors,
                                                                                  strict=True)])
        edges = np.asarray(self.engine.edges, np.float64)
        ensemble = qp.Ensemble(qp.hist, data={"bins": edges, "pdfs": probs / np.diff(edges)[None, :]})
        ensemble.set_ancil(ancil)
        self._do_chunk_output(ensemble, start, end, first, data=data)

    def _report_refused(self, start: int, problems: list[str | None]) -> None:
        bad = [(start + i, p) for i, p in enumerate(problems) if p is not None]
        if not bad:
            return
        self.refused += len(bad)
        shown = "; ".join(f"row {i}: {p}" for i, p in bad[:3]) + (" ..." if len(bad) > 3 else "")
        self.log.warning(f"{self.name}: {len(bad)} cutout(s) of rows {start}- refused (flat PDF, "
                         f"{VALID_ANCIL} = 0): {shown}")
