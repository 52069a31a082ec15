"""The SDSS Main Galaxy Sample simulator: the galaxy population (`population`, spectra from `sed`), the
instrument and its artefacts (`instrument`), drawing with GalSim (`drawing`), the pipeline's photometry
(`photometry`), one deterministic chunk of galaxies (`render`), the resumable HDF5 writer (`simulate`), field
images for `photoz cutouts` (`field`) and the calibration report against real SDSS catalogues (`calibrate`)."""
