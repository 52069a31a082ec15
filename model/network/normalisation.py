"""Pixel normalisation, the first layer of every photoz network.

Being a layer, it is exported inside the ONNX graph: the service hands raw
nanomaggies to the graph and cannot skew from photoz.training.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class AsinhNormalisation(nn.Module):
    """y = asinh(x / b_band), with a fixed per-band softening b in nanomaggies.

    Linear (y ~ x / b) for pixels near the sky noise, logarithmic for bright
    galaxy cores: the dynamic range of SDSS cutouts (sky noise ~0.05 nmgy,
    cores of bright galaxies ~100 nmgy) maps into a few units, and it is
    defined for the negative pixels that sky subtraction leaves. This is the
    magnitude system of Lupton et al. (1999) up to scale. ``b`` is a buffer,
    not a trainable parameter.
    """

    softening_nmgy: torch.Tensor

    def __init__(self, softening_nmgy: Sequence[float]) -> None:
        super().__init__()
        b = torch.as_tensor(softening_nmgy, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.register_buffer("softening_nmgy", b)

    def forward(self, images_nmgy: torch.Tensor) -> torch.Tensor:
        y = images_nmgy / self.softening_nmgy
        # asinh written out: the TorchScript ONNX exporter has no Asinh symbolic
        return torch.sign(y) * torch.log(y.abs() + torch.sqrt(y * y + 1.0))
