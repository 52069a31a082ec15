"""``photoz recalibrate``: post-hoc temperature scaling of a trained network (Guo et al. 2017).

    photoz recalibrate --checkpoint runs/default/best.pt --out runs/default/calibrated.pt

A network trained with cross-entropy is often over- (or under-) confident:
its PDFs are too narrow (wide), which shows as a PIT histogram shaped like a
U (a hump) and interval coverage below (above) nominal. Dividing the logits
by one temperature T, fitted to minimise the negative log-likelihood of the
true redshift bin on the validation rows the network was *not* trained on,
fixes that without moving the PDFs' peaks. The checkpoint written keeps T;
``photoz export`` puts it in the graph (a constant division before the
softmax) and records it in the bundle's training record, so serving is
unchanged.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: Temperatures searched, bounds of log T
LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true bins under softmax(logits / T)."""
    scaled = logits / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scaled).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(labels.size), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of the true bins ``labels`` (N,) under ``logits`` (N, n_bins)."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64)
    result = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=LOG_T_BOUNDS,
                             method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


@torch.no_grad()
def validation_logits(net, data, rows: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, n_bins) and true redshifts of ``rows`` of the data set."""
    from photoz.training.fit.data import CutoutDataset

    loader: Any = torch.utils.data.DataLoader(CutoutDataset(data, rows),  # type: ignore[arg-type]
                                              batch_size=batch_size)
    logits, zs = [], []
    for images, ebv, z in loader:
        logits.append(net.logits(images, ebv.reshape(-1, 1)).double().numpy())
        zs.append(z.numpy())
    return np.concatenate(logits), np.concatenate(zs)


def recalibrate(checkpoint: str | Path, out: str | Path, data: str | Path | None = None) -> dict:
    """Fit the temperature on the checkpoint's validation rows, write the checkpoint with it to ``out``, and
    return the validation metrics before and after."""
    from photoz.model.pdf import RedshiftBins, photoz_metrics, point_estimates
    from photoz.training.fit.checkpoints import load_checkpoint
    from photoz.training.fit.train import validation_rows

    net, state = load_checkpoint(checkpoint)
    cfg = state["train_config"]
    data = data or cfg["data"]
    val_idx, kind = validation_rows(cfg, data)
    bins = RedshiftBins.from_metadata(cfg["z_bins"])
    logits, z = validation_logits(net, data, val_idx)
    inside = (z >= bins.edges[0]) & (z < bins.edges[-1])
    labels = bins.index_of(z[inside])
    temperature = fit_temperature(logits[inside], labels)

    def scored(t: float) -> dict:
        scaled = logits / t
        pdfs = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        pdfs /= pdfs.sum(axis=1, keepdims=True)
        metrics = photoz_metrics(point_estimates(pdfs, bins)["z_mean"], z, pdfs, bins)
        return {"temperature": t, "nll": nll(logits[inside], labels, t),
                **{k: metrics[k] for k in ("sigma_mad", "bias", "crps", "pit_ks", "coverage_68", "coverage_95")}}

    report = {"checkpoint": str(checkpoint), "data": str(data), "validation_rows": int(val_idx.size),
              "split": kind, "before": scored(1.0), "after": scored(temperature)}
    state = {**state, "temperature": temperature, "recalibration": report}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="photoz recalibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True, help="the recalibrated checkpoint (.pt)")
    parser.add_argument("--data", default=None, help="the training data set (default: the checkpoint's)")
    args = parser.parse_args(argv)
    report = recalibrate(args.checkpoint, args.out, args.data)
    print(json.dumps(report, indent=1))
    return 0
