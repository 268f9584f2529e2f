"""One module per public loss, named like its public function: its readable reference, its dense path where it
has one, and the glue of its fused path onto the shared primitives (``fastcontrast.primitives``). Importing this
package registers every implementation with :mod:`fastcontrast.dispatch`.
"""
from . import (  # noqa: F401
    adaptive_temperature_clip_loss,
    clip_loss,
    clip_loss_masked,
    codebook_loss,
    distill_clip_loss,
    lse_rows,
    max_margin_loss,
    momentum_contrastive_loss,
    oblique_clip_loss,
    siglip_loss,
    sinkhorn,
    temperature,
)
