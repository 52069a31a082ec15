"""Training checkpoints: what a checkpoint holds, which epoch's is best, loading one (or an ONNX bundle's
weights) into a network."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from photoz.model.network.pasquet import PasquetNet, build

#: The validation metric ``best.pt`` is chosen by: the CRPS, a proper score of the whole PDF, so the pick rewards
#: calibrated PDFs as well as accurate means (sigma_MAD alone moved by 1e-4 between epochs whose bias moved by
#: 2e-3 and PIT KS by 0.04); a checkpoint whose record lacks it falls back to sigma_MAD.
BEST_BY = "val_crps"


def is_better(row: dict, best: dict | None) -> bool:
    """Whether an epoch's validation ``row`` beats the ``best`` so far (by :data:`BEST_BY`)."""
    if best is None:
        return True
    key = BEST_BY if BEST_BY in row and BEST_BY in best else "val_sigma_mad"
    return bool(row[key] < best[key])


def checkpoint_payload(net, optimizer, cfg, epoch, batch_in_epoch, best, history, dataset_info,
                       initialised_from=None) -> dict:
    return {
        "model": net.state_dict(), "optimizer": optimizer.state_dict(),
        "train_config": asdict(cfg), "network_config": net.config.to_dict(),
        "epoch": epoch, "batch_in_epoch": batch_in_epoch, "best": best, "history": history,
        "dataset": dataset_info, "initialised_from": initialised_from,
    }


def onnx_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A single network's weights read back from its exported bundle, under the names of
    ``PasquetNet.state_dict()`` (of the network alone where the graph also holds a PIT map). The exporter keeps
    the module names of convolutions and dense layers; a PReLU's slope gets an anonymous name, so it is found
    through the graph: the slope of the PReLU that follows the convolution ``X.0`` is ``X.1.weight``
    (``ConvPReLU`` = convolution, PReLU)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {name: array for name, array in initializers.items() if not name.startswith("onnx::")}
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        if node.op_type != "PRelu" or node.input[1] not in initializers:
            continue
        conv = producers.get(node.input[0])
        if conv is None or conv.op_type != "Conv" or not conv.input[1].endswith(".0.weight"):
            raise ValueError(f"{path}: a PReLU in the graph does not follow a named convolution")
        state[conv.input[1][: -len("0.weight")] + "1.weight"] = initializers[node.input[1]].reshape(-1)
    if not any(name.startswith("features.") for name in state):
        # a bundle with a PIT map in its graph wraps the network as ``net`` beside the map's tables (knots,
        # table, centres): the network's own weights are under that prefix, and the map is not the network's
        state = {name.removeprefix("net."): array for name, array in state.items() if name.startswith("net.")}
    return state


def _align_classifier(state: dict, net: PasquetNet) -> dict:
    """Map the dense layers by their order, so a network with dropout modules in its head (which shift the
    layers' indices) starts from one without, and the other way round."""
    def linear_indices(keys):
        return sorted({int(k.split(".")[1]) for k in keys if k.startswith("classifier.")})

    source = linear_indices(state)
    target = linear_indices(net.state_dict())
    if len(source) != len(target):
        return state
    moved = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    for old, new in zip(source, target, strict=True):
        for kind in ("weight", "bias"):
            if f"classifier.{old}.{kind}" in state:
                moved[f"classifier.{new}.{kind}"] = state[f"classifier.{old}.{kind}"]
    return moved


def load_initial_weights(net: PasquetNet, path: str | Path) -> dict:
    """Start ``net`` from a bundle's (.onnx) or a checkpoint's (.pt) weights; return what it started from (for
    the training record). The architecture must match: every weight of ``net`` must be found, with its shape."""
    import hashlib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init-from: {path} does not exist")
    if path.suffix == ".onnx":
        from photoz.model.bundle import load_bundle

        bundle = load_bundle(path)
        record = {"file": path.name, "sha256": bundle.sha256, "model": bundle.metadata.name,
                  "version": bundle.metadata.version}
        state = {k: torch.from_numpy(v.copy()) for k, v in onnx_state_dict(path).items()}
    else:
        record = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
    state = _align_classifier(state, net)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"--init-from {path}: not the architecture being trained (an ensemble or another variant?):"
                         f" {len(missing)} weights missing, e.g. {missing[:3]}")
    wrong = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"--init-from {path}: weight shapes differ from the variant's (name, found, expected): "
                         f"{wrong[:3]}")
    net.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
    return record


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[PasquetNet, dict]:
    """Network (eval mode) and the checkpoint's record."""
    from photoz.model.network.pasquet import PasquetConfig

    state = torch.load(path, map_location=device, weights_only=False)
    net = build(PasquetConfig.from_dict(state["network_config"]))
    net.load_state_dict(state["model"])
    net.temperature = float(state.get("temperature", 1.0))
    return net.eval(), state
