"""How good a network or a bundle is: the held-out metrics beside the catalogue baselines
(`evaluate`; the baselines are :mod:`photoz.training.baselines`) and the out-of-distribution flags' report on
injected anomalies (`ood`)."""
