"""Galaxy colours from synthetic photometry: CWW templates through SDSS filters.

The four Coleman-Wu-Weedman templates shipped with GalSim (E, Sbc, Scd, Im)
are mixed linearly in rest-frame r-band light by a continuous type
``t`` in [0, 3] (0 = E, 1 = Sbc, 2 = Scd, 3 = Im), attenuated by internal
dust (Calzetti et al. 2000), redshifted, and integrated through speclite's
``sdss2010-*`` filter curves. K-corrections therefore come from synthetic
photometry, not from a formula. Because photometry is linear in the spectrum,
a table of band fluxes per template, dust value and redshift is exact for
any type mix; only dust and redshift are interpolated.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

from photoz.model.conventions import BANDS

TEMPLATE_NAMES = ("E", "Sbc", "Scd", "Im")
#: Rest-frame wavelength grid, Angstrom: covers the SDSS u..z filters for 0 <= z <= 0.45.
REST_WAVELENGTH_AA = np.arange(1900.0, 11600.0, 5.0)
TABLE_Z = np.linspace(0.0, 0.45, 181)
TABLE_DUST_EBV = np.linspace(0.0, 0.6, 13)
CALZETTI_RV = 4.05


def calzetti_k(wavelength_aa: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) starburst attenuation curve k(lambda) = A_lambda / E(B-V)_star."""
    lam = wavelength_aa / 1e4  # micron
    blue = 2.659 * (-2.156 + 1.509 / lam - 0.198 / lam**2 + 0.011 / lam**3) + CALZETTI_RV
    red = 2.659 * (-1.857 + 1.040 / lam) + CALZETTI_RV
    return np.where(lam < 0.63, blue, red)


#: Nebular emission lines added to the (line-free) CWW continua: rest wavelength in Angstrom and
#: flux relative to H-alpha, typical of SDSS star-forming galaxies (Balmer decrement ~3.5 with
#: mild dust, [NII]/Halpha ~ 0.3, [OIII]/Hbeta ~ 1.5). [OII] is given by ``TemplateTuning.oii_to_halpha``.
EMISSION_LINES_AA = {"Hbeta": (4862.7, 0.29), "[OIII]4959": (4960.3, 0.14),
                     "[OIII]5007": (5008.2, 0.42), "[NII]6548": (6549.9, 0.1), "Halpha": (6564.6, 1.0),
                     "[NII]6584": (6585.3, 0.3), "[SII]6717+31": (6724.0, 0.3)}
OII_WAVELENGTH_AA = 3727.4
EMISSION_LINE_SIGMA_AA = 4.0  # Gaussian width (instrumental + velocity dispersion ~ 180 km/s)


@dataclass(frozen=True)
class TemplateTuning:
    """How the CWW templates are adjusted; the defaults leave them as GalSim ships them (no lines).

    ``uv_suppression_mag`` (one per template: E, Sbc, Scd, Im) dims the
    rest-frame near-UV, rising linearly from 0 at 4000 A to the full value at
    2500 A and below: the calibration knob that brings the templates' u - g
    onto the real SDSS red sequence (CWW E is too bright in the rest UV for
    SDSS ellipticals).

    ``halpha_ew_aa`` (one per template) is the rest-frame H-alpha equivalent
    width in Angstrom; the other lines of ``EMISSION_LINES_AA`` follow with
    their flux ratios. The CWW spectra are continua without nebular lines;
    in star-forming galaxies H-alpha + [NII] sits in the r band below
    z ~ 0.05 and moves into i beyond, which real r - i colours show.
    ``oii_to_halpha`` is the [OII] 3727 line's ratio (observed, dust
    attenuated; [OII] sits in u below z ~ 0.07 and in g beyond z ~ 0.1).

    ``nir_suppression_mag`` dims every template's rest-frame near-IR, rising
    from 0 at 6800 A to the full value at 8000 A and beyond (the extended,
    model part of the CWW spectra): the knob that brings r - i at z < 0.1
    onto real SDSS without touching the colours of distant galaxies.
    """

    uv_suppression_mag: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    halpha_ew_aa: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    nir_suppression_mag: float = 0.0
    oii_to_halpha: float = 0.8

    def __post_init__(self):  # hashable (the photometry table is cached per tuning) whatever sequences arrive
        object.__setattr__(self, "uv_suppression_mag", tuple(float(x) for x in self.uv_suppression_mag))
        object.__setattr__(self, "halpha_ew_aa", tuple(float(x) for x in self.halpha_ew_aa))
        object.__setattr__(self, "nir_suppression_mag", float(self.nir_suppression_mag))
        object.__setattr__(self, "oii_to_halpha", float(self.oii_to_halpha))


def load_templates(tuning: TemplateTuning = TemplateTuning()) -> np.ndarray:
    """CWW templates f_lambda on REST_WAVELENGTH_AA, adjusted by ``tuning``."""
    import galsim

    seds = []
    for name in TEMPLATE_NAMES:
        path = os.path.join(galsim.meta_data.share_dir, "SEDs", f"CWW_{name}_ext.sed")
        sed = galsim.SED(path, wave_type="Ang", flux_type="flambda")
        # GalSim evaluates SEDs at wavelengths in nm and returns photon flux
        # density; dividing by wavelength gives back something proportional to f_lambda
        photons = sed(REST_WAVELENGTH_AA / 10.0)
        seds.append(photons / REST_WAVELENGTH_AA)
    ramp = np.clip((4000.0 - REST_WAVELENGTH_AA) / 1500.0, 0, 1)
    seds = np.array(seds) * 10 ** (-0.4 * np.asarray(tuning.uv_suppression_mag)[:, None] * ramp[None, :])
    seds *= 10 ** (-0.4 * tuning.nir_suppression_mag
                   * np.clip((REST_WAVELENGTH_AA - 6800.0) / 1200.0, 0, 1))[None, :]
    lines = {"[OII]3727": (OII_WAVELENGTH_AA, tuning.oii_to_halpha), **EMISSION_LINES_AA}
    near_halpha = np.abs(REST_WAVELENGTH_AA - EMISSION_LINES_AA["Halpha"][0]) < 60
    for k, ew in enumerate(tuning.halpha_ew_aa):
        if ew <= 0:
            continue
        halpha_flux = ew * np.median(seds[k, near_halpha])  # EW x continuum, f_lambda x Angstrom
        for wavelength, ratio in lines.values():
            profile = np.exp(-0.5 * ((REST_WAVELENGTH_AA - wavelength) / EMISSION_LINE_SIGMA_AA) ** 2)
            seds[k] += halpha_flux * ratio * profile / (profile.sum() * np.diff(REST_WAVELENGTH_AA)[0])
    return seds


@functools.lru_cache(maxsize=4)
def photometry_table(tuning: TemplateTuning = TemplateTuning()) -> tuple[np.ndarray, np.ndarray]:
    """Band fluxes of every (template, dust, redshift), relative to rest r flux.

    Returns ``observed`` with shape (n_templates, n_dust, n_z, n_bands), the
    maggies in each observed band of the redshifted spectrum (including the
    1/(1+z) bandwidth factor), and ``rest_r`` (n_templates, n_dust), the
    maggies of the unredshifted spectrum in r, both for the same
    normalisation so that ratios give K-corrections.
    """
    import speclite.filters

    filters = speclite.filters.load_filters(*[f"sdss2010-{b}" for b in BANDS])
    templates = load_templates(tuning)
    dust = 10 ** (-0.4 * calzetti_k(REST_WAVELENGTH_AA)[None, :] * TABLE_DUST_EBV[:, None])
    spectra = templates[:, None, :] * dust[None, :, :]  # (T, D, L)
    flat = spectra.reshape(-1, REST_WAVELENGTH_AA.size)
    rest = filters.get_ab_maggies(flat, REST_WAVELENGTH_AA)["sdss2010-r"]
    rest_r = np.asarray(rest).reshape(spectra.shape[:2])
    norm = rest_r[:, :1]  # undusted rest r flux of each template
    observed = np.empty(spectra.shape[:2] + (TABLE_Z.size, len(BANDS)))
    for k, z in enumerate(TABLE_Z):
        maggies = filters.get_ab_maggies(flat / (1 + z), REST_WAVELENGTH_AA * (1 + z))
        for b, band in enumerate(BANDS):
            observed[:, :, k, b] = np.asarray(maggies[f"sdss2010-{band}"]).reshape(spectra.shape[:2])
    return observed / norm[:, :, None, None], rest_r / norm


def type_weights(t: np.ndarray) -> np.ndarray:
    """Linear mixing weights (N, 4) of the four templates for continuous types t in [0, 3]."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0, len(TEMPLATE_NAMES) - 1)
    lower = np.minimum(np.floor(t).astype(int), len(TEMPLATE_NAMES) - 2)
    frac = t - lower
    w = np.zeros((t.size, len(TEMPLATE_NAMES)))
    w[np.arange(t.size), lower] = 1 - frac
    w[np.arange(t.size), lower + 1] = frac
    return w


def _interp_axis(table: np.ndarray, grid: np.ndarray, x: np.ndarray, axis: int):
    """Linear interpolation weights along one table axis for values x."""
    x = np.clip(x, grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    f = (x - grid[i]) / (grid[i + 1] - grid[i])
    return i, f


def k_corrections(t, dust_ebv, z, tuning: TemplateTuning = TemplateTuning()) -> np.ndarray:
    """m_band - M_r - DM(z) for each object: (N, 5) magnitudes.

    ``t`` continuous type, ``dust_ebv`` internal E(B-V)_star (Calzetti),
    ``z`` redshift. M_r is the rest-frame r absolute magnitude of the dusty
    spectrum, so the result is the K-correction from rest r to each observed
    band, including the colour of the galaxy (and its emission lines).
    """
    observed, rest_r = photometry_table(tuning)
    w = type_weights(t)
    t_arr = np.asarray(t, dtype=np.float64).ravel()
    iz, fz = _interp_axis(observed, TABLE_Z, np.asarray(z, dtype=np.float64).ravel(), 2)
    idd, fd = _interp_axis(observed, TABLE_DUST_EBV, np.asarray(dust_ebv, dtype=np.float64).ravel(), 1)
    n = t_arr.size
    flux = np.zeros((n, len(BANDS)))
    rest = np.zeros(n)
    for dd, wd in ((idd, 1 - fd), (idd + 1, fd)):
        rest += wd * np.einsum("nt,tn->n", w, rest_r[:, dd])
        for zz, wz in ((iz, 1 - fz), (iz + 1, fz)):
            flux += (wd * wz)[:, None] * np.einsum("nt,tnb->nb", w, observed[:, dd, zz, :])
    return -2.5 * np.log10(flux / rest[:, None])
