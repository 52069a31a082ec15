"""photoz: photometric redshifts from multi-band galaxy cutouts."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# In a checkout this folder is the package and its rooms (model/, service/, training/, ...) are its siblings,
# which pyproject.toml's package-dir installs as photoz.model, photoz.service, ... . Python run in a checkout's
# root (`python -m photoz.training.evaluation.ood` there, as the recipes and the Makefile do) imports this folder
# ahead of any installed photoz, so the rooms are looked up beside it too; an editable install finds the same folders.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "model" / "conventions.py").is_file():
    __path__.append(str(_checkout))
