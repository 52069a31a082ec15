"""The simulator's cosmology (astropy's Planck18), tabulated once on a redshift grid and interpolated."""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def distance_grid():
    """Redshift grid 0-0.5 and on it the distance modulus (mag), the angular scale (kpc per arcsec), the
    differential comoving volume (Mpc^3 per sr per unit z), and h, of Planck18."""
    from astropy.cosmology import Planck18

    z = np.linspace(0.0, 0.5, 2001)
    dm = np.full(z.size, -np.inf)
    dm[1:] = Planck18.distmod(z[1:]).value
    da_kpc_per_arcsec = np.zeros(z.size)
    da_kpc_per_arcsec[1:] = Planck18.angular_diameter_distance(z[1:]).to("kpc").value / 206264.806
    dvdz = Planck18.differential_comoving_volume(np.maximum(z, 1e-6)).value  # Mpc^3 / sr
    return z, dm, da_kpc_per_arcsec, dvdz, Planck18.h


def distance_modulus(z):
    """Distance modulus (mag) at redshift ``z``, Planck18."""
    grid, dm, *_ = distance_grid()
    return np.interp(z, grid, dm)


def kpc_per_arcsec(z):
    """Proper kpc per arcsec at redshift ``z``, Planck18."""
    grid, _, da, *_ = distance_grid()
    return np.interp(z, grid, da)
