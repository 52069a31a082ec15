"""``photoz export``: a training checkpoint to a model bundle with its training record."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from photoz.model.bundle import Bundle
from photoz.model.network.export import code_commit, export_bundle, make_metadata
from photoz.model.network.pasquet import EnsembleNet, MCDropoutNet
from photoz.model.pdf import RedshiftBins
from photoz.training.fit.checkpoints import load_checkpoint
from photoz.training.release.jobs import ExportJob

log = logging.getLogger("photoz.export")


def training_record(state: dict, held_out: dict | None) -> dict:
    """What the bundle says about how it was made (docs/architecture.md: the bundle)."""
    cfg = state["train_config"]
    metrics = {"validation": {k: v for k, v in (state.get("best") or {}).items()}}
    if held_out is not None:
        metrics["held_out"] = {k: v for k, v in held_out["model_metrics"].items() if not k.startswith("by_")}
        metrics["held_out_data"] = held_out["data"]
        if "baseline" in held_out:
            metrics["baseline"] = {"name": held_out["baseline"]["name"],
                                   **{k: v for k, v in held_out["baseline"]["metrics"].items()
                                      if not k.startswith("by_")}}
    record = {"dataset": state["dataset"], "seed": cfg["seed"], "epochs": state["epoch"],
              "variant": cfg["variant"], "batch_size": cfg["batch_size"], "learning_rate": cfg["lr"],
              "code_commit": code_commit(), "metrics": metrics,
              **({"initialised_from": state["initialised_from"]} if state.get("initialised_from") else {})}
    data = Path(cfg.get("data", ""))
    if data.is_file():  # the prior the PDFs carry, which a request's prior divides out (photoz.model.priors)
        record["n_z"] = training_nz_record(data, RedshiftBins.from_metadata(cfg["z_bins"]))
    return record


def export_checkpoint(job: ExportJob) -> Bundle:
    """A checkpoint, or several (a deep ensemble: one architecture and data set, different seeds; their PDFs
    are averaged in the exported graph), to a bundle with its training record and the thresholds of its
    out-of-distribution flags, measured on ``reference_data`` (default: the training set named in the
    checkpoint, if it is there; without either the bundle gets the fixed-definition flags only).

    ``mc_passes`` > 0 exports a network trained with dropout as MC dropout (:class:`MCDropoutNet`: that many
    passes through its dense head with masks drawn from ``mc_seed``, fixed in the graph). ``thresholds=False``
    skips the thresholds (a bundle to score, not to ship). ``pit_map``: a ``photoz calibrate-pit`` report whose
    conditional PIT map the graph applies after the softmax (fitted on this very model's PDFs)."""
    paths = [job.checkpoint] if isinstance(job.checkpoint, (str, Path)) else list(job.checkpoint)
    loaded = [load_checkpoint(p) for p in paths]
    held_out = json.loads(Path(job.held_out_report).read_text()) if job.held_out_report else None
    states = [state for _, state in loaded]
    state = states[0]
    record = training_record(state, held_out)
    net = _network(loaded, paths, record, job.mc_passes, job.mc_seed)
    temperatures = [float(s.get("temperature", 1.0)) for s in states]
    if any(t != 1.0 for t in temperatures):  # post-hoc calibration (photoz recalibrate), applied in the graph
        record["temperature"] = temperatures[0] if len(temperatures) == 1 else temperatures
    recalibration = None
    if job.pit_map is not None:
        from photoz.training.release.pit_calibration import load_pit_map

        recalibration, fitted_on = load_pit_map(job.pit_map)
        record["pit_recalibration"] = {"fitted_on": fitted_on}
    bins = RedshiftBins.from_metadata(state["train_config"]["z_bins"])
    metadata = make_metadata(net, state["train_config"]["variant"], job.name, job.version, record, bins=bins)
    reference = Path(job.reference_data or state["train_config"].get("data", ""))
    if job.reference_data is not None and not reference.is_file():
        raise FileNotFoundError(f"reference data set {reference} does not exist")
    if not job.thresholds:
        log.info("no out-of-distribution thresholds measured (--no-thresholds)")
    elif reference.is_file():
        from photoz.training.release.flags import reference_quality

        metadata["quality"] = reference_quality(reference)
    else:
        log.warning("training set %s not found: the bundle gets no out-of-distribution thresholds "
                    "(give --reference-data, or add them later with `photoz ood-thresholds`)", reference)
    return export_bundle(net, job.out, metadata, fp16=job.fp16, pit_map=recalibration)


def _network(loaded: list, paths: list, record: dict[str, Any], mc_passes: int, mc_seed: int) -> Any:
    """The network to export: one checkpoint's, their ensemble, or MC dropout over one (recorded in
    ``record``)."""
    states = [state for _, state in loaded]
    net: Any
    if len(loaded) == 1:
        net = loaded[0][0]
    else:
        for key, what in (("variant", "architecture"), ("z_bins", "redshift grid")):
            if len({json.dumps(s["train_config"][key], sort_keys=True) for s in states}) > 1:
                raise ValueError(f"ensemble members differ in {what}: {', '.join(str(p) for p in paths)}")
        if len({s["dataset"].get("name") for s in states}) > 1:
            raise ValueError("ensemble members were trained on different data sets")
        net = EnsembleNet([member for member, _ in loaded])
        record["seed"] = [s["train_config"]["seed"] for s in states]
        record["epochs"] = [s["epoch"] for s in states]
        record["metrics"]["validation"] = {"members": [dict(s.get("best") or {}) for s in states]}
        record["ensemble"] = {"members": len(states), "checkpoints": [Path(p).name for p in paths],
                              "combination": "mean of the members' PDFs"}
    if mc_passes:
        if len(loaded) > 1:
            raise ValueError("MC dropout is exported for one network, not for an ensemble")
        net = MCDropoutNet(net, mc_passes, mc_seed)
        record["mc_dropout"] = {"passes": mc_passes, "rate": net.config.dropout, "seed": mc_seed,
                                "combination": "mean of the passes' PDFs; masks fixed at export (deterministic)"}
    return net


def training_nz_record(data: str | Path, bins: RedshiftBins, n: int | None = None, source: str | None = None) -> dict:
    """The ``training.n_z`` record of a labelled HDF5 data set (its first ``n`` rows, default all): counts of its
    true redshifts per model bin. Training and validation rows are one population (a random split)."""
    import h5py

    from photoz.model.priors import nz_record

    with h5py.File(data, "r") as h5:
        z = np.asarray(h5["z"][: n or None], np.float64)
    what = f"every row ({len(z):,})" if n is None else f"its first {len(z):,} rows"
    return nz_record(z, bins, source or f"{Path(data).name}: true redshifts of {what}")
