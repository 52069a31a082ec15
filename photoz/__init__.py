"""photoz: photometric redshifts from multi-band galaxy cutouts."""
__version__ = "0.1.0"
