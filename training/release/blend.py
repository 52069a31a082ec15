"""The blend detector of the quality flags: a small convolutional network, trained on a training set's own
galaxies against the same galaxies with another of them added close by.

The hand-made features miss most close pairs of similar galaxies (a pair is symmetric about its midpoint, and
at 1.5-3" two galaxies of half-light radius ~2.5" make one blob), so ``photoz export`` and ``photoz
ood-thresholds`` train this detector on the first cutouts of the training set when they measure the other
thresholds: each galaxy once as it is and once with a companion, another galaxy of the set
:data:`~photoz.training.simulation.companions.COMPANION_DISTANCE_ARCSEC` away at
:data:`~photoz.training.simulation.companions.COMPANION_FLUX_RATIO` times its r flux. The network sees
:func:`photoz.model.features.blend_input` (the central r+i pixels, scaled by their own flux), is stored in the
bundle's metadata as ONNX, and its score's threshold is the training galaxies' upper tail, like the other
features'. Deterministic for a seed on one machine.
"""
from __future__ import annotations

import io
import logging

import numpy as np
import torch
from torch import nn

from photoz.model.features import BLEND_CROP_PIXELS

log = logging.getLogger("photoz.blend")

EPOCHS, BATCH, LEARNING_RATE = 5, 128, 1e-3


class BlendCNN(nn.Module):
    """Three 3x3 convolutions with pooling and two dense layers: (N, 1, C, C) -> logits (N,)."""

    def __init__(self, crop: int = BLEND_CROP_PIXELS):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * (crop // 8) ** 2, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)[:, 0]


def train_blend_net(singles: np.ndarray, blends: np.ndarray, seed: int = 0, epochs: int = EPOCHS) -> bytes:
    """Train :class:`BlendCNN` on detector inputs of single galaxies (label 0) and blends (label 1), with random
    90-degree rotations and flips; return it as ONNX bytes (input ``x``, output ``logit``)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(np.concatenate([singles, blends]).astype(np.float32))
    y = torch.cat([torch.zeros(len(singles)), torch.ones(len(blends))])
    net = BlendCNN(singles.shape[-1])
    optimiser = torch.optim.Adam(net.parameters(), LEARNING_RATE)
    loss_fn = nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(len(x)))
        total = 0.0
        for start in range(0, len(x), BATCH):
            idx = order[start:start + BATCH]
            batch = torch.rot90(x[idx], int(rng.integers(4)), (2, 3))
            if rng.random() < 0.5:
                batch = torch.flip(batch, (3,))
            loss = loss_fn(net(batch), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        log.info("blend detector epoch %d/%d: loss %.4f", epoch + 1, epochs, total / len(x))
    net.eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(2, *x.shape[1:]),), buffer,  # type: ignore[arg-type]
                      dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["logit"], dynamic_axes={"x": {0: "n"}, "logit": {0: "n"}})
    return buffer.getvalue()
