"""The galaxy population: who is in the SDSS Main Galaxy Sample, and what they are like.

Every galaxy is a clone of a real SDSS galaxy moved to a new redshift. The
spectral library (``sed.py``) holds the spectra and rest-frame luminosities
of real, flux-limited SDSS galaxies. Each would be seen out to the redshift
where it fades below the limit; a flux-limited sample holds one galaxy of
each kind per such volume (the 1/Vmax argument of Schmidt 1968), so a
simulated sample is made by picking library galaxies and placing each at a
redshift drawn from the comoving volume (astropy Planck18) in which it would
pass the limit, brightening by Q magnitudes per unit redshift (Blanton et al.
2003's luminosity evolution). The joint distribution of luminosity,
spectrum and redshift is then the real one, without a luminosity function or
galaxy types to tune. Candidates are drawn slightly fainter than the limit
(``candidate_margin_mag``, each library galaxy weighted by its larger volume)
because the cut is made afterwards on the measured, dereddened Petrosian r
(``render.simulate_chunk``), as SDSS made it.

Structure follows the spectrum: the red flag (rest-frame u - r >= 2.22,
Strateva et al. 2001) picks the Shen et al. (2003) size-luminosity relation,
and the rest-frame g - r sets the bulge fraction. Disks get dust that grows
with inclination (zero on average, so the population keeps its real
colours), and bulges are redder than disks with the galaxy's total spectrum
unchanged (``sed.py``).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from photoz.model.conventions import BANDS, EXTINCTION_A_OVER_EBV, dereddened
from photoz.training.simulation.cosmology import distance_grid, distance_modulus, kpc_per_arcsec
from photoz.training.simulation.sed import (
    N_TEMPLATES,
    REFERENCE,
    TABLE_DUST_EBV,
    TABLE_Z,
    band_maggies,
    calzetti_k,
    effective_wavelengths_aa,
    k_corrections,
    load_library,
    photometry_table,
)

Z_MAX = 0.4
Z_MIN = 0.005  # below this, peculiar velocities dominate; SDSS MGS has very few galaxies
#: Neighbours (r < 22) are clones too, up to the spectral table's last redshift
NEIGHBOUR_Z_MAX = float(TABLE_Z[-1])
#: Rest-frame g - r of the CWW E, Sbc, Scd and Im spectra: the continuous type t = 0..3 (structure only)
TYPE_REST_G_MINUS_R = (0.75, 0.55, 0.45, 0.30)


@dataclass(frozen=True)
class PopulationConfig:
    """Population parameters."""

    sed_library: str = "sed_library.ecsv"  # in training/simulation/sdss_reference/
    r_limit_mag: float = 17.77  # MGS: measured Petrosian r, dereddened (applied by render.simulate_chunk)
    # candidates: expected Petrosian r (noise-free, dereddened) to r_limit + margin; the measured cut decides
    candidate_margin_mag: float = 0.12
    luminosity_evolution_q_mag_per_z: float = 1.62  # M(z) = M(z0) - Q (z - z0), Blanton et al. (2003)
    red_rest_u_minus_r: float = 2.22  # Strateva et al. (2001) separator
    # bulge spectrum S (1 + a x), disk S (1 - a f x / (1 - f)), x = ln(lambda / 5500 A): see sed.py
    colour_gradient: float = 0.3
    # extra Calzetti E(B-V) of a disk per dex of axis ratio, about the population's mean (Masters et al. 2010
    # find A_r ~ 0.7 log10(a/b) for spirals)
    inclination_dust_ebv_per_dex: float = 0.25
    disk_thickness: float = 0.2  # intrinsic axis ratio of an edge-on disk
    # Galactic E(B-V): log-normal, median and log-scatter (high-latitude sky); the median is also what
    # sed.REFERENCE_MW_EBV took off the real library magnitudes
    mw_ebv_median: float = 0.03
    mw_ebv_sigma_ln: float = 0.6
    # Shen et al. (2003) r-band size-luminosity relations (R50 in kpc, h = 0.7), times a factor for blue and one
    # for red (early-type relation) galaxies and (L / L_pivot)^steepening, L from ^{0.1}M_r and the pivot at
    # ^{0.1}M_r = size_pivot_abs_mag: fitted together (1.10.0) to the real DR18 Petrosian R50 of each colour half
    # in four redshift bins (docs/simulation.md), once the growth curves reach past the cutout. With the factors
    # alone the faint, nearby halves were 3-13% large and the luminous, distant ones 7-11% small
    size_scale: float = 1.15
    size_scale_red: float = 1.33
    size_luminosity_steepening: float = 0.06
    size_pivot_abs_mag: float = -21.0
    # the reference sample's completeness in Petrosian r near its limit: a logistic, one half at
    # completeness_m50_mag, e-folding over completeness_width_mag (None: complete to r_limit_mag). The real files
    # thin out over their last ~0.4 mag (library <V/Vmax> 0.385, not 0.5: docs/simulation.md); the volumes and
    # the selection both apply it. The values are ``library_completeness``'s fit (1.7.0 on).
    completeness_m50_mag: float | None = 17.52
    completeness_width_mag: float = 0.095

    def to_dict(self) -> dict:
        """The parameters as a data set records them (the completeness only when set: files made without it
        record what they did before it existed)."""
        d = asdict(self)
        if self.completeness_m50_mag is None:
            del d["completeness_m50_mag"], d["completeness_width_mag"]
        return d

    def completeness(self, petro_r: np.ndarray) -> np.ndarray:
        """The share of galaxies of Petrosian r (dereddened, mag) the reference sample holds (1 when complete)."""
        if self.completeness_m50_mag is None:
            return np.ones_like(np.asarray(petro_r, np.float64))
        x = (np.asarray(petro_r, np.float64) - self.completeness_m50_mag) / self.completeness_width_mag
        return 1.0 / (1.0 + np.exp(np.clip(x, -50, 50)))

    @property
    def library(self):
        return load_library(REFERENCE / self.sed_library)


def shen2003_r50_kpc(abs_mag_r, early: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half-light radius (kpc, h = 0.7) from Shen et al. (2003) Table 1, r band, with scatter."""
    m = np.asarray(abs_mag_r) + 5 * np.log10(0.7 / distance_grid()[4])  # to h = 0.7 magnitudes
    m0 = -20.52
    early_log_r = -0.4 * 0.65 * m - 5.06
    late_log_r = -0.4 * 0.21 * m + (0.53 - 0.21) * np.log10(1 + 10 ** (-0.4 * (m - m0))) - 1.31
    sigma1, sigma2 = 0.48, 0.25
    sigma_ln = sigma2 + (sigma1 - sigma2) / (1 + 10 ** (-0.8 * (m - m0)))
    log_r = np.where(early, early_log_r, late_log_r)
    return 10 ** log_r * np.exp(rng.normal(0, sigma_ln))



def fill(n: int, batch: Callable[[int], tuple[dict[str, np.ndarray], np.ndarray]]) -> dict[str, np.ndarray]:
    """The first n rows kept from ``batch(missing)`` (arrays of candidates and the mask of those kept), called
    round after round with the number still missing until n are kept."""
    parts, have = [], 0
    while have < n:
        rows, keep = batch(n - have)
        parts.append({k: v[keep] for k, v in rows.items()})
        have += int(keep.sum())
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


@functools.lru_cache(maxsize=4)
def mean_log_inverse_axis_ratio(thickness: float) -> float:
    """<log10(1/q)> of disks of intrinsic thickness ``thickness`` seen at random orientations."""
    cos_i = (np.arange(20000) + 0.5) / 20000
    return float(np.mean(-np.log10(np.sqrt(cos_i**2 + thickness**2 * (1 - cos_i**2)))))


#: Median measured Petrosian r minus true total r (mag) of simulated galaxies against their bulge fraction
#: (simulator 1.10.0, 8,000 galaxies, growth curves past the cutout: bulges are drawn as large as the galaxy
#: above 0.8, and a truncated de Vaucouleurs profile loses ~10% of its light outside two Petrosian radii, an
#: exponential under 1%; 1.5.0's table, measured within the cutout, had 0.02 for a pure disk)
PETROSIAN_DEFICIT_MAG = ((0.0, 0.25, 0.5, 0.76, 0.8, 0.9, 1.0), (0.007, 0.017, 0.019, 0.038, 0.078, 0.090, 0.101))
BULGE_FRACTION_SCATTER = 0.08


def bulge_fraction_mean(t: np.ndarray) -> np.ndarray:
    return np.clip(0.95 - 0.4 * np.asarray(t), 0, 1)


def expected_petrosian_deficit(t: np.ndarray) -> np.ndarray:
    """Expected measured Petrosian minus total r (mag) of galaxies of type t, over the bulge-fraction scatter."""
    draws = bulge_fraction_mean(t)[:, None] + BULGE_FRACTION_SCATTER * np.linspace(-2, 2, 9)[None, :]
    weights = np.exp(-0.5 * np.linspace(-2, 2, 9) ** 2)
    deficit = np.interp(np.clip(draws, 0, 1), *PETROSIAN_DEFICIT_MAG)
    return (deficit * weights).sum(axis=1) / weights.sum()


@functools.lru_cache(maxsize=8)
def _clone_grid(library_name: str, q: float, r_limit: float, z_max: float, sample_limit: float, petrosian: bool,
                completeness: tuple[float, float] | None = None):
    """Per library galaxy: the probability of picking it, and the cumulative distribution of its redshift
    on TABLE_Z, for candidates brighter than ``r_limit`` (noise-free, dereddened r) below ``z_max``.

    The real galaxies were selected on their Petrosian r, which misses part of a bulge's light: a galaxy's
    volume is where its total r is brighter than ``sample_limit`` minus its expected Petrosian deficit (and,
    with ``petrosian``, the candidates' limit moves by the same), or red galaxies would be under-weighted. With
    ``completeness`` (m50, width), a galaxy's volume counts each shell by the share the sample holds at its
    Petrosian r there (its effective Vmax); the candidates fill their volume uniformly, the selection thins them."""
    lib = load_library(REFERENCE / library_name)
    zg = TABLE_Z
    deficit = expected_petrosian_deficit(_library_colours(library_name)[3])[:, None]
    flux_r = _library_flux_r(library_name)
    m_r = (lib.abs_mag_r[:, None] - q * (zg[None, :] - lib.z[:, None]) + distance_modulus(np.maximum(zg, 1e-4))
           - 2.5 * np.log10(np.maximum(flux_r, 1e-30)))
    z_all, _, _, dvdz, _ = distance_grid()
    dv = np.interp(zg, z_all, dvdz) * np.gradient(zg)
    candidate = (m_r < r_limit - (deficit if petrosian else 0.0)) & (zg >= Z_MIN) & (zg <= z_max)
    sample = ((m_r < sample_limit - deficit) & (zg >= Z_MIN) & (zg <= Z_MAX)).astype(np.float64)
    if completeness is not None:
        sample *= 1.0 / (1.0 + np.exp(np.clip((m_r + deficit - completeness[0]) / completeness[1], -50, 50)))
    v_candidate, v_sample = (candidate * dv).sum(axis=1), (sample * dv).sum(axis=1)
    weight = np.where(v_sample > 0, v_candidate / np.maximum(v_sample, 1e-30), 0.0)
    cdf = np.cumsum(candidate * dv, axis=1) / np.maximum(v_candidate, 1e-30)[:, None]
    return weight / weight.sum(), cdf


def _library_flux_r(library_name: str) -> np.ndarray:
    """Each library galaxy's r-band flux factor on TABLE_Z (N, Z): its spectrum through r, no dust, at each z."""
    lib = load_library(REFERENCE / library_name)
    table = photometry_table(lib.repair_mag)[:N_TEMPLATES, int(np.argmin(np.abs(TABLE_DUST_EBV))), :, BANDS.index("r")]
    return lib.coeffs @ table


@functools.lru_cache(maxsize=2)
def _library_colours(library_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per library galaxy: rest-frame u - r and g - r, K_r(0.1) + 2.5 log10(1.1) (rest r to Blanton's
    ^{0.1}r), and the continuous type t (0 = E ... 3 = Im) its rest g - r gives."""
    lib = load_library(REFERENCE / library_name)
    u, g, r = (BANDS.index(b) for b in "ugr")
    rest = k_corrections(lib.coeffs, np.zeros(lib.z.size), lib.repair_mag)
    k01 = k_corrections(lib.coeffs, np.full(lib.z.size, 0.1), lib.repair_mag)[:, r]
    g_r = rest[:, g] - rest[:, r]
    t = np.interp(-g_r, [-c for c in TYPE_REST_G_MINUS_R], np.arange(len(TYPE_REST_G_MINUS_R), dtype=float))
    return rest[:, u] - rest[:, r], g_r, k01 + 2.5 * np.log10(1.1), t


def draw_candidates(cfg: PopulationConfig, n: int, rng: np.random.Generator, r_limit: float | None = None,
                    z_max: float = Z_MAX) -> dict[str, np.ndarray]:
    """Draw n galaxies: library galaxies at new redshifts, with structure. With ``r_limit``, those brighter than
    it in noise-free, dereddened total r (of their average-inclination spectrum) below ``z_max`` (neighbours).
    Without, the MGS targets' candidates: galaxies whose expected Petrosian r (total r of the galaxy as
    inclined, plus the Petrosian deficit of its bulge fraction) is within ``candidate_margin_mag`` of the
    limit, thinned by the reference sample's completeness at that r when the config has one; the measured cut
    (``render.simulate_chunk``) then decides."""
    if r_limit is not None:
        return _draw(cfg, n, rng, float(r_limit), z_max, petrosian=False)
    widest = cfg.r_limit_mag + cfg.candidate_margin_mag + max_inclination_brightening(cfg)

    def batch(missing: int):
        cand = _draw(cfg, int(1.3 * missing) + 16, rng, widest, z_max, petrosian=True)
        expected = dereddened(cand["mag_true"], ebv=cand["ebv"])[:, BANDS.index("r")] \
            + np.interp(cand["bulge_fraction"], *PETROSIAN_DEFICIT_MAG)
        keep = expected <= cfg.r_limit_mag + cfg.candidate_margin_mag
        if cfg.completeness_m50_mag is not None:  # thinned before rendering, as the reference sample is
            keep &= rng.uniform(size=expected.size) < cfg.completeness(expected)
        return cand, keep

    return fill(n, batch)


def max_inclination_brightening(cfg: PopulationConfig) -> float:
    """The most a face-on disk's r brightens by the inclination dust (mag): its negative extra E(B-V) times the
    Calzetti curve at r."""
    k_r = float(calzetti_k(effective_wavelengths_aa()[BANDS.index("r")]))
    return cfg.inclination_dust_ebv_per_dex * mean_log_inverse_axis_ratio(cfg.disk_thickness) * k_r


def _draw(cfg: PopulationConfig, n: int, rng: np.random.Generator, r_limit: float, z_max: float,
          petrosian: bool) -> dict[str, np.ndarray]:
    """n library galaxies brighter than ``r_limit`` (see _clone_grid) at new redshifts below ``z_max``."""
    lib = cfg.library
    thinning = None if cfg.completeness_m50_mag is None else (cfg.completeness_m50_mag, cfg.completeness_width_mag)
    p, cdf = _clone_grid(cfg.sed_library, cfg.luminosity_evolution_q_mag_per_z, float(r_limit), float(z_max),
                         cfg.r_limit_mag, petrosian, thinning)
    idx = rng.choice(p.size, size=n, p=p)
    cell = np.minimum((cdf[idx] < rng.uniform(size=n)[:, None]).sum(axis=1), TABLE_Z.size - 1)
    z = np.clip(TABLE_Z[cell] + rng.uniform(-0.5, 0.5, n) * (TABLE_Z[1] - TABLE_Z[0]), Z_MIN, z_max)
    coeffs = lib.coeffs[idx]
    abs_mag = lib.abs_mag_r[idx] - cfg.luminosity_evolution_q_mag_per_z * (z - lib.z[idx])
    u_r, _, to_z01, t = (c[idx] for c in _library_colours(cfg.sed_library))
    red = u_r >= cfg.red_rest_u_minus_r
    bulge_fraction = np.clip(bulge_fraction_mean(t) + rng.normal(0, BULGE_FRACTION_SCATTER, n), 0, 1)
    abs_mag_z01 = abs_mag + to_z01  # Blanton's ^{0.1}r, the band of the Shen et al. relations' samples

    r50_kpc = shen2003_r50_kpc(abs_mag_z01, red, rng) * np.where(red, cfg.size_scale_red, cfg.size_scale) \
        * 10 ** (-0.4 * cfg.size_luminosity_steepening * (abs_mag_z01 - cfg.size_pivot_abs_mag))
    r50_arcsec = r50_kpc / kpc_per_arcsec(z)
    cos_i = rng.uniform(0, 1, n)
    disk_q = np.sqrt(cos_i**2 + cfg.disk_thickness**2 * (1 - cos_i**2))
    bulge_q = np.clip(rng.normal(0.75, 0.15, n), 0.3, 1.0)
    dust = cfg.inclination_dust_ebv_per_dex * (-np.log10(disk_q) - mean_log_inverse_axis_ratio(cfg.disk_thickness))

    mw_ebv = np.clip(cfg.mw_ebv_median * np.exp(rng.normal(0, cfg.mw_ebv_sigma_ln, n)), 0.003, 0.3)
    f = bulge_fraction[:, None]
    tilt = cfg.colour_gradient * np.minimum(1.0, (1 - f) / np.maximum(f, 1e-6))
    bulge_w = np.concatenate([f * coeffs, f * tilt * coeffs], axis=1)
    disk_w = np.concatenate([(1 - f) * coeffs, -f * tilt * coeffs], axis=1)
    base = (abs_mag + distance_modulus(z))[:, None] \
        + mw_ebv[:, None] * np.array([EXTINCTION_A_OVER_EBV[b] for b in BANDS])[None, :]
    mag_bulge = base - 2.5 * np.log10(np.maximum(band_maggies(bulge_w, 0.0, z, lib.repair_mag), 1e-30))
    mag_disk = base - 2.5 * np.log10(np.maximum(band_maggies(disk_w, dust, z, lib.repair_mag), 1e-30))
    total_mag = -2.5 * np.log10(10 ** (-0.4 * mag_bulge) + 10 ** (-0.4 * mag_disk))
    return {
        "z": z, "abs_mag_r": abs_mag, "abs_mag_r_z0p1": abs_mag_z01, "red": red, "type": t,
        "sed_index": idx.astype(np.int32), "sed_coeffs": coeffs.astype(np.float32), "dust_ebv": dust,
        "bulge_fraction": bulge_fraction, "r50_kpc": r50_kpc, "r50_arcsec": r50_arcsec,
        "disk_q": disk_q, "bulge_q": bulge_q, "position_angle_deg": rng.uniform(0, 180, n),
        "ebv": mw_ebv, "mag_bulge": mag_bulge, "mag_disk": mag_disk, "mag_true": total_mag,
    }


def draw_selected(cfg: PopulationConfig, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw n galaxies brighter than the MGS limit in noise-free, dereddened total r (no measurement: the
    population's own cut, for test fields; ``photoz simulate`` cuts on the measured Petrosian r instead)."""
    def batch(missing: int):
        cand = draw_candidates(cfg, max(2 * missing, 64), rng, r_limit=cfg.r_limit_mag)
        r = dereddened(cand["mag_true"], ebv=cand["ebv"])[:, BANDS.index("r")]
        keep = r < cfg.r_limit_mag
        if cfg.completeness_m50_mag is not None:  # thinned as the reference sample is, in expected Petrosian r
            petro = r + np.interp(cand["bulge_fraction"], *PETROSIAN_DEFICIT_MAG)
            keep &= rng.uniform(size=r.size) < cfg.completeness(petro)
        return cand, keep

    return fill(n, batch)


def _library_petrosian_r(library_name: str) -> np.ndarray:
    """Each library galaxy's expected Petrosian r at its own redshift (model r plus its Petrosian deficit)."""
    lib = load_library(REFERENCE / library_name)
    own = np.array([np.interp(z, TABLE_Z, f) for z, f in zip(lib.z, _library_flux_r(library_name), strict=True)])
    deficit = expected_petrosian_deficit(_library_colours(library_name)[3])
    return lib.abs_mag_r + distance_modulus(np.maximum(lib.z, 1e-4)) - 2.5 * np.log10(np.maximum(own, 1e-30)) + deficit


def library_completeness(cfg: PopulationConfig, n: int = 20000, seed: int = 11) -> dict[str, Any]:
    """How complete the reference sample is near its limit: the library galaxies' Petrosian r distribution over
    that of a complete sample cloned from them (``draw_selected`` without thinning, ``n`` galaxies), per 0.1 mag,
    normalised to 1 over 15.5-17.0, and the logistic (m50, width) fitted to it from 16.5 on."""
    from scipy.optimize import curve_fit

    complete = replace(cfg, completeness_m50_mag=None)
    sim = draw_selected(complete, n, np.random.default_rng(seed))
    sim_r = dereddened(sim["mag_true"], ebv=sim["ebv"])[:, BANDS.index("r")] \
        + np.interp(sim["bulge_fraction"], *PETROSIAN_DEFICIT_MAG)
    lib_r = _library_petrosian_r(cfg.sed_library)
    edges = np.round(np.arange(15.5, cfg.r_limit_mag + 0.15, 0.1), 2)
    centres = (edges[:-1] + edges[1:]) / 2
    h_lib, h_sim = np.histogram(lib_r, edges)[0], np.histogram(sim_r, edges)[0]
    ratio = (h_lib / max(h_lib.sum(), 1)) / np.maximum(h_sim / max(h_sim.sum(), 1), 1e-12)
    ratio = ratio / ratio[centres < 17.0].mean()
    fit = (centres >= 16.5) & (h_sim > 0)
    sigma = ratio[fit] / np.sqrt(np.maximum(h_lib[fit], 1)) + 0.02
    (m50, width), _ = curve_fit(lambda m, a, w: 1 / (1 + np.exp((m - a) / w)), centres[fit], ratio[fit],
                                p0=(cfg.r_limit_mag - 0.25, 0.1), sigma=sigma)
    return {"bin_centres_mag": centres.tolist(), "completeness": ratio.tolist(), "n_library": int(lib_r.size),
            "n_complete_sample": int(n), "m50_mag": float(m50), "width_mag": float(width)}
