"""How good a network or a bundle is: the held-out metrics (`evaluate`), the catalogue baselines it is compared
with (`baseline`), and the out-of-distribution flags' report on injected anomalies (`ood`)."""
