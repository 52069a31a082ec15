"""What a trained photoz network *is*: conventions, PDF maths, bundle format.

Only the modules ``pasquet``, ``normalisation``, ``summary`` and ``export``
import torch; everything else here is numpy-only and safe to use from the
service.
"""
