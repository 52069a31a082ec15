"""The galaxy population: who is in the SDSS Main Galaxy Sample, and what they are like.

Galaxies fill a comoving volume (astropy Planck18) out to z = 0.4 with an
r-band Schechter luminosity function (Blanton et al. 2003), a red fraction
that rises with luminosity, continuous CWW types, Calzetti dust, bulge +
disk structure with sizes from the Shen et al. (2003) size-luminosity
relations, and a Galactic E(B-V) per sight line. The MGS selection
r < 17.77 is applied to the noise-free total model magnitude (the flux of
the rendered model before noise, not a noisy measurement).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np

from photoz.model.conventions import BANDS, EXTINCTION_A_OVER_EBV
from photoz.training.sim.sed import TemplateTuning, k_corrections

Z_MAX = 0.4
Z_MIN = 0.005  # below this, peculiar velocities dominate; SDSS MGS has very few galaxies


@dataclass(frozen=True)
class PopulationConfig:
    """Population parameters. Luminosities are in the LF's band (``lf_band_redshift``), h = Planck18's h."""

    # Blanton et al. (2003) r-band Schechter function at z = 0.1, with h = 1 units
    lf_mstar_minus_5logh: float = -20.44
    lf_alpha: float = -1.05
    lf_phistar_h3_mpc3: float = 1.49e-2
    lf_evolution_q_mag_per_z: float = 1.62  # M*(z) = M*(0.1) - Q (z - 0.1)
    # Blanton et al.'s magnitudes are in the ^{0.1}r band (SDSS r blueshifted by 1 + 0.1); the spectra are
    # normalised in rest-frame r, converted per galaxy with its own SED (0: treat the LF as rest-frame r)
    lf_band_redshift: float = 0.1
    abs_mag_faint: float = -15.0
    abs_mag_bright: float = -24.0
    r_limit_mag: float = 17.77  # MGS Petrosian limit, applied to the noise-free model r
    # red fraction f_red(M) = 1 / (1 + exp((M - m_half) / width)), M with Planck18 h
    red_fraction_m_half: float = -20.95
    red_fraction_width_mag: float = 0.9
    # continuous CWW type t (0 = E ... 3 = Im); calibrated on real SDSS colours
    red_type_mean: float = 0.325
    red_type_slope_per_mag: float = 0.0  # brighter red galaxies are earlier types: t_mean + slope (M + 21)
    red_type_sigma: float = 0.15
    blue_type_min: float = 0.9
    blue_type_max: float = 2.7  # 1.4.0: 3.0 -> 2.7 (nearby dwarfs were too blue in u-g and g-r)
    # fainter star-forming galaxies are later types: t shifted by slope (M + 21), then clipped to [0.8, 3]
    blue_type_slope_per_mag: float = 0.0
    template_uv_suppression_mag: tuple[float, ...] = (0.9, 0.55, 0.0, 0.0)  # E, Sbc, Scd, Im (1.3.0: 0.62, 0.43)
    template_halpha_ew_aa: tuple[float, ...] = (0.0, 30.0, 80.0, 160.0)  # rest H-alpha EW (Angstrom): E, Sbc, Scd, Im
    template_oii_to_halpha: float = 0.4  # observed [OII] 3727 / H-alpha flux ratio (1.3.0: 0.8)
    template_nir_suppression_mag: float = 0.1  # rest near-IR dimming (6800 -> 8000 A ramp), all templates
    red_dust_ebv_sigma: float = 0.02
    # red-sequence colour-magnitude relation (more luminous ellipticals are redder: metallicity),
    # applied as extra Calzetti reddening of red galaxies brighter than the pivot: slope x (pivot - M)
    red_sequence_ebv_per_mag: float = 0.04
    red_sequence_pivot_mag: float = -22.0
    blue_dust_ebv_mean: float = 0.108  # at M_r = -21; exponential distribution
    # dust rises with luminosity (e.g. Garn & Best 2010): mean x exp(-slope (M + 21))
    blue_dust_ln_slope_per_mag: float = 0.3
    # Galactic E(B-V): log-normal, median and log-scatter (high-latitude sky)
    mw_ebv_median: float = 0.03
    mw_ebv_sigma_ln: float = 0.6
    # Shen et al. (2003) r-band size-luminosity relations (R50 in kpc, h = 0.7)
    size_scale: float = 1.18  # calibrated: measured Petrosian R50 against real SDSS DR18 (docs/simulation.md)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def template_tuning(self) -> TemplateTuning:
        return TemplateTuning(self.template_uv_suppression_mag, self.template_halpha_ew_aa,
                              self.template_nir_suppression_mag, self.template_oii_to_halpha)


@functools.lru_cache(maxsize=4)
def _distance_grid():
    from astropy.cosmology import Planck18

    z = np.linspace(0.0, 0.5, 2001)
    dm = np.full(z.size, -np.inf)
    dm[1:] = Planck18.distmod(z[1:]).value
    da_kpc_per_arcsec = np.zeros(z.size)
    da_kpc_per_arcsec[1:] = Planck18.angular_diameter_distance(z[1:]).to("kpc").value / 206264.806
    dvdz = Planck18.differential_comoving_volume(np.maximum(z, 1e-6)).value  # Mpc^3 / sr
    return z, dm, da_kpc_per_arcsec, dvdz, Planck18.h


def distance_modulus(z):
    grid, dm, *_ = _distance_grid()
    return np.interp(z, grid, dm)


def kpc_per_arcsec(z):
    grid, _, da, *_ = _distance_grid()
    return np.interp(z, grid, da)


def shen2003_r50_kpc(abs_mag_r, early: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Half-light radius (kpc, h = 0.7) from Shen et al. (2003) Table 1, r band, with scatter."""
    m = np.asarray(abs_mag_r) + 5 * np.log10(0.7 / _distance_grid()[4])  # to h = 0.7 magnitudes
    m0 = -20.52
    early_log_r = -0.4 * 0.65 * m - 5.06
    late_log_r = -0.4 * 0.21 * m + (0.53 - 0.21) * np.log10(1 + 10 ** (-0.4 * (m - m0))) - 1.31
    sigma1, sigma2 = 0.48, 0.25
    sigma_ln = sigma2 + (sigma1 - sigma2) / (1 + 10 ** (-0.8 * (m - m0)))
    log_r = np.where(early, early_log_r, late_log_r)
    return 10 ** log_r * np.exp(rng.normal(0, sigma_ln))


def _candidate_grid(cfg: PopulationConfig, r_limit: float):
    """Joint (z, M) weights dV/dz x phi(M) x [could pass the r limit] on a grid."""
    z_grid, dm, _, dvdz, h = _distance_grid()
    sel = (z_grid >= Z_MIN) & (z_grid <= Z_MAX)
    z, dm, dvdz = z_grid[sel], dm[sel], dvdz[sel]
    mags = np.linspace(cfg.abs_mag_bright, cfg.abs_mag_faint, 181)
    mstar = cfg.lf_mstar_minus_5logh + 5 * np.log10(h) - cfg.lf_evolution_q_mag_per_z * (z - 0.1)
    x = 10 ** (-0.4 * (mags[None, :] - mstar[:, None]))
    phi = x ** (cfg.lf_alpha + 1) * np.exp(-x)
    # the bluest galaxies have K ~ -0.2 at z = 0.4, and rest r is up to ~0.35 mag brighter than the
    # LF's ^{0.1}r: keep candidates within that margin
    could_pass = mags[None, :] + dm[:, None] - 0.6 < r_limit
    weight = dvdz[:, None] * phi * could_pass
    return z, mags, weight / weight.sum()


def draw_candidates(cfg: PopulationConfig, n: int, rng: np.random.Generator,
                    r_limit: float | None = None) -> dict[str, np.ndarray]:
    """Draw n galaxies from the volume-weighted luminosity function (before selection)."""
    r_limit = cfg.r_limit_mag if r_limit is None else r_limit
    z_grid, mag_grid, weight = _candidate_grid(cfg, r_limit)
    cell = rng.choice(weight.size, size=n, p=weight.ravel())
    iz, im = np.unravel_index(cell, weight.shape)
    dz, dmag = np.diff(z_grid)[0], np.diff(mag_grid)[0]
    z = np.clip(z_grid[iz] + rng.uniform(-0.5, 0.5, n) * dz, Z_MIN, Z_MAX)
    abs_mag = mag_grid[im] + rng.uniform(-0.5, 0.5, n) * dmag  # in the LF's band; the relations below use it

    red = rng.uniform(size=n) < 1 / (1 + np.exp((abs_mag - cfg.red_fraction_m_half) / cfg.red_fraction_width_mag))
    red_mean = cfg.red_type_mean + cfg.red_type_slope_per_mag * (abs_mag + 21.0)
    t = np.where(red, np.clip(rng.normal(red_mean, cfg.red_type_sigma, n), 0, 1.0),
                 np.clip(rng.uniform(cfg.blue_type_min, cfg.blue_type_max, n)
                         + cfg.blue_type_slope_per_mag * (abs_mag + 21.0), 0.8, 3.0))
    blue_dust_mean = cfg.blue_dust_ebv_mean * np.exp(-cfg.blue_dust_ln_slope_per_mag * (abs_mag + 21.0))
    red_dust = np.abs(rng.normal(0, cfg.red_dust_ebv_sigma, n)) \
        + cfg.red_sequence_ebv_per_mag * np.maximum(cfg.red_sequence_pivot_mag - abs_mag, 0)
    dust = np.where(red, red_dust, np.minimum(rng.exponential(1.0, n) * blue_dust_mean, 0.5))
    bulge_fraction = np.clip(0.95 - 0.4 * t + rng.normal(0, 0.08, n), 0, 1)
    # colour gradient: bulges are redder, disks bluer than the galaxy's mean type
    bulge_type, disk_type = 0.5 * t, np.clip(t + 0.3, 0, 3)

    r50_kpc = shen2003_r50_kpc(abs_mag, red, rng) * cfg.size_scale
    r50_arcsec = r50_kpc / kpc_per_arcsec(z)
    cos_i = rng.uniform(0, 1, n)
    disk_q = np.sqrt(cos_i**2 + 0.2**2 * (1 - cos_i**2))
    bulge_q = np.clip(rng.normal(0.75, 0.15, n), 0.3, 1.0)

    mw_ebv = np.clip(cfg.mw_ebv_median * np.exp(rng.normal(0, cfg.mw_ebv_sigma_ln, n)), 0.003, 0.3)
    dmod = distance_modulus(z)
    tuning = cfg.template_tuning
    abs_mag_rest = rest_frame_r(abs_mag, cfg.lf_band_redshift, bulge_fraction, bulge_type, disk_type, dust, tuning)
    mag_bulge = _component_mags(abs_mag_rest, bulge_fraction, bulge_type, dust, z, dmod, mw_ebv, tuning)
    mag_disk = _component_mags(abs_mag_rest, 1 - bulge_fraction, disk_type, dust, z, dmod, mw_ebv, tuning)
    total_mag = -2.5 * np.log10(10 ** (-0.4 * mag_bulge) + 10 ** (-0.4 * mag_disk))
    return {
        "z": z, "abs_mag_r": abs_mag_rest, "abs_mag_lf_band": abs_mag, "red": red, "type": t, "dust_ebv": dust,
        "bulge_fraction": bulge_fraction, "r50_kpc": r50_kpc, "r50_arcsec": r50_arcsec,
        "disk_q": disk_q, "bulge_q": bulge_q, "position_angle_deg": rng.uniform(0, 180, n),
        "ebv": mw_ebv, "mag_bulge": mag_bulge, "mag_disk": mag_disk, "mag_true": total_mag,
    }


def rest_frame_r(abs_mag_band, band_redshift: float, bulge_fraction, bulge_type, disk_type, dust,
                 tuning: TemplateTuning):
    """Rest-frame r absolute magnitude of galaxies whose magnitude is given in the SDSS r band shifted to
    ``band_redshift`` (Blanton et al.'s ^{0.1}r for 0.1), with each galaxy's own bulge + disk spectrum.

    A galaxy at z_b seen in r has K = -2.5 log10(1 + z_b) in the shifted band, whatever its spectrum, so
    M_shifted = M_r + K_r(z_b) + 2.5 log10(1 + z_b), with K_r the synthetic-photometry K-correction.
    """
    if band_redshift == 0:
        return np.asarray(abs_mag_band, dtype=np.float64)
    r = BANDS.index("r")
    zb = np.full(np.shape(abs_mag_band), float(band_redshift))
    k_bulge = k_corrections(bulge_type, dust, zb, tuning)[:, r]
    k_disk = k_corrections(disk_type, dust, zb, tuning)[:, r]
    k_r = -2.5 * np.log10(bulge_fraction * 10 ** (-0.4 * k_bulge) + (1 - bulge_fraction) * 10 ** (-0.4 * k_disk))
    return abs_mag_band - k_r - 2.5 * np.log10(1 + band_redshift)


def _component_mags(abs_mag, light_fraction, comp_type, dust, z, dmod, mw_ebv, tuning: TemplateTuning):
    """Observed magnitudes (N, 5) of one component, with Milky Way extinction."""
    frac = np.maximum(light_fraction, 1e-6)
    a_mw = np.array([EXTINCTION_A_OVER_EBV[b] for b in BANDS])
    return (abs_mag - 2.5 * np.log10(frac) + dmod)[:, None] + k_corrections(comp_type, dust, z, tuning) \
        + mw_ebv[:, None] * a_mw[None, :]


def draw_selected(cfg: PopulationConfig, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Draw n galaxies that pass the MGS cut on the noise-free total model r magnitude."""
    r = BANDS.index("r")
    parts, have = [], 0
    while have < n:
        cand = draw_candidates(cfg, max(2 * (n - have), 64), rng)
        keep = cand["mag_true"][:, r] < cfg.r_limit_mag
        parts.append({k: v[keep] for k, v in cand.items()})
        have += int(keep.sum())
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}
