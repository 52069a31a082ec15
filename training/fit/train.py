"""``photoz train``: fit a network variant to a labelled HDF5 data set.

Reads top to bottom: config, data, model, optimiser, loop, checkpoints.
Runs on CPU, one GPU (mixed precision) or several processes with DDP
(``torchrun --nproc_per_node=K -m photoz train ...``; gloo on CPU, nccl on
GPU). Loss: cross-entropy over the redshift bins (Pasquet et al. 2019).
Augmentation: random 90-degree rotations and flips. Adam, learning rate
divided by 5 halfway (Lin et al. 2022). A checkpoint is written after every
epoch and on SIGTERM; ``--resume`` continues from the same epoch and batch.
"""
from __future__ import annotations

import csv
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from photoz.model.network.pasquet import PasquetNet, build, variant_config
from photoz.model.pdf import RedshiftBins, photoz_metrics, point_estimates
from photoz.progress import Progress
from photoz.training.fit.config import TrainConfig
from photoz.training.fit.data import CutoutDataset, inspect, split_indices, split_rows

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
    ``PasquetNet.state_dict()``. The exporter keeps the module names of convolutions and dense layers; a PReLU's
    slope gets an anonymous name, so it is found through the graph: the slope of the PReLU that follows the
    convolution ``X.0`` is ``X.1.weight`` (``ConvPReLU`` = convolution, PReLU)."""
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


def epoch_batches(indices: np.ndarray, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list:
    """This rank's batches for an epoch: a permutation fixed by (seed, epoch), sharded by rank."""
    order = indices[np.random.default_rng([seed, epoch]).permutation(indices.size)]
    per_rank = indices.size // world
    mine = order[rank * per_rank:(rank + 1) * per_rank]
    return [mine[i:i + batch_size].tolist() for i in range(0, len(mine) - batch_size + 1, batch_size)] or \
        [mine.tolist()]


class InMemoryData:
    """A whole labelled data set held as tensors on ``device``, with batch-wise augmentation there.

    The same random 90-degree rotations and flips as ``CutoutDataset`` (the
    sky has no preferred orientation), drawn per object from a generator
    seeded by (seed, epoch, rank, first batch) so a resumed epoch is
    reproducible. The file is read in blocks of ``block`` objects, so host
    memory holds one block at a time on the way to the device.
    """

    def __init__(self, path, device, block: int = 4096):
        import h5py

        info = inspect(path)
        with h5py.File(path, "r") as h5:
            n, *rest = h5["images"].shape
            shape = (n, rest[2], rest[0], rest[1]) if info["channel_last"] else (n, *rest)
            self.images = torch.empty(shape, dtype=torch.float32, device=device)
            for start in range(0, n, block):
                chunk = np.asarray(h5["images"][start:start + block], dtype=np.float32)
                if info["channel_last"]:
                    chunk = np.moveaxis(chunk, -1, 1)
                self.images[start:start + len(chunk)] = torch.from_numpy(np.ascontiguousarray(chunk)).to(device)
            ebv = np.asarray(h5["ebv"][:], np.float32) if info["has_ebv"] else np.zeros(n, np.float32)
            self.ebv = torch.from_numpy(ebv[:, None]).to(device)
            self.z = torch.from_numpy(np.asarray(h5["z"][:], np.float32)).to(device)
        self.device = device
        self.indices = None  # all objects; subset() gives a view on some

    def subset(self, indices: np.ndarray) -> InMemoryData:
        view = object.__new__(InMemoryData)
        view.__dict__.update(self.__dict__, indices=np.asarray(indices))
        return view

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.z)

    def batches(self, batch_indices: list, seed: tuple, augment: bool = True):
        rng = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
        for batch in batch_indices:
            idx = torch.as_tensor(batch, device=self.device)
            images = self.images[idx]
            if augment:
                images = augment_batch(images, torch.randint(4, (len(batch),), generator=rng),
                                       torch.randint(2, (len(batch),), generator=rng))
            yield images, self.ebv[idx], self.z[idx]

    def sequential(self, batch_size: int):
        order = np.arange(len(self)) if self.indices is None else self.indices
        return self.batches([order[i:i + batch_size] for i in range(0, len(order), batch_size)], (0,), augment=False)


def augment_batch(images: torch.Tensor, rotations: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Rotate image i of (B, C, H, W) by rotations[i] x 90 degrees, then mirror it if flips[i]."""
    out = torch.empty_like(images)
    for k in range(4):
        for f in range(2):
            sel = torch.nonzero((rotations == k) & (flips == f)).flatten().to(images.device)
            if sel.numel():
                part = torch.rot90(images[sel], k, dims=(2, 3))
                out[sel] = torch.flip(part, dims=(3,)) if f else part
    return out


@torch.no_grad()
def predict_pdfs(net: PasquetNet, dataset, device, batch_size: int = 256, workers: int = 0):
    """PDFs (N, n_bins) and true z of every object in ``dataset`` (a CutoutDataset or InMemoryData)."""
    if isinstance(dataset, InMemoryData):
        loader = dataset.sequential(batch_size)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    net.eval()
    pdfs, zs = [], []
    for images, ebv, z in loader:
        pdfs.append(net(images.to(device), ebv.to(device)).float().cpu().numpy())
        zs.append(z.cpu().numpy())
    return np.concatenate(pdfs), np.concatenate(zs)


def validate(net, dataset, bins: RedshiftBins, device, workers: int) -> dict:
    pdfs, z = predict_pdfs(net, dataset, device, workers=workers)
    return photoz_metrics(point_estimates(pdfs, bins)["z_mean"], z, pdfs, bins)


def split_seed(cfg: dict) -> int:
    """The seed of a run's train/validation split: ``split_seed`` when the run set one, else its ``seed``
    (checkpoints written before ``split_seed`` existed have only the latter)."""
    return cfg["seed"] if cfg.get("split_seed") is None else cfg["split_seed"]


def validation_rows(cfg: dict, data) -> tuple[np.ndarray, str]:
    """The validation rows of ``data`` for a run's config (a checkpoint's ``train_config``), and how they were
    chosen: the rows the run never trained on, where its PDFs are recalibrated."""
    _, rows, kind = training_split(data, inspect(data)["n"], cfg["validation_fraction"], split_seed(cfg),
                                   cfg.get("max_validation"))
    return rows, kind


def training_split(data, n: int, validation_fraction: float, seed: int, max_validation: int | None = None):
    """Training and validation rows of a data set, and how they were chosen: the file's own split (e.g. by sky
    position) when it has one, else a validation fraction held out by object, fixed by the seed."""
    file_train, file_val = split_rows(data, "train"), split_rows(data, "validation")
    if file_train is not None and file_val is not None and file_val.size:
        train_idx, val_idx, kind = file_train, file_val, "the file's split dataset"
    else:
        train_idx, val_idx = split_indices(n, validation_fraction, seed)
        kind = f"random by object ({validation_fraction:g}, seed {seed})"
    if max_validation:
        val_idx = val_idx[:max_validation]
    return train_idx, val_idx, kind


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train; return the run directory (checkpoints ``last.pt``, ``best.pt``, ``metrics.csv``)."""
    # -- processes and device
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # -- data: the file's own train/validation split (e.g. by sky position) when it has one, else a
    # validation split held out by object, fixed by the seed
    info = inspect(cfg.data)
    train_idx, val_idx, split_kind = training_split(cfg.data, info["n"], cfg.validation_fraction,
                                                    split_seed(asdict(cfg)),
                                                    cfg.max_validation)
    val_set = CutoutDataset(cfg.data, val_idx)
    dataset_info = {"name": info["name"], "provenance": info["provenance"], "n_objects": int(info["n"]),
                    "n_train": int(train_idx.size), "n_validation": int(val_idx.size), "split": split_kind,
                    "seed": info["seed"], "simulator_version": info["simulator_version"]}
    bins = RedshiftBins.from_metadata(cfg.z_bins)
    preloaded = InMemoryData(cfg.data, device) if cfg.preload else None

    # -- model and optimiser
    net = build(variant_config(cfg.variant, n_bins=bins.n_bins, dropout=cfg.dropout)).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, start_batch, best, history, initialised_from = 0, 0, None, [], None
    if resume and (out / "last.pt").exists():
        state = torch.load(out / "last.pt", map_location=device, weights_only=False)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, start_batch = state["epoch"], state["batch_in_epoch"]
        best, history = state["best"], state["history"]
        initialised_from = state.get("initialised_from")
    elif cfg.init_from:
        initialised_from = load_initial_weights(net, cfg.init_from)
    # on a CPU, oneDNN's convolutions are faster on channels-last tensors (x1.5 in float32, x2.9 with bfloat16
    # on AMX: python -m benchmarks.train_speed --device cpu)
    memory_format = torch.preserve_format if use_cuda else torch.channels_last
    net.to(memory_format=memory_format)  # type: ignore[call-overload]  # Module.to takes it; the stubs do not
    for buffer in net.buffers():  # DDP broadcasts buffers in place, which a channels-last view refuses
        buffer.data = buffer.data.clone(memory_format=torch.contiguous_format)
    # DDP synchronises gradients only through its own forward: wrap the logits
    model: torch.nn.Module = _Logits(net)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)
    amp_dtype = torch.bfloat16 if not use_cuda or torch.cuda.is_bf16_supported() else torch.float16
    autocast = cfg.amp and (use_cuda or cpu_has_bfloat16())
    scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and autocast and amp_dtype == torch.float16)

    # -- SIGTERM: finish the current step, checkpoint, exit
    stop = {"requested": False}
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

    def save(epoch, batch_in_epoch, name="last.pt"):
        if rank == 0:
            payload = checkpoint_payload(net, optimizer, cfg, epoch, batch_in_epoch, best, history, dataset_info,
                                         initialised_from)
            tmp = out / (name + ".tmp")
            torch.save(payload, tmp)
            os.replace(tmp, out / name)

    writer = _tensorboard(out) if rank == 0 else None
    try:
        for epoch in range(start_epoch, cfg.epochs):
            lr = cfg.lr / (cfg.lr_drop_factor if epoch >= cfg.epochs // 2 else 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = epoch_batches(train_idx, cfg.batch_size, cfg.seed, epoch, rank, world)
            if cfg.max_steps_per_epoch:
                batches = batches[: cfg.max_steps_per_epoch]
            skip = start_batch if epoch == start_epoch else 0
            if preloaded is not None:
                loader = preloaded.batches(batches[skip:], seed=(cfg.seed, epoch, rank, skip))
            else:
                loader = torch.utils.data.DataLoader(
                    CutoutDataset(cfg.data, None, augment=True),  # type: ignore[arg-type]  # a map-style data set
                    batch_sampler=batches[skip:],
                    num_workers=cfg.workers, persistent_workers=False, pin_memory=use_cuda)
            model.train()
            bar = Progress(len(batches), skip, f"epoch {epoch + 1}/{cfg.epochs}", "batch", progress and rank == 0)
            last_sigma = history[-1]["val_sigma_mad"] if history else float("nan")
            running, seen, t0 = 0.0, 0, time.perf_counter()
            batch_in_epoch = skip
            for images, ebv, z in loader:
                images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                ebv = ebv.to(device, non_blocking=True)
                target = torch.from_numpy(bins.index_of(z.cpu().numpy())).to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=autocast):
                    loss = F.cross_entropy(model(images, ebv), target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                batch_in_epoch += 1
                running += loss.item() * len(z)
                seen += len(z)
                if bar.enabled:
                    rate = seen * world / (time.perf_counter() - t0)
                    bar.postfix(loss=f"{running / seen:.3f}", cut_s=f"{rate:.0f}", val_smad=f"{last_sigma:.4f}")
                    bar.update(1)
                if stop["requested"]:
                    save(epoch, batch_in_epoch)
                    return out
            bar.close()
            # -- end of epoch: validate, log, checkpoint
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": running / max(seen, 1),
                   "train_cutouts_per_s": seen * world / max(time.perf_counter() - t0, 1e-9)}
            if rank == 0:
                metrics = validate(net, val_set if preloaded is None else preloaded.subset(val_idx),
                                   bins, device, cfg.workers)
                row.update({f"val_{k}": v for k, v in metrics.items() if k != "n"})
                history.append(row)
                _append_csv(out / "metrics.csv", row)
                if writer is not None:
                    for key, value in row.items():
                        writer.add_scalar(key, value, epoch + 1)
                improved = is_better(row, best)
                if improved:
                    best = dict(row)
                save(epoch + 1, 0)
                if improved:
                    save(epoch + 1, 0, "best.pt")
            if distributed:
                dist.barrier()
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if distributed:
            dist.destroy_process_group()
    return out


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX): there, bfloat16 autocast trains
    ~2x faster; elsewhere it is emulated, and slower than float32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


class _Logits(torch.nn.Module):
    def __init__(self, net: PasquetNet):
        super().__init__()
        self.net = net

    def forward(self, images, ebv):
        return self.net.logits(images, ebv)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def load_checkpoint(path: str | Path, device: str = "cpu") -> tuple[PasquetNet, dict]:
    """Network (eval mode) and the checkpoint's record."""
    from photoz.model.network.pasquet import PasquetConfig

    state = torch.load(path, map_location=device, weights_only=False)
    net = build(PasquetConfig.from_dict(state["network_config"]))
    net.load_state_dict(state["model"])
    net.temperature = float(state.get("temperature", 1.0))
    return net.eval(), state
