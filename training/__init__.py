"""How a photoz network is made, by stage of its life cycle (torch, GalSim: never imported by the service):

- `simulation`: the SDSS-like cutout simulator, its calibration against the real catalogues, and field images;
- `fit`: data sets, the run's configuration, the training loop;
- `evaluation`: held-out metrics, the out-of-distribution report;
- `release`: export to a bundle, the flags' thresholds and blend detector, calibrations, the model card, `ship`.

`baselines` holds the catalogue photo-z estimators (kNN, local linear regression) that the simulator's calibration
and the evaluation compare with; `cli` registers the `photoz` subcommands of all four. The stages import only
stages before them (no cycles: an import-linter contract).
"""
