"""The torch side of `photoz.model`: the Pasquet network and its variants (`pasquet`), its input normalisation
(`normalisation`), its summary (`summary`) and the export of a trained network to an ONNX bundle (`export`).

Only this sub-package imports torch; the rest of `photoz.model` is numpy-only, safe for the service (an
import-linter contract in `make test` holds this)."""
