"""Galaxy spectra from real SDSS galaxies: kcorrect's templates fitted to real photometry.

Every simulated galaxy's spectrum is that of a real SDSS galaxy. The five
non-negative (NMF) templates that ship with ``kcorrect`` (Blanton & Roweis
2007, ``kcorrect-default-v4.fits``: stellar populations plus nebular
emission, fitted to SDSS spectra and photometry), and a sixth made from
them with a deeper 4000 A break (below), are fitted, by non-negative least
squares, to the ugriz photometry and spectroscopic redshift of each real
galaxy in ``sdss_reference/`` (the training and validation files only: the
test file stays held out for the transfer test), deconvolved of its noise
(below). The fit gives each galaxy's spectrum as six coefficients and its rest-frame
r absolute magnitude; the library of these (``sdss_reference/sed_library.ecsv``,
written by ``python -m photoz.training.simulation.sed``) is what the population
samples from, so the simulated colour distribution at every redshift is the
real one, emission-line strengths and their scatter included.

Photometry is synthetic: the templates are redshifted and integrated through
speclite's ``sdss2010-*`` filter curves, tabulated per template, internal
dust (Calzetti et al. 2000) and redshift; since photometry is linear in the
spectrum, the table is exact for any combination of templates and only dust
and redshift are interpolated.

**Template repair.** Five templates cannot reproduce every real galaxy, and
their mean residual is not zero: fitted as shipped, the model is 0.05 mag too
bright in u (0.11-0.17 beyond z = 0.1) and 0.01 mag too red in g - r, which
alone biased a catalogue photo-z trained on the simulation by -0.006 on real
galaxies. As in template-repair methods (Budavari et al. 2000), a smooth
multiplicative correction of all templates against rest wavelength (knots
``REPAIR_KNOTS_AA``, linear in log wavelength) is fitted to the residuals,
the galaxies refitted, and this repeated until the median residual of every
band is below a millimagnitude.

**Deconvolved photometry.** A library spectrum should be the galaxy's true
spectrum, but fitted to measured magnitudes it carries their noise, and the
simulator adds its own on top: a faint galaxy's u (error 0.2-0.45 mag
beyond z = 0.2) scatters twice. Each galaxy's colour against r is
therefore replaced, before the fit, by a draw from its posterior
(``deconvolved_photometry``): a Gaussian likelihood from the measured
colour and its error, and a Gaussian prior from its 64 nearest neighbours
in the other colours and redshift (their median, and their scatter less
their mean noise). A draw, not the posterior mean, which would make the
library's colours narrower than the real ones.

**A deeper 4000 A break.** Beyond z = 0.15 the five templates cannot make
the reddest real galaxies' u faint enough: fitted to them, 40% of the
library at z 0.20-0.25 kept a u more than 0.05 mag too bright, so the
simulated u - g had no red tail and came out 0.06-0.09 mag too blue there.
A sixth template, kcorrect's template 3 (rest u - g 1.62, g - r 0.75, the
most elliptical-like) times (lambda / 4000 A)^3 below 4000 A, gives the fit
that freedom; with the deconvolution, 9% are left so (simulator 1.8.0).

**Colour gradients.** Bulges are redder than disks. A galaxy's spectrum S
is split into a bulge S (1 + a x) and a disk S (1 - a f x / (1 - f)), with
x = ln(lambda / 5500 A) and f the bulge's share of the light: the sum is
exactly S, so the galaxy's total colours stay those of its real original.
The tilted templates (each template times x) are tabulated beside the
templates for that.
"""
from __future__ import annotations

import argparse
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from photoz.model.conventions import BANDS
from photoz.training.simulation import table_cache
from photoz.training.simulation.cosmology import distance_modulus

KCORRECT_TEMPLATES = "kcorrect-default-v4.fits"
#: kcorrect's five templates and one made from them (UV_SUPPRESSED_*)
N_TEMPLATES = 6
#: The sixth template: kcorrect's template UV_SUPPRESSED_FROM (its oldest-looking: rest u - g 1.62, g - r 0.75)
#: times (lambda / UV_SUPPRESSED_PIVOT_AA) ** UV_SUPPRESSED_INDEX below the pivot (Angstrom): a deeper 4000 A
#: break than any of the five, which cannot make the reddest real galaxies' u faint enough beyond z = 0.15
UV_SUPPRESSED_FROM = 3
UV_SUPPRESSED_PIVOT_AA = 4000.0
UV_SUPPRESSED_INDEX = 3.0
#: Rest-frame wavelengths kept from the templates, Angstrom: SDSS u..z for 0 <= z <= 0.45 with room.
REST_RANGE_AA = (1500.0, 13000.0)
TABLE_Z = np.linspace(0.0, 0.45, 181)
#: Extra Calzetti E(B-V) on a component: negative values take away part of the mean dust a fitted
#: (average-inclination) spectrum already has, for disks seen more face-on than average.
TABLE_DUST_EBV = np.linspace(-0.15, 0.45, 13)
CALZETTI_RV = 4.05
GRADIENT_PIVOT_AA = 5500.0
#: Knots of the template repair curve, rest-frame Angstrom (the rest wavelengths ugriz sample at 0 < z < 0.45)
REPAIR_KNOTS_AA = (2600.0, 3000.0, 3400.0, 3700.0, 4000.0, 4300.0, 4700.0, 5200.0, 5800.0, 6400.0, 7000.0,
                   7800.0, 8800.0)
REFERENCE = Path(__file__).resolve().parent / "sdss_reference"
LIBRARY = REFERENCE / "sed_library.ecsv"
#: Galactic E(B-V) (mag) taken off the real magnitudes before fitting: the reference files carry none, and
#: this is the median of the simulator's own sight lines (PopulationConfig.mw_ebv_median), put back per object.
REFERENCE_MW_EBV = 0.03
#: Magnitude error floor (mag) of the fit: calibration and the templates' own limits
FIT_ERROR_FLOOR_MAG = 0.02
#: Neighbours (in colour and redshift) whose colours are a galaxy's prior when its photometry is deconvolved
DECONVOLUTION_NEIGHBOURS = 64
#: Least intrinsic scatter (mag) of a colour among a galaxy's neighbours in the deconvolution's prior
DECONVOLUTION_FLOOR_MAG = 0.02
#: Rounds of the deconvolution: each galaxy's prior is its neighbours' colours from the round before
DECONVOLUTION_ROUNDS = 5
#: Width of each neighbour's kernel in the prior, in units of the neighbours' robust spread
DECONVOLUTION_KERNEL = 0.5
#: 2.5 / ln 10: a magnitude error is this times the relative flux error
MAG_PER_RELATIVE_FLUX = 2.5 / np.log(10)


def calzetti_k(wavelength_aa: np.ndarray) -> np.ndarray:
    """Calzetti et al. (2000) starburst attenuation curve k(lambda) = A_lambda / E(B-V)_star."""
    lam = wavelength_aa / 1e4  # micron
    blue = 2.659 * (-2.156 + 1.509 / lam - 0.198 / lam**2 + 0.011 / lam**3) + CALZETTI_RV
    red = 2.659 * (-1.857 + 1.040 / lam) + CALZETTI_RV
    return np.where(lam < 0.63, blue, red)


@functools.lru_cache(maxsize=1)
def nmf_templates() -> tuple[np.ndarray, np.ndarray]:
    """kcorrect's default templates and the UV-suppressed one made from them: rest wavelength (Angstrom) and
    f_lambda (N_TEMPLATES, L), within REST_RANGE_AA."""
    import kcorrect
    from kcorrect.template import Template

    path = os.path.join(os.path.dirname(kcorrect.__file__), "data", "templates", KCORRECT_TEMPLATES)
    template = Template(filename=path)
    keep = (template.wave > REST_RANGE_AA[0]) & (template.wave < REST_RANGE_AA[1])
    wave, flux = template.wave[keep].astype(np.float64), template.flux[:, keep].astype(np.float64)
    suppressed = flux[UV_SUPPRESSED_FROM] * np.minimum(1.0, wave / UV_SUPPRESSED_PIVOT_AA) ** UV_SUPPRESSED_INDEX
    return wave, np.vstack([flux, suppressed[None, :]])


def repaired_templates(repair_mag: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The templates times the repair curve (magnitudes at REPAIR_KNOTS_AA; positive brightens), followed by
    their tilted copies (times ln(lambda / GRADIENT_PIVOT_AA)): (2 N_TEMPLATES, L)."""
    wave, flux = nmf_templates()
    curve = np.interp(np.log(wave), np.log(REPAIR_KNOTS_AA), np.asarray(repair_mag, dtype=np.float64))
    flux = flux * 10 ** (0.4 * curve)[None, :]
    return wave, np.concatenate([flux, flux * np.log(wave / GRADIENT_PIVOT_AA)[None, :]])


@functools.lru_cache(maxsize=1)
def sdss_filters():
    """speclite's ``sdss2010-ugriz`` response curves, in BANDS order."""
    import speclite.filters

    return speclite.filters.load_filters(*[f"sdss2010-{b}" for b in BANDS])


@functools.lru_cache(maxsize=4)
def photometry_table(repair_mag: tuple[float, ...]) -> np.ndarray:
    """Band maggies of every (template, dust, redshift): (2 N_TEMPLATES, n_dust, n_z, n_bands).

    The redshifted spectrum's maggies in each observed band (with the 1/(1+z) bandwidth factor), per unit
    of the undusted template's rest-frame r maggies, so that a galaxy whose coefficients sum to one has
    rest-frame r flux one and -2.5 log10 of the table is its K-correction from rest r to each band. The
    tilted copies share their template's normalisation.

    Computing it takes ~3 s (speclite, once per redshift), which every simulation worker paid on its first
    galaxy; the table is kept on disk (:mod:`table_cache`) under a digest of every number it is made from
    (the spectra, the dust curve, the grids, the filter curves, speclite's version), so a cached table is the
    one this code would compute, to the bit.
    """
    filters = sdss_filters()
    wave, templates = repaired_templates(repair_mag)
    dust = 10 ** (-0.4 * calzetti_k(wave)[None, :] * TABLE_DUST_EBV[:, None])
    cached = table_cache.cached_file("photometry-table", (wave, templates, dust, TABLE_Z, TABLE_DUST_EBV,
                                                          *[np.stack([f.wavelength, f.response]) for f in filters]))
    if (table := table_cache.load(cached)) is not None:
        return table
    spectra = templates[:, None, :] * dust[None, :, :]  # (T, D, L)
    flat = spectra.reshape(-1, wave.size)
    norm = np.asarray(filters.get_ab_maggies(templates[:N_TEMPLATES], wave)["sdss2010-r"], dtype=np.float64)
    norm = np.concatenate([norm, norm])
    observed = np.empty(spectra.shape[:2] + (TABLE_Z.size, len(BANDS)))
    for k, z in enumerate(TABLE_Z):
        maggies = filters.get_ab_maggies(flat / (1 + z), wave * (1 + z))
        for b, band in enumerate(BANDS):
            observed[:, :, k, b] = np.asarray(maggies[f"sdss2010-{band}"]).reshape(spectra.shape[:2])
    table = observed / norm[:, None, None, None]
    table_cache.save(cached, table)
    return table


def _interp_axis(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower grid index and linear weight of the upper one, for values x (clipped to the grid)."""
    x = np.clip(x, grid[0], grid[-1])
    i = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, grid.size - 2)
    return i, (x - grid[i]) / (grid[i + 1] - grid[i])


def band_maggies(weights: np.ndarray, dust_ebv, z, repair_mag: tuple[float, ...]) -> np.ndarray:
    """Observed maggies (N, n_bands) of spectra given as template ``weights`` (N, 2 N_TEMPLATES; the first
    N_TEMPLATES are the templates, the rest their tilted copies) with extra Calzetti dust ``dust_ebv`` at
    redshift ``z``, per unit rest-frame r flux of the undusted templates (distance not included)."""
    table = photometry_table(tuple(repair_mag))
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n = w.shape[0]
    iz, fz = _interp_axis(TABLE_Z, np.broadcast_to(np.asarray(z, dtype=np.float64), (n,)))
    idd, fd = _interp_axis(TABLE_DUST_EBV, np.broadcast_to(np.asarray(dust_ebv, dtype=np.float64), (n,)))
    out = np.zeros((n, len(BANDS)))
    for dd, wd in ((idd, 1 - fd), (idd + 1, fd)):
        for zz, wz in ((iz, 1 - fz), (iz + 1, fz)):
            out += (wd * wz)[:, None] * np.einsum("nt,tnb->nb", w, table[:, dd, zz, :])
    return out


def k_corrections(coeffs: np.ndarray, z, repair_mag: tuple[float, ...]) -> np.ndarray:
    """m_band - M_r - DM(z) (N, n_bands) of galaxies with template coefficients ``coeffs`` (N, N_TEMPLATES)
    summing to one: the K-correction from rest-frame r to each observed band."""
    weights = np.concatenate([coeffs, np.zeros_like(coeffs)], axis=1)
    return -2.5 * np.log10(np.maximum(band_maggies(weights, 0.0, z, repair_mag), 1e-30))


def effective_wavelengths_aa() -> np.ndarray:
    """Effective wavelength (Angstrom) of each band's filter curve, in BANDS order."""
    return np.array([f.effective_wavelength.to_value("Angstrom") for f in sdss_filters()])


@dataclass(frozen=True)
class SEDLibrary:
    """Spectra of real SDSS galaxies: template coefficients (N, N_TEMPLATES) summing to one (unit rest-frame r
    flux), the galaxy's redshift and rest-frame r absolute magnitude (Planck18, no Galactic dust), and the
    template repair (magnitudes at REPAIR_KNOTS_AA) they were fitted with."""

    coeffs: np.ndarray
    z: np.ndarray
    abs_mag_r: np.ndarray
    repair_mag: tuple[float, ...]
    source: str = ""

    def rest_colour(self, blue: str, red: str) -> np.ndarray:
        """Rest-frame colour (mag) of every library spectrum, e.g. ``rest_colour("u", "r")``."""
        k = k_corrections(self.coeffs, np.zeros(self.z.size), self.repair_mag)
        return k[:, BANDS.index(blue)] - k[:, BANDS.index(red)]


def fit_coefficients(mags: np.ndarray, mag_errs: np.ndarray, z: np.ndarray, repair_mag: tuple[float, ...],
                     n_templates: int = N_TEMPLATES) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-negative least-squares fit of the first ``n_templates`` templates (all; 5: kcorrect's alone) to
    galaxies' magnitudes (N, 5; no Galactic dust) at their redshifts. Returns coefficients (N, n_templates)
    summing to one, rest-frame r absolute magnitudes, and the model's minus the data's magnitudes (N, 5)."""
    from scipy.optimize import nnls

    maggies = 10 ** (-0.4 * mags)
    sigma = np.hypot(mag_errs, FIT_ERROR_FLOOR_MAG) * maggies * np.log(10) / 2.5
    weights = np.eye(n_templates, 2 * N_TEMPLATES)
    design = np.stack([band_maggies(np.repeat(weights[k:k + 1], z.size, 0), 0.0, z, repair_mag)
                       for k in range(n_templates)], axis=2)  # (N, bands, templates)
    scale = maggies[:, BANDS.index("r")]
    coeffs = np.stack([nnls(design[n] / (sigma[n] / scale[n])[:, None], maggies[n] / sigma[n])[0]
                       for n in range(z.size)]) * scale[:, None]
    model = np.einsum("nbt,nt->nb", design, coeffs)
    total = coeffs.sum(axis=1)
    residual = -2.5 * np.log10(np.maximum(model, 1e-30) / maggies)
    return coeffs / total[:, None], -2.5 * np.log10(total) - distance_modulus(z), residual


def deconvolved_photometry(mags: np.ndarray, mag_errs: np.ndarray, z: np.ndarray,
                           neighbours: int = DECONVOLUTION_NEIGHBOURS, seed: int = 0,
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Galaxies' magnitudes (N, 5) with each colour against r drawn from its posterior given the measured flux,
    and each colour's posterior standard deviation as the band's error (r: its own; r is kept). Deterministic
    for a ``seed``.

    The prior of a galaxy's colour is the distribution of that colour among its ``neighbours`` nearest galaxies
    in the other colours against r and redshift: a Gaussian kernel on each neighbour's colour (width
    ``DECONVOLUTION_KERNEL`` times their robust spread, at least ``DECONVOLUTION_FLOOR_MAG``). It starts from
    the measured colours and takes the deconvolved ones of the round before, for ``DECONVOLUTION_ROUNDS``
    rounds (an empirical-Bayes deconvolution, drawn rather than averaged). A lopsided distribution (a red
    sequence with a blue tail) keeps its shape, where a Gaussian prior makes it symmetric.

    The likelihood follows the flux: a quoted magnitude error is the flux error over the measured flux, and
    the flux error is the same whatever the true colour (sky-limited photometry; the faint u of distant red
    galaxies), so each candidate colour of the prior is weighed with the magnitude error its own flux would
    have (a Gaussian in magnitude of that width). With the error taken at the measured flux instead, a galaxy scattered
    faint (red) is pulled to its prior harder than one scattered bright (blue). Simulator 1.8's Gaussian prior
    with the error at the measured flux left the simulated u - g 0.03-0.09 bluer than the real galaxies' beyond
    z = 0.15; this one, 0.01-0.07 (three library seeds each; docs/simulation-history.md)."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    r = BANDS.index("r")
    colours = mags - mags[:, r:r + 1]
    flux_errs = mag_errs * 10 ** (-0.4 * mags) / MAG_PER_RELATIVE_FLUX  # maggies
    out, errs = mags.copy(), mag_errs.copy()
    rows = np.arange(len(mags))
    for b in (b for b in range(len(BANDS)) if b != r):
        features = np.column_stack([colours[:, c] for c in range(len(BANDS)) if c not in (b, r)] + [z])
        features = features / features.std(axis=0)
        _, near = cKDTree(features).query(features, k=neighbours + 1)
        near = near[:, 1:]  # not the galaxy itself
        measured = colours[:, b]
        current, posterior_var = measured.copy(), mag_errs[:, b] ** 2
        for _ in range(DECONVOLUTION_ROUNDS):
            prior = current[near]  # (N, neighbours)
            spread = 1.4826 * np.median(np.abs(prior - np.median(prior, axis=1, keepdims=True)), axis=1)
            kernel_var = np.maximum(DECONVOLUTION_KERNEL * spread, DECONVOLUTION_FLOOR_MAG)[:, None] ** 2
            # the measured colour's variance (mag^2) if the true colour were each neighbour's: the band's flux
            # error relative to that colour's flux, and r's error
            model_flux = 10 ** (-0.4 * (mags[:, r:r + 1] + prior))
            var = (MAG_PER_RELATIVE_FLUX * flux_errs[:, b:b + 1] / model_flux) ** 2 + mag_errs[:, r:r + 1] ** 2
            total = var + kernel_var
            log_weight = -0.5 * (measured[:, None] - prior) ** 2 / total - 0.5 * np.log(total)
            weight = np.exp(log_weight - log_weight.max(axis=1, keepdims=True))
            pick = (weight.cumsum(axis=1) > rng.uniform(size=len(mags))[:, None] * weight.sum(axis=1)[:, None]
                    ).argmax(axis=1)
            centre, k_var, m_var = prior[rows, pick], kernel_var[:, 0], var[rows, pick]
            posterior_var = 1 / (1 / k_var + 1 / m_var)
            mean = (centre / k_var + measured / m_var) * posterior_var
            current = mean + rng.normal(0.0, 1.0, len(mags)) * np.sqrt(posterior_var)
        out[:, b] = mags[:, r] + current
        errs[:, b] = np.sqrt(posterior_var)
    return out, errs


def fit_library(mags: np.ndarray, mag_errs: np.ndarray, z: np.ndarray, iterations: int = 8,
                source: str = "", deconvolve: bool = True) -> tuple[SEDLibrary, np.ndarray]:
    """Fit the templates to real galaxies (magnitudes as published, with Galactic dust REFERENCE_MW_EBV), after
    deconvolving their noise if ``deconvolve`` (``deconvolved_photometry``; simulator >= 1.8),
    and repair them until the median residual of every band vanishes (see the module's docstring). Returns the
    library and the final fit's residuals (model minus the data it was fitted to, mag; N, 5)."""
    from photoz.model.conventions import dereddened

    mags = dereddened(mags, ebv=np.full(len(mags), REFERENCE_MW_EBV))
    if deconvolve:
        mags, mag_errs = deconvolved_photometry(mags, mag_errs, z)
    knots = np.log(REPAIR_KNOTS_AA)
    basis_of = np.eye(knots.size)
    repair = np.zeros(knots.size)
    log_rest = np.log(effective_wavelengths_aa()[None, :] / (1 + z[:, None])).ravel()
    design = np.stack([np.interp(log_rest, knots, basis_of[k]) for k in range(knots.size)], axis=1)
    weight = 1 / np.hypot(mag_errs, FIT_ERROR_FLOOR_MAG).ravel() ** 2
    for _ in range(iterations):
        _, _, residual = fit_coefficients(mags, mag_errs, z, tuple(repair))
        target = np.clip(residual.ravel(), -0.3, 0.3)  # model - data: a model too bright (< 0) is dimmed
        delta = np.linalg.lstsq(design * np.sqrt(weight)[:, None], target * np.sqrt(weight), rcond=None)[0]
        repair += delta
    repair_t = tuple(round(float(x), 6) for x in repair)
    coeffs, abs_mag, residual = fit_coefficients(mags, mag_errs, z, repair_t)
    return SEDLibrary(coeffs, np.asarray(z, dtype=np.float64), abs_mag, repair_t, source), residual


def reference_photometry(splits=("train", "valid"), r_limit: float = 17.77, z_max: float = 0.4) -> dict:
    """The real galaxies the library is fitted to: the ANNz SDSS files, r < r_limit, 0.003 < z < z_max."""
    table = np.concatenate([np.loadtxt(REFERENCE / f"sdss.ugriz.{s}") for s in splits])
    keep = (table[:, 2] < r_limit) & (table[:, 10] > 0.003) & (table[:, 10] < z_max)
    return {"mags": table[keep, :5], "errs": table[keep, 5:10], "z": table[keep, 10]}


def write_library(library: SEDLibrary, path: Path = LIBRARY) -> Path:
    from astropy.table import Table

    columns = {"z": library.z, "abs_mag_r": np.round(library.abs_mag_r, 5)}
    columns.update({f"c{k}": np.round(library.coeffs[:, k], 7) for k in range(N_TEMPLATES)})
    table = Table(columns)
    table.meta.update({
        "description": "kcorrect NMF template coefficients (summing to 1: unit rest-frame r flux) of real SDSS "
                       "galaxies; abs_mag_r: rest-frame r absolute magnitude (AB, Planck18, dereddened by "
                       f"E(B-V) = {REFERENCE_MW_EBV}); written by python -m photoz.training.simulation.sed",
        "templates": KCORRECT_TEMPLATES, "filters": "speclite sdss2010-ugriz",
        "repair_knots_aa": list(REPAIR_KNOTS_AA), "repair_mag": list(library.repair_mag),
        "source": library.source})
    table.write(path, format="ascii.ecsv", overwrite=True)
    return path


@functools.lru_cache(maxsize=2)
def load_library(path: Path = LIBRARY) -> SEDLibrary:
    from astropy.table import Table

    table = Table.read(path, format="ascii.ecsv")
    coeffs = np.stack([np.asarray(table[f"c{k}"], dtype=np.float64) for k in range(N_TEMPLATES)], axis=1)
    return SEDLibrary(coeffs / coeffs.sum(axis=1, keepdims=True), np.asarray(table["z"], dtype=np.float64),
                      np.asarray(table["abs_mag_r"], dtype=np.float64),
                      tuple(float(x) for x in table.meta["repair_mag"]), str(table.meta.get("source", "")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fit the simulator's spectral library to the real SDSS galaxies")
    parser.add_argument("--out", default=str(LIBRARY))
    args = parser.parse_args(argv)
    real = reference_photometry()
    library, residual = fit_library(real["mags"], real["errs"], real["z"],
                                    source="sdss.ugriz.train + sdss.ugriz.valid (ANNz), r < 17.77, 0.003 < z < 0.4, "
                                           "photometry deconvolved")
    print(f"{library.z.size} galaxies; median residual (model - data, mag) per band "
          + " ".join(f"{b} {v:+.4f}" for b, v in zip(BANDS, np.median(residual, axis=0), strict=True)))
    print(f"repair (mag at {REPAIR_KNOTS_AA} A): {library.repair_mag}")
    print(f"wrote {write_library(library, Path(args.out))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
