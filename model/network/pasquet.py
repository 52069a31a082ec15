"""The Pasquet et al. (2019, A&A 621, A26) photo-z network and its named variants.

Input: ``images`` (N, n_bands, 64, 64) in nanomaggies and ``ebv`` (N, 1),
Galactic E(B-V) in magnitudes. Output: ``probabilities`` (N, n_bins), a
softmax over redshift bins.

Topology (paper, Fig. 2): 5x5 conv(64) + PReLU, 2x2 average pool,
inception I0(48,64), I1(64,92), pool, I2(92,128), I3(92,128), pool,
I4(92,128) without its 5x5 branch, flatten, concatenate E(B-V), dense
1096 -> 1096 -> n_bins with ReLU between, softmax.

The first layer is a fixed pixel normalisation (:class:`AsinhNormalisation`)
so that the exported ONNX graph takes raw nanomaggies.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from photoz.model.conventions import BANDS, CUTOUT_SIZE_PIXELS, DEFAULT_N_BINS, sky_sigma_nmgy_per_pixel
from photoz.model.network.normalisation import AsinhNormalisation

#: (squeeze channels s1, branch channels s2, has 5x5 branch) of I0..I4.
INCEPTION_SPECS = ((48, 64, True), (64, 92, True), (92, 128, True), (92, 128, True), (92, 128, False))
#: 2x2 average pooling follows these inception modules (by index).
POOL_AFTER = (1, 3)
STEM_CHANNELS = 64


def default_softening_nmgy() -> tuple[float, ...]:
    """asinh softening per band: the band's 1-sigma sky noise per pixel, nanomaggies."""
    return tuple(round(sky_sigma_nmgy_per_pixel(b), 5) for b in BANDS)


@dataclass(frozen=True)
class PasquetConfig:
    """Hyper-parameters of one variant. Stored verbatim in the bundle metadata.

    ``width`` multiplies every convolution's channel count; ``dense_units``
    is the size of both hidden dense layers; ``softening_nmgy`` is the per-band
    asinh softening of the input normalisation, in nanomaggies; ``dropout`` is
    the dropout rate after each hidden dense layer (0: none, the paper's
    network; above 0 the network can be exported with MC dropout,
    :class:`MCDropoutNet`).
    """

    width: float = 1.0
    dense_units: int = 1096
    n_bins: int = DEFAULT_N_BINS
    n_bands: int = len(BANDS)
    cutout_size: int = CUTOUT_SIZE_PIXELS
    softening_nmgy: tuple[float, ...] = field(default_factory=default_softening_nmgy)
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["softening_nmgy"] = list(self.softening_nmgy)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PasquetConfig:
        d = dict(d)
        d["softening_nmgy"] = tuple(d["softening_nmgy"])
        return cls(**d)

    def channels(self, c: int) -> int:
        return max(1, int(round(c * self.width)))


#: Named variants (timm style). ``pasquet2019`` is the paper's network;
#: ``pasquet2019_half`` is the CPU-trainable one shipped by default;
#: ``pasquet2019_tiny`` exists for fast tests.
VARIANTS: dict[str, PasquetConfig] = {
    "pasquet2019": PasquetConfig(),
    "pasquet2019_half": PasquetConfig(width=0.5, dense_units=256),
    "pasquet2019_tiny": PasquetConfig(width=0.125, dense_units=32),
}


def variant_config(name: str, **overrides: Any) -> PasquetConfig:
    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    return replace(VARIANTS[name], **overrides)


class ConvPReLU(nn.Sequential):
    """k x k convolution with 'same' padding and a per-channel PReLU."""

    def __init__(self, c_in: int, c_out: int, k: int) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, k, padding=k // 2), nn.PReLU(c_out))


class SamePadAvgPool(nn.Sequential):
    """2x2 average pooling with stride 1 and 'same' output size (edge replicated)."""

    def __init__(self) -> None:
        super().__init__(nn.ReplicationPad2d((0, 1, 0, 1)), nn.AvgPool2d(2, stride=1))


class Inception(nn.Module):
    """Pasquet inception module: 1x1; 1x1->3x3; 1x1->5x5; 1x1->2x2 avg pool.

    Output channels: s2 (1x1) + s2 (3x3) + s2 (5x5, optional) + s1 (pool).
    """

    def __init__(self, c_in: int, s1: int, s2: int, with_5x5: bool = True):
        super().__init__()
        self.branch_1x1 = ConvPReLU(c_in, s2, 1)
        self.branch_3x3 = nn.Sequential(ConvPReLU(c_in, s1, 1), ConvPReLU(s1, s2, 3))
        self.branch_5x5 = nn.Sequential(ConvPReLU(c_in, s1, 1), ConvPReLU(s1, s2, 5)) if with_5x5 else None
        self.branch_pool = nn.Sequential(ConvPReLU(c_in, s1, 1), SamePadAvgPool())
        self.out_channels = s2 * (3 if with_5x5 else 2) + s1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch_1x1(x), self.branch_3x3(x)]
        if self.branch_5x5 is not None:
            branches.append(self.branch_5x5(x))
        branches.append(self.branch_pool(x))
        return torch.cat(branches, dim=1)


class PasquetNet(nn.Module):
    def __init__(self, config: PasquetConfig):
        super().__init__()
        self.config = config
        c = config.channels
        layers: list[nn.Module] = [
            AsinhNormalisation(config.softening_nmgy),
            ConvPReLU(config.n_bands, c(STEM_CHANNELS), 5),
            nn.AvgPool2d(2),
        ]
        c_in, side = c(STEM_CHANNELS), config.cutout_size // 2
        for i, (s1, s2, with_5x5) in enumerate(INCEPTION_SPECS):
            module = Inception(c_in, c(s1), c(s2), with_5x5)
            layers.append(module)
            c_in = module.out_channels
            if i in POOL_AFTER:
                layers.append(nn.AvgPool2d(2))
                side //= 2
        layers.append(nn.Flatten())
        self.features = nn.Sequential(*layers)
        n_flat = c_in * side * side
        # dropout modules only when used, so the layers' indices (and older checkpoints) stay as they were
        drop: list[nn.Module] = [nn.Dropout(config.dropout)] if config.dropout > 0 else []
        self.classifier = nn.Sequential(
            nn.Linear(n_flat + 1, config.dense_units), nn.ReLU(), *drop,
            nn.Linear(config.dense_units, config.dense_units), nn.ReLU(), *drop,
            nn.Linear(config.dense_units, config.n_bins),
        )

    def logits(self, images: torch.Tensor, ebv: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores; training uses these with cross-entropy for stability."""
        return self.classifier(torch.cat([self.features(images), ebv.reshape(-1, 1)], dim=1))

    #: Softmax temperature (post-hoc calibration, Guo et al. 2017): the PDF is softmax(logits / T); 1 leaves
    #: the network as trained. A plain attribute, so an exported graph carries it as a constant.
    temperature: float = 1.0

    def forward(self, images: torch.Tensor, ebv: torch.Tensor) -> torch.Tensor:
        logits = self.logits(images, ebv)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.softmax(logits, dim=1)


class EnsembleNet(nn.Module):
    """A deep ensemble (Lakshminarayanan et al. 2017): networks of one architecture trained from different
    seeds, whose PDFs are averaged. Exported as one graph, so serving sees a single network with the same
    inputs and output (and pays K times the compute)."""

    def __init__(self, members: list[PasquetNet]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one network")
        configs = {json.dumps(m.config.to_dict(), sort_keys=True) for m in members}
        if len(configs) > 1:
            raise ValueError("ensemble members must share one architecture (config)")
        self.members = nn.ModuleList(members)
        self.config = members[0].config

    def member_probs(self, images: torch.Tensor, ebv: torch.Tensor) -> torch.Tensor:
        """Each member's PDF: (members, N, bins)."""
        return torch.stack([m(images, ebv) for m in self.members])

    def forward(self, images: torch.Tensor, ebv: torch.Tensor) -> torch.Tensor:
        return self.member_probs(images, ebv).mean(dim=0)


class MCDropoutNet(nn.Module):
    """MC dropout (Gal & Ghahramani 2016) for a network trained with dropout: the PDF is the mean of ``passes``
    passes through the dense head, each with its own dropout masks, over one pass of the convolutions (which
    have no dropout), so T passes cost far less than T networks.

    The masks are drawn once, from ``seed``, when the module is made, and are constants of the exported graph:
    the same cutout always gets the same PDF (an implicit ensemble of ``passes`` thinned heads), which keeps
    serving deterministic and testable. Exported as one graph with the network's inputs and output.
    """

    def __init__(self, net: PasquetNet, passes: int, seed: int = 0):
        super().__init__()
        rate = net.config.dropout
        if not 0 < rate < 1:
            raise ValueError(f"MC dropout needs a network trained with dropout (its rate is {rate})")
        if passes < 1:
            raise ValueError(f"MC dropout needs at least one pass, not {passes}")
        self.net, self.config, self.passes, self.seed = net, net.config, passes, seed
        self.linears = [m for m in net.classifier if isinstance(m, nn.Linear)]
        generator = torch.Generator().manual_seed(seed)
        for k, linear in enumerate(self.linears[:-1]):  # a mask per hidden layer and pass, scaled as in training
            keep = torch.rand(passes, 1, linear.out_features, generator=generator) >= rate
            self.register_buffer(f"mask{k}", keep.float() / (1 - rate))

    def forward(self, images: torch.Tensor, ebv: torch.Tensor) -> torch.Tensor:
        return self.member_probs(images, ebv).mean(dim=0)

    def member_probs(self, images: torch.Tensor, ebv: torch.Tensor) -> torch.Tensor:
        """Each pass's PDF: (passes, N, bins)."""
        x = torch.cat([self.net.features(images), ebv.reshape(-1, 1)], dim=1)  # (N, F)
        h = x.unsqueeze(0)  # (1, N, F): broadcast against the (passes, 1, units) masks
        for k, linear in enumerate(self.linears[:-1]):
            h = torch.relu(linear(h)) * getattr(self, f"mask{k}")
        logits = self.linears[-1](h)  # (passes, N, bins)
        if self.net.temperature != 1.0:
            logits = logits / self.net.temperature
        return torch.softmax(logits, dim=2)


class WithEpistemicSpread(nn.Module):
    """An ensemble's or MC dropout's graph with a second output: the standard deviation, over its members (or
    passes), of their mean redshifts, ``(N,)``: how much the networks disagree (epistemic uncertainty), which
    the averaged PDF alone does not show. ``centres`` are the redshift bins' centres."""

    centres: torch.Tensor

    def __init__(self, net: EnsembleNet | MCDropoutNet, centres: Any):
        super().__init__()
        self.net, self.config = net, net.config
        self.register_buffer("centres", torch.as_tensor(np.asarray(centres, np.float32)))

    def forward(self, images: torch.Tensor, ebv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        members = self.net.member_probs(images, ebv)  # (K, N, bins)
        means = members @ self.centres  # (K, N)
        return members.mean(dim=0), means.std(dim=0, unbiased=False)


class PITRecalibrated(nn.Module):
    """A graph whose PDF goes through a conditional PIT map (:class:`photoz.model.recalibration.PITMap`, fitted
    by ``photoz calibrate-pit``) after the softmax: the same inputs and outputs (an ensemble's or MC dropout's
    spread passes through unchanged), the map's arithmetic in the graph. ``centres`` are the redshift bins'
    centres."""

    knots: torch.Tensor
    table: torch.Tensor
    centres: torch.Tensor

    def __init__(self, net: PasquetNet | EnsembleNet | MCDropoutNet | WithEpistemicSpread, pit_map: Any, centres: Any):
        super().__init__()
        self.net, self.config, self.n_u = net, net.config, int(pit_map.n_u)
        self.register_buffer("knots", torch.as_tensor(np.asarray(pit_map.z_knots, np.float32)))
        self.register_buffer("table", torch.as_tensor(np.asarray(pit_map.table, np.float32)))
        self.register_buffer("centres", torch.as_tensor(np.asarray(centres, np.float32)))

    def remap(self, probs: torch.Tensor) -> torch.Tensor:
        z_mean = probs @ self.centres  # (N,)
        last = self.knots.shape[0] - 2
        seg = (z_mean[:, None] >= self.knots[None, 1:]).to(torch.int64).sum(dim=1).clamp(max=last)
        lo, hi = self.knots[seg], self.knots[seg + 1]
        w = ((z_mean - lo) / (hi - lo)).clamp(0.0, 1.0)[:, None]
        rows = self.table[seg] * (1 - w) + self.table[seg + 1] * w  # (N, n_u + 1): each object's map
        cdf = torch.cumsum(probs, dim=1) / probs.sum(dim=1, keepdim=True)  # at the upper bin edges; 0 below
        pos = (cdf * self.n_u).clamp(0.0, float(self.n_u))
        j = pos.floor().clamp(max=self.n_u - 1)
        f = pos - j
        j = j.to(torch.int64)
        mapped = rows.gather(1, j) * (1 - f) + rows.gather(1, j + 1) * f
        q = torch.cat([mapped[:, :1], mapped[:, 1:] - mapped[:, :-1]], dim=1).clamp(min=0.0)  # G(0) = 0 below
        return q / q.sum(dim=1, keepdim=True)

    def forward(self, images: torch.Tensor, ebv: torch.Tensor) -> Any:
        out = self.net(images, ebv)
        if isinstance(out, tuple):
            return (self.remap(out[0]), *out[1:])
        return self.remap(out)


def build(name_or_config: str | PasquetConfig, **overrides: Any) -> PasquetNet:
    """Build a network from a variant name (with optional overrides) or a config."""
    if isinstance(name_or_config, str):
        config = variant_config(name_or_config, **overrides)
    else:
        config = replace(name_or_config, **overrides)
    return PasquetNet(config)
