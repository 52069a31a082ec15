"""What a trained photoz network *is*: conventions, PDF maths, bundle format, flags, priors (numpy only).

The torch network and its export live in the `photoz.model.network` sub-package, the only part that imports torch
(import-linter contracts in `make test`).
"""
