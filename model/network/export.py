"""Export a network to a model bundle (ONNX + metadata) and verify parity."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from photoz.model.bundle import FORMAT_VERSION, METADATA_KEY, Bundle, load_bundle, parse_metadata
from photoz.model.conventions import BANDS, FLUX_UNIT, PIXEL_SCALE_ARCSEC
from photoz.model.network.pasquet import EnsembleNet, MCDropoutNet, PasquetNet, PITRecalibrated, WithEpistemicSpread
from photoz.model.pdf import RedshiftBins
from photoz.model.recalibration import PITMap

INPUT_IMAGES, INPUT_EBV, OUTPUT_PROBABILITIES = "images", "ebv", "probabilities"
#: Second output of an ensemble's or MC dropout's graph: the members' spread of mean redshift (N,).
OUTPUT_EPISTEMIC = "z_epistemic_std"

#: Largest allowed |p_onnx - p_torch| on random inputs (float32 graph; float16 graph).
PARITY_TOLERANCE = 1e-5
PARITY_TOLERANCE_FP16 = 2e-3


class ParityError(RuntimeError):
    pass


def write_metadata(path: str | Path, metadata: dict[str, Any], out: str | Path | None = None) -> Bundle:
    """Replace the ``photoz`` metadata of the bundle at ``path`` (validated first), writing it to ``out``
    (default: in place, atomically); the graph and weights are untouched. Returns the bundle as written."""
    import onnx

    parse_metadata(metadata)
    path = Path(path)
    proto = onnx.load(str(path))
    _set_metadata(proto, metadata)
    return _save(proto, Path(out or path))


def _save(proto: Any, out: Path) -> Bundle:
    """Write a bundle's graph atomically (the file exists only once complete) and load it back."""
    import onnx

    tmp = out.with_name(out.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(out)
    return load_bundle(out)


def _set_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.doc_string = f"photoz {metadata['model']['name']} {metadata['model']['version']}"


#: ONNX element types of floats, and of the integers an index cast produces.
_FLOAT_TYPES, _INT_TYPES = {1, 10, 11, 16}, {2, 3, 4, 5, 6, 7, 12, 13}
#: Name prefix of the nodes :func:`guard_index_casts` adds (how a guarded cast is recognised).
GUARD_PREFIX = "photoz_nan_safe"


def guard_index_casts(proto: Any) -> int:
    """Make every float-to-integer cast of the graph safe on non-finite values; returns how many it guarded.

    Such a cast makes an index (the PIT map's ``floor(cdf * n_u)`` for GatherElements): a cutout with a NaN or
    infinite PDF (a pixel beyond float32's arithmetic) would cast to an arbitrary integer, and ONNX Runtime
    fails the whole batch on the out-of-range index. Each guarded cast reads ``where(isfinite(x), x, 0)``
    instead: an in-range index, while the float path beside it (the interpolation weight ``pos - j``) keeps
    the NaN, so a non-finite PDF still comes out non-finite and becomes that object's error. Finite inputs
    give bit-identical outputs. Idempotent (a guarded cast is recognised by its input's node name).
    """
    import onnx
    from onnx import helper

    graph = proto.graph
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(onnx.shape_inference.infer_shapes(proto).graph.value_info) + list(graph.input)}
    types.update({t.name: t.data_type for t in graph.initializer})
    nodes, guarded = [], 0
    for node in graph.node:
        source = node.input[0] if node.op_type == "Cast" else ""
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        if source and to in _INT_TYPES and types.get(source) in _FLOAT_TYPES and not source.startswith(GUARD_PREFIX):
            name = f"{GUARD_PREFIX}/{guarded}"
            zero = helper.make_tensor(f"{name}/zero", types[source], [], [0])
            graph.initializer.append(zero)
            nodes += [helper.make_node("IsNaN", [source], [f"{name}/nan"]),
                      helper.make_node("IsInf", [source], [f"{name}/inf"]),
                      helper.make_node("Or", [f"{name}/nan", f"{name}/inf"], [f"{name}/bad"]),
                      helper.make_node("Where", [f"{name}/bad", zero.name, source], [f"{name}/x"])]
            node.input[0] = f"{name}/x"
            guarded += 1
        nodes.append(node)
    if guarded:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.checker.check_model(proto)
    return guarded


def guard_bundle(path: str | Path, out: str | Path | None = None, version: str | None = None) -> tuple[Bundle, int]:
    """:func:`guard_index_casts` on the bundle at ``path``, written to ``out`` (default: in place, atomically).
    With ``version``, the bundle becomes that model version and its training record lists the revision (same
    weights); its other metadata is unchanged. Returns the bundle as written and the number of casts guarded."""
    import onnx

    path, out = Path(path), Path(out or path)
    proto = onnx.load(str(path))
    guarded = guard_index_casts(proto)
    metadata = json.loads(next(p.value for p in proto.metadata_props if p.key == METADATA_KEY))
    if version:
        metadata = revised(metadata, version, f"graph made safe on non-finite values ({guarded} float-to-integer "
                                              "index cast(s) guarded: a NaN PDF no longer fails its batch); same "
                                              "weights, identical outputs for finite inputs")
    _set_metadata(proto, metadata)
    return _save(proto, out), guarded


def revised(metadata: dict[str, Any], version: str, change: str) -> dict[str, Any]:
    """A bundle's metadata as model ``version``, its training record listing the revision (``change``, this
    code's commit)."""
    revision = {"version": version, "code_commit": code_commit(), "change": change}
    training = metadata["training"]
    return {**metadata, "model": {**metadata["model"], "version": version},
            "training": {**training, "revisions": [*training.get("revisions", []), revision]}}


def code_commit() -> str:
    """The git commit of the code doing the export, or 'unknown' outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def untrained_record(seed: int = 0) -> dict[str, Any]:
    """Training record of a network that was never trained (random weights)."""
    return {"dataset": {"name": "none", "provenance": "random initial weights, not trained", "n_objects": 0},
            "seed": seed, "epochs": 0, "code_commit": code_commit(), "metrics": {}}


def make_metadata(net: PasquetNet | EnsembleNet | MCDropoutNet, variant: str, model_name: str, model_version: str,
                  training: dict[str, Any], bins: RedshiftBins | None = None) -> dict[str, Any]:
    cfg = net.config
    bins = bins or RedshiftBins.uniform(n_bins=cfg.n_bins)
    if bins.n_bins != cfg.n_bins:
        raise ValueError(f"grid has {bins.n_bins} bins, the network outputs {cfg.n_bins}")
    doc = {
        "format_version": FORMAT_VERSION,
        "model": {"name": model_name, "version": model_version},
        "architecture": {"name": variant, "config": cfg.to_dict()},
        "bands": list(BANDS[: cfg.n_bands]),
        "cutout_size_pixels": cfg.cutout_size,
        "pixel_scale_arcsec": PIXEL_SCALE_ARCSEC,
        "flux_unit": FLUX_UNIT,
        "redshift_bins": bins.to_metadata(),
        "inputs": {"images": INPUT_IMAGES, "ebv": INPUT_EBV},
        "outputs": {"probabilities": OUTPUT_PROBABILITIES},
        "training": training,
    }
    parse_metadata(doc)
    return doc


def export_bundle(net: PasquetNet | EnsembleNet | MCDropoutNet, path: str | Path, metadata: dict[str, Any],
                  parity_samples: int = 4, seed: int = 0, fp16: bool = False, pit_map: PITMap | None = None) -> Bundle:
    """Write ``net`` (a network, a deep ensemble of them whose PDFs the graph averages, or a network with MC
    dropout whose passes it averages; put in eval mode here) to ``path`` as an ONNX bundle with ``metadata``
    (:func:`make_metadata`; validated before writing), check ONNX Runtime against torch on ``parity_samples``
    random cutouts drawn from ``seed``, and return it loaded back (:func:`~photoz.model.bundle.load_bundle`).

    The graph has a dynamic batch axis, inputs ``images`` (N, bands, S, S) float32 nanomaggies and ``ebv``
    (N, 1) float32 mag, and output ``probabilities`` (N, n_bins). ``fp16``: weights and compute in float16
    (GPUs), inputs and outputs float32, checked against :data:`PARITY_TOLERANCE_FP16`. ``pit_map``: a
    conditional PIT recalibration (``photoz calibrate-pit``) applied after the softmax, recorded as
    ``recalibration``. Raises :class:`ParityError` when the runtimes disagree by more than
    :data:`PARITY_TOLERANCE` (probability).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = net.config
    graph, outputs, metadata = _export_graph(net.eval().to("cpu"), metadata, pit_map)
    example = (torch.zeros(2, cfg.n_bands, cfg.cutout_size, cfg.cutout_size), torch.zeros(2, 1))
    torch.onnx.export(
        graph, example, str(path), dynamo=False, opset_version=17,
        input_names=[INPUT_IMAGES, INPUT_EBV], output_names=outputs,
        dynamic_axes={INPUT_IMAGES: {0: "batch"}, INPUT_EBV: {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
    )
    proto = onnx.load(str(path))
    guard_index_casts(proto)
    if fp16:
        from onnxconverter_common import float16

        proto = float16.convert_float_to_float16(proto, keep_io_types=True)
        metadata = {**metadata, "precision": "float16"}
    _set_metadata(proto, metadata)
    onnx.save(proto, str(path))
    bundle = load_bundle(path)
    check_parity(graph, path, n=parity_samples, seed=seed,
                 tolerance=PARITY_TOLERANCE_FP16 if fp16 else PARITY_TOLERANCE)
    return bundle


def _export_graph(net: PasquetNet | EnsembleNet | MCDropoutNet, metadata: dict[str, Any], pit_map: PITMap | None,
                  ) -> tuple[PasquetNet | EnsembleNet | MCDropoutNet | WithEpistemicSpread | PITRecalibrated, list[str],
                             dict[str, Any]]:
    """The module to export (with the members' spread as a second output for an ensemble or MC dropout, and the
    PIT map after the softmax), its output names, and the metadata saying so."""
    core: PasquetNet | EnsembleNet | MCDropoutNet | WithEpistemicSpread = net
    outputs = [OUTPUT_PROBABILITIES]
    centres = RedshiftBins.from_metadata(metadata["redshift_bins"]).centres
    if isinstance(net, (EnsembleNet, MCDropoutNet)):  # several networks: their disagreement as a second output
        core = WithEpistemicSpread(net, centres).eval()
        outputs.append(OUTPUT_EPISTEMIC)
        metadata = {**metadata, "outputs": {**metadata["outputs"], "epistemic_std": OUTPUT_EPISTEMIC}}
    graph: PasquetNet | EnsembleNet | MCDropoutNet | WithEpistemicSpread | PITRecalibrated = core
    if pit_map is not None:
        graph = PITRecalibrated(core, pit_map, centres).eval()
        metadata = {**metadata, "recalibration": pit_map.to_metadata()}
    return graph, outputs, metadata


def check_parity(net: PasquetNet | EnsembleNet | MCDropoutNet | WithEpistemicSpread | PITRecalibrated,
                 path: str | Path, n: int = 4, seed: int = 0, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |p_onnx - p_torch| over random SDSS-like inputs; raise if above tolerance. For the graph of an
    ensemble or MC dropout (:class:`WithEpistemicSpread`), its members' spread must agree too (in redshift)."""
    import onnxruntime as ort

    cfg = net.config
    rng = np.random.default_rng(seed)
    # sky-noise-level pixels plus a bright core, so the asinh layer sees both regimes
    images = rng.normal(0, 0.05, (n, cfg.n_bands, cfg.cutout_size, cfg.cutout_size)).astype(np.float32)
    images[:, :, 28:36, 28:36] += rng.uniform(0, 50, (n, cfg.n_bands, 1, 1)).astype(np.float32)
    ebv = rng.uniform(0, 0.2, (n, 1)).astype(np.float32)
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(images), torch.from_numpy(ebv))
    expected = [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_PROBABILITIES, OUTPUT_EPISTEMIC][:len(expected)], {INPUT_IMAGES: images, INPUT_EBV: ebv})
    max_dp = float(np.max(np.abs(got[0] - expected[0])))
    if not max_dp < tolerance:
        raise ParityError(f"ONNX Runtime and torch disagree: max |dp| = {max_dp:.3g} >= {tolerance}")
    if len(expected) > 1:  # the members' spread, in redshift (z < 0.4: the PDF's tolerance x 0.4)
        max_dz = float(np.max(np.abs(got[1] - expected[1])))
        if not max_dz < tolerance * 0.4:
            raise ParityError(f"ONNX Runtime and torch disagree on the members' spread: max |dz| = {max_dz:.3g}")
    return max_dp
