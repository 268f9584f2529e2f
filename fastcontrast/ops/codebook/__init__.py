from ...dispatch import register
from .reference import momentum_contrastive_reference, sinkhorn_reference, swapped_prediction_reference

register("sinkhorn", "reference")(sinkhorn_reference)
register("swapped_prediction", "reference")(swapped_prediction_reference)
register("momentum_contrastive", "reference")(momentum_contrastive_reference)

from . import function  # noqa: E402,F401  (registers "triton" when triton imports)
