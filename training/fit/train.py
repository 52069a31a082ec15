"""``photoz train``: fit a network variant to a labelled HDF5 data set.

Reads top to bottom: batches, validation, the split, then the run (:class:`_Run`: data, model, optimiser,
loop); checkpoints are :mod:`photoz.training.fit.checkpoints`.
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
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from photoz.model.network.pasquet import PasquetNet, build, variant_config
from photoz.model.pdf import RedshiftBins, photoz_metrics, point_estimates
from photoz.progress import Progress
from photoz.training.fit.checkpoints import checkpoint_payload, is_better, load_initial_weights
from photoz.training.fit.config import TrainConfig
from photoz.training.fit.data import CutoutDataset, inspect, split_indices, split_rows


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
    run = _Run(cfg, resume)
    # SIGTERM: finish the current step, checkpoint, exit
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: run.stop.update(requested=True))
    writer = _tensorboard(run.out) if run.rank == 0 else None
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            row = run.train_epoch(epoch, progress)
            if row is None:  # stopped, checkpointed
                return run.out
            run.end_epoch(epoch, row, writer)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if run.distributed:
            dist.destroy_process_group()
    return run.out


class _Run:
    """One training run's processes, data, network, optimiser and history (:func:`train` drives it)."""

    def __init__(self, cfg: TrainConfig, resume: bool) -> None:
        self.cfg, self.stop = cfg, {"requested": False}
        self.distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if self.distributed:
            dist.init_process_group("nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if self.use_cuda else "cpu")
        torch.manual_seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        self.out = Path(cfg.out_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        self._data()
        self._network(resume)

    def _data(self) -> None:
        """The file's own train/validation split (e.g. by sky position) when it has one, else a validation split
        held out by object, fixed by the seed."""
        cfg = self.cfg
        info = inspect(cfg.data)
        self.train_idx, self.val_idx, split_kind = training_split(cfg.data, info["n"], cfg.validation_fraction,
                                                                  split_seed(asdict(cfg)), cfg.max_validation)
        self.val_set = CutoutDataset(cfg.data, self.val_idx)
        self.dataset_info = {"name": info["name"], "provenance": info["provenance"], "n_objects": int(info["n"]),
                             "n_train": int(self.train_idx.size), "n_validation": int(self.val_idx.size),
                             "split": split_kind, "seed": info["seed"], "simulator_version": info["simulator_version"]}
        self.bins = RedshiftBins.from_metadata(cfg.z_bins)
        self.preloaded = InMemoryData(cfg.data, self.device) if cfg.preload else None

    def _network(self, resume: bool) -> None:
        """The network and optimiser, from the last checkpoint when resuming, else from ``init_from`` or random."""
        cfg, out, device = self.cfg, self.out, self.device
        self.net = build(variant_config(cfg.variant, n_bins=self.bins.n_bins, dropout=cfg.dropout)).to(device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.start_epoch, self.start_batch, self.best, self.history = 0, 0, None, []
        self.initialised_from = None
        if resume and (out / "last.pt").exists():
            state = torch.load(out / "last.pt", map_location=device, weights_only=False)
            self.net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_epoch, self.start_batch = state["epoch"], state["batch_in_epoch"]
            self.best, self.history = state["best"], state["history"]
            self.initialised_from = state.get("initialised_from")
        elif cfg.init_from:
            self.initialised_from = load_initial_weights(self.net, cfg.init_from)
        # on a CPU, oneDNN's convolutions are faster on channels-last tensors (x1.5 in float32, x2.9 with bfloat16
        # on AMX: python -m benchmarks.train_speed --device cpu)
        self.memory_format = torch.preserve_format if self.use_cuda else torch.channels_last
        self.net.to(memory_format=self.memory_format)  # type: ignore[call-overload]  # the stubs lack it
        for buffer in self.net.buffers():  # DDP broadcasts buffers in place, which a channels-last view refuses
            buffer.data = buffer.data.clone(memory_format=torch.contiguous_format)
        # DDP synchronises gradients only through its own forward: wrap the logits
        self.model: torch.nn.Module = _Logits(self.net)
        if self.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        use_cuda = self.use_cuda
        self.amp_dtype = torch.bfloat16 if not use_cuda or torch.cuda.is_bf16_supported() else torch.float16
        self.autocast = cfg.amp and (use_cuda or cpu_has_bfloat16())
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and self.autocast and
                                           self.amp_dtype == torch.float16)

    def save(self, epoch: int, batch_in_epoch: int, name: str = "last.pt") -> None:
        if self.rank == 0:
            payload = checkpoint_payload(self.net, self.optimizer, self.cfg, epoch, batch_in_epoch, self.best,
                                         self.history, self.dataset_info, self.initialised_from)
            tmp = self.out / (name + ".tmp")
            torch.save(payload, tmp)
            os.replace(tmp, self.out / name)

    def _loader(self, epoch: int) -> tuple[Any, int, int]:
        """This epoch's batches from the point it resumes at: the loader, the batches in the epoch, the skip."""
        cfg = self.cfg
        batches = epoch_batches(self.train_idx, cfg.batch_size, cfg.seed, epoch, self.rank, self.world)
        if cfg.max_steps_per_epoch:
            batches = batches[: cfg.max_steps_per_epoch]
        skip = self.start_batch if epoch == self.start_epoch else 0
        if self.preloaded is not None:
            return self.preloaded.batches(batches[skip:], seed=(cfg.seed, epoch, self.rank, skip)), len(batches), skip
        loader: Any = torch.utils.data.DataLoader(
            CutoutDataset(cfg.data, None, augment=True),  # type: ignore[arg-type]  # a map-style data set
            batch_sampler=batches[skip:], num_workers=cfg.workers, persistent_workers=False, pin_memory=self.use_cuda)
        return loader, len(batches), skip

    def train_epoch(self, epoch: int, progress: bool) -> dict[str, float] | None:
        """One epoch's steps: its row of metrics so far, or None when SIGTERM stopped it (checkpointed)."""
        cfg, device = self.cfg, self.device
        lr = cfg.lr / (cfg.lr_drop_factor if epoch >= cfg.epochs // 2 else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loader, n_batches, skip = self._loader(epoch)
        self.model.train()
        bar = Progress(n_batches, skip, f"epoch {epoch + 1}/{cfg.epochs}", "batch", progress and self.rank == 0)
        last_sigma = self.history[-1]["val_sigma_mad"] if self.history else float("nan")
        running, seen, t0 = 0.0, 0, time.perf_counter()
        batch_in_epoch = skip
        for images, ebv, z in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=self.memory_format)
            ebv = ebv.to(device, non_blocking=True)
            target = torch.from_numpy(self.bins.index_of(z.cpu().numpy())).to(device)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.autocast):
                loss = F.cross_entropy(self.model(images, ebv), target)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            batch_in_epoch += 1
            running += loss.item() * len(z)
            seen += len(z)
            if bar.enabled:
                rate = seen * self.world / (time.perf_counter() - t0)
                bar.postfix(loss=f"{running / seen:.3f}", cut_s=f"{rate:.0f}", val_smad=f"{last_sigma:.4f}")
                bar.update(1)
            if self.stop["requested"]:
                self.save(epoch, batch_in_epoch)
                return None
        bar.close()
        return {"epoch": epoch + 1, "lr": lr, "train_loss": running / max(seen, 1),
                "train_cutouts_per_s": seen * self.world / max(time.perf_counter() - t0, 1e-9)}

    def end_epoch(self, epoch: int, row: dict[str, float], writer: Any) -> None:
        """Validate, log and checkpoint (``best.pt`` too when the validation improved)."""
        if self.rank == 0:
            val = self.val_set if self.preloaded is None else self.preloaded.subset(self.val_idx)
            metrics = validate(self.net, val, self.bins, self.device, self.cfg.workers)
            row.update({f"val_{k}": v for k, v in metrics.items() if k != "n"})
            self.history.append(row)
            _append_csv(self.out / "metrics.csv", row)
            if writer is not None:
                for key, value in row.items():
                    writer.add_scalar(key, value, epoch + 1)
            improved = is_better(row, self.best)
            if improved:
                self.best = dict(row)
            self.save(epoch + 1, 0)
            if improved:
                self.save(epoch + 1, 0, "best.pt")
        if self.distributed:
            dist.barrier()


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


