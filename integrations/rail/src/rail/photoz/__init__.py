"""photoz's RAIL package: importing it (as ``rail.stages.import_and_attach_all()`` does for every ``rail.*``
package) registers the stages ``PhotozImageInformer`` and ``PhotozImageEstimator``."""
from rail.estimation.algos.photoz_image import PhotozImageEstimator, PhotozImageInformer, StageInputError

__all__ = ["PhotozImageEstimator", "PhotozImageInformer", "StageInputError"]
