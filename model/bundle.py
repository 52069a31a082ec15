"""The model bundle: one ``.onnx`` file whose metadata says what it is (no torch).

The ONNX ``metadata_props`` carry a JSON document under the key ``photoz``::

    {
      "format_version": 1,
      "model": {"name": "photoz-sdss-sim", "version": "1.0.0"},
      "architecture": {"name": "pasquet2019_half", "config": {...}},
      "bands": ["u", "g", "r", "i", "z"],
      "cutout_size_pixels": 64,
      "pixel_scale_arcsec": 0.396,
      "flux_unit": "nanomaggy",
      "redshift_bins": {"z_min": 0.0, "z_max": 0.4, "n_bins": 180},   # or {"edges": [...]}
      "inputs": {"images": "images", "ebv": "ebv"},
      "outputs": {"probabilities": "probabilities"},
      "training": {"dataset": {"name": ..., "provenance": ..., "n_objects": ...},
                   "seed": ..., "epochs": ..., "code_commit": ..., "metrics": {...}},
      "quality": {"features_version": 1, "thresholds": {...}, ...}   # optional: the flags' thresholds
    }

:func:`load_bundle` refuses a bundle whose document is missing or wrong and
names every problem it found.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from photoz.model.pdf import RedshiftBins

METADATA_KEY = "photoz"
FORMAT_VERSION = 1

#: Top-level fields and their JSON types.
REQUIRED_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "model": dict,
    "architecture": dict,
    "bands": list,
    "cutout_size_pixels": int,
    "pixel_scale_arcsec": (int, float),
    "flux_unit": str,
    "redshift_bins": dict,
    "inputs": dict,
    "outputs": dict,
    "training": dict,
}
REQUIRED_NESTED: dict[str, tuple[str, ...]] = {
    "model": ("name", "version"),
    "architecture": ("name", "config"),
    "inputs": ("images", "ebv"),
    "outputs": ("probabilities",),
    "training": ("dataset", "seed", "epochs", "code_commit", "metrics"),
}
REQUIRED_DATASET_FIELDS = ("name", "provenance", "n_objects")


#: File name of the shipped default bundle inside ``photoz.model``'s ``bundles/`` folder.
DEFAULT_BUNDLE_NAME = "photoz-sdss-sim.onnx"


def default_bundle_path() -> Path:
    """Where the shipped default bundle is installed (found as package data, wherever photoz is installed)."""
    from importlib.resources import files

    return Path(str(files("photoz.model") / "bundles" / DEFAULT_BUNDLE_NAME))


class BundleError(ValueError):
    """A model bundle that cannot be used, with every reason found."""


@dataclass(frozen=True)
class BundleMetadata:
    document: dict[str, Any]
    bins: RedshiftBins

    @property
    def name(self) -> str:
        return self.document["model"]["name"]

    @property
    def version(self) -> str:
        return str(self.document["model"]["version"])

    @property
    def bands(self) -> tuple[str, ...]:
        return tuple(self.document["bands"])

    @property
    def cutout_size(self) -> int:
        return int(self.document["cutout_size_pixels"])

    @property
    def input_images(self) -> str:
        return self.document["inputs"]["images"]

    @property
    def input_ebv(self) -> str:
        return self.document["inputs"]["ebv"]

    @property
    def output_probabilities(self) -> str:
        return self.document["outputs"]["probabilities"]

    @property
    def output_epistemic(self) -> str | None:
        """The graph's output of the members' spread of mean redshift (ensembles, MC dropout), if it has one."""
        return self.document["outputs"].get("epistemic_std")

    @property
    def pixel_scale_arcsec(self) -> float:
        return float(self.document["pixel_scale_arcsec"])

    @property
    def quality(self) -> dict[str, Any] | None:
        """The quality-flag thresholds measured on the training set (:mod:`photoz.model.quality`), if any."""
        quality = self.document.get("quality")
        return quality if isinstance(quality, dict) else None


def _structure_problems(document: dict[str, Any]) -> list[str]:
    """Missing or mistyped fields, top-level and nested."""
    problems = []
    for key, kind in REQUIRED_FIELDS.items():
        if key not in document:
            problems.append(f"missing field '{key}'")
        elif not isinstance(document[key], kind) or isinstance(document[key], bool):
            problems.append(f"field '{key}' must be {_kind_name(kind)}, got {type(document[key]).__name__}")
    for key, subkeys in REQUIRED_NESTED.items():
        if isinstance(document.get(key), dict):
            problems += [f"missing field '{key}.{s}'" for s in subkeys if s not in document[key]]
    dataset = document.get("training", {}).get("dataset") if isinstance(document.get("training"), dict) else None
    if isinstance(dataset, dict):
        problems += [f"missing field 'training.dataset.{s}'" for s in REQUIRED_DATASET_FIELDS if s not in dataset]
    elif dataset is not None:
        problems.append("field 'training.dataset' must be an object")
    return problems


def parse_metadata(document: Any) -> BundleMetadata:
    """Validate a metadata document; raise :class:`BundleError` listing every problem."""
    if not isinstance(document, dict):
        raise BundleError(f"bundle metadata must be a JSON object, got {type(document).__name__}")
    problems = _structure_problems(document)
    if document.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        problems.append(f"unsupported format_version {document['format_version']} "
                        f"(this photoz reads {FORMAT_VERSION})")
    bands = document.get("bands")
    distinct_names = isinstance(bands, list) and bool(bands) and all(isinstance(b, str) for b in bands) \
        and len(set(bands)) == len(bands)
    if isinstance(bands, list) and not distinct_names:
        problems.append(f"field 'bands' must be a non-empty list of distinct band names, got {bands}")
    bins = None
    if isinstance(document.get("redshift_bins"), dict):
        try:
            bins = RedshiftBins.from_metadata(document["redshift_bins"])
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"field 'redshift_bins' must hold 'edges' or 'z_min', 'z_max', 'n_bins': {exc!r}")
    if problems:
        raise BundleError("invalid photoz bundle metadata: " + "; ".join(problems))
    assert bins is not None  # a dict 'redshift_bins' that did not parse is a problem above
    return BundleMetadata(document=document, bins=bins)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", dict: "an object", list: "a list"}
    return " or ".join(names[k] for k in kinds)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A validated bundle on disk: its metadata, checksum and model card."""

    path: Path
    metadata: BundleMetadata
    sha256: str

    @property
    def model_card_path(self) -> Path | None:
        card = self.path.with_suffix(".md")
        return card if card.exists() else None


def load_bundle(path: str | Path) -> Bundle:
    """Read and validate a bundle: metadata document and graph signature.

    Uses ONNX Runtime (not torch, not the onnx package) so the service can call it.

    Parameters
    ----------
    path : str or Path
        The bundle's ``.onnx`` file.

    Returns
    -------
    Bundle
        Its path, parsed metadata (bands, cutout size, redshift bins, tensor names, training record)
        and SHA-256 checksum; ``model_card_path`` is the ``.md`` beside it, if any.

    Raises
    ------
    BundleError
        Naming everything missing or wrong: no such file, not ONNX, no or invalid ``photoz``
        metadata, a graph whose inputs or outputs disagree with the metadata.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise BundleError(f"model bundle {path} does not exist")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types for unreadable models
        raise BundleError(f"{path} is not a readable ONNX model: {exc}") from exc
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise BundleError(f"{path} has no '{METADATA_KEY}' entry in its ONNX metadata_props: "
                          "export it with `photoz export` or model.export.export_bundle")
    try:
        document = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON: {exc}") from exc
    metadata = parse_metadata(document)
    _check_signature(session, metadata, path)
    return Bundle(path=path, metadata=metadata, sha256=file_sha256(path))


def _check_signature(session: Any, metadata: BundleMetadata, path: Path) -> None:
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    problems = []
    for name in (metadata.input_images, metadata.input_ebv):
        if name not in inputs:
            problems.append(f"graph has no input '{name}' (inputs: {sorted(inputs)})")
    declared = [metadata.output_probabilities] + ([metadata.output_epistemic] if metadata.output_epistemic else [])
    for output in declared:
        if output not in outputs:
            problems.append(f"graph has no output '{output}' (outputs: {sorted(outputs)})")
    if metadata.output_probabilities in outputs:
        n_out = outputs[metadata.output_probabilities][-1]
        if isinstance(n_out, int) and n_out != metadata.bins.n_bins:
            problems.append(f"graph outputs {n_out} bins, metadata declares {metadata.bins.n_bins}")
    images_shape = inputs.get(metadata.input_images)
    if images_shape is not None:
        expected = [len(metadata.bands), metadata.cutout_size, metadata.cutout_size]
        if list(images_shape[1:]) != expected:
            problems.append(f"graph input '{metadata.input_images}' has shape {images_shape}, "
                            f"metadata declares (N, {expected[0]}, {expected[1]}, {expected[2]})")
    if problems:
        raise BundleError(f"{path}: graph does not match its metadata: " + "; ".join(problems))
