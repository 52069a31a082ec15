"""Catalogue baseline: k-nearest-neighbour photo-z on magnitudes, with PDFs.

The counterpart of the nearest-neighbour photo-z of Beck et al. (2016) that
Pasquet et al. (2019) beat on real SDSS. Features: r magnitude and the four
colours u-g, g-r, r-i, i-z, standardised. The PDF of an object is a kernel
density of its neighbours' redshifts (Gaussian kernel of width
``bandwidth``, integrated exactly over each bin), on the same bins as the
CNN, so every metric compares like with like.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from photoz.model.conventions import BANDS
from photoz.model.pdf import RedshiftBins


def catalogue_features(mags: np.ndarray) -> np.ndarray:
    """(N, 5) ugriz magnitudes -> (N, 5) features: r, u-g, g-r, r-i, i-z."""
    mags = np.asarray(mags, dtype=np.float64)
    r = mags[:, BANDS.index("r")]
    return np.column_stack([r, -np.diff(mags, axis=1)])


class _NeighbourModel:
    """What both catalogue methods share: standardised r + colours of a training set (and any ``extra``
    columns, N x m, given alike to ``fit`` and the queries), indexed for its ``k`` nearest neighbours (all of it
    when it is smaller than ``k``)."""

    k: int
    bins: RedshiftBins

    @staticmethod
    def _features(mags: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
        features = catalogue_features(mags)
        return features if extra is None else np.column_stack([features, np.asarray(extra, dtype=np.float64)])

    def fit(self, mags: np.ndarray, z: np.ndarray, extra: np.ndarray | None = None) -> Any:
        from sklearn.neighbors import NearestNeighbors

        self.bins = self.bins or RedshiftBins.uniform()
        features = self._features(mags, extra)
        ok = np.all(np.isfinite(features), axis=1)
        self.mean_, self.scale_ = features[ok].mean(axis=0), features[ok].std(axis=0)
        self.features_ = (features[ok] - self.mean_) / self.scale_
        self.z_ = np.asarray(z, dtype=np.float64)[ok]
        self.index_ = NearestNeighbors(n_neighbors=min(self.k, int(ok.sum()))).fit(self.features_)
        return self

    def scaled(self, mags: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Standardised features of ``mags`` (non-finite ones at the training mean)."""
        features = (self._features(mags, extra) - self.mean_) / self.scale_
        return np.where(np.isfinite(features), features, 0.0)

    def neighbour_redshifts(self, mags: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        """Redshifts of each object's ``k`` nearest training neighbours, (N, k)."""
        _, idx = self.index_.kneighbors(self.scaled(mags, extra))
        return self.z_[idx]


@dataclass
class KNNPhotoZ(_NeighbourModel):
    k: int = 16  # tuned on the real SDSS train/test split (sigma_MAD flat for k = 8..24)
    bandwidth: float = 0.005  # kernel width in redshift; best PIT flatness on real SDSS
    bins: RedshiftBins = None  # type: ignore[assignment]  # fit(): the uniform grid

    def predict_pdfs(self, mags: np.ndarray) -> np.ndarray:
        from scipy.special import ndtr

        z_nb = self.neighbour_redshifts(mags)  # (N, k)
        edges = self.bins.edges
        cdf = ndtr((edges[None, None, :] - z_nb[:, :, None]) / self.bandwidth)  # (N, k, B+1)
        pdf = np.diff(cdf, axis=2).sum(axis=1) + 1e-12
        return pdf / pdf.sum(axis=1, keepdims=True)


@dataclass
class LocalLinearPhotoZ(_NeighbourModel):
    """Local linear regression photo-z (Beck et al. 2016, the SDSS DR12 catalogue photo-z): for each object,
    a linear fit of redshift on r and the four colours over its ``k`` nearest training neighbours, refitted once
    without neighbours beyond 3 sigma; the PDF is a Gaussian of the fit's residual scatter on the CNN's bins."""

    k: int = 100
    min_sigma: float = 0.005  # floor of the PDF width (redshift)
    bins: RedshiftBins = None  # type: ignore[assignment]  # _NeighbourModel.__post_init__: uniform

    def predict(self, mags: np.ndarray, batch: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """Point estimates and their scatter (N,) each."""
        features = self.scaled(mags)
        z_hat, sigma = np.empty(len(features)), np.empty(len(features))
        for start in range(0, len(features), batch):
            part = features[start:start + batch]
            _, idx = self.index_.kneighbors(part)
            design = np.concatenate([np.ones(idx.shape + (1,)), self.features_[idx]], axis=2)  # (n, k, 6)
            target = self.z_[idx]
            weights = np.ones_like(target)
            for _ in range(2):  # fit, then refit without the neighbours beyond 3 sigma
                coef, residual_sigma = _weighted_fits(design, target, weights)
                residuals = target - np.einsum("nkp,np->nk", design, coef)
                weights = (np.abs(residuals) <= 3 * residual_sigma[:, None]).astype(float)
            query = np.concatenate([np.ones((len(part), 1)), part], axis=1)
            z_hat[start:start + batch] = np.einsum("np,np->n", query, coef)
            sigma[start:start + batch] = residual_sigma
        return z_hat, np.maximum(sigma, self.min_sigma)

    def predict_pdfs(self, mags: np.ndarray) -> np.ndarray:
        from scipy.special import ndtr

        z_hat, sigma = self.predict(mags)
        cdf = ndtr((self.bins.edges[None, :] - z_hat[:, None]) / sigma[:, None])
        pdf = np.diff(cdf, axis=1) + 1e-12
        return pdf / pdf.sum(axis=1, keepdims=True)


def _weighted_fits(design: np.ndarray, target: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coefficients (n, p) of ``target`` on ``design`` per object, and the residual scatter (n,)."""
    p = design.shape[2]
    wx = design * weights[:, :, None]
    normal = np.einsum("nkp,nkq->npq", wx, design) + 1e-6 * np.eye(p)[None]  # a whisper of ridge: never singular
    coef = np.linalg.solve(normal, np.einsum("nkp,nk->np", wx, target)[:, :, None])[:, :, 0]
    residuals = target - np.einsum("nkp,np->nk", design, coef)
    dof = np.maximum(weights.sum(axis=1) - p, 1)
    return coef, np.sqrt((weights * residuals ** 2).sum(axis=1) / dof)
