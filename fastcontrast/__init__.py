"""fastcontrast: fused contrastive vision-language losses (CLIP InfoNCE, oblique multi-token, MM-TS
per-sample temperature and margin, CODIS codebook) with a pure-PyTorch reference behind every kernel."""
from ._compat import VersionWarning, check_versions as _check_versions

_check_versions()  # before anything defines a custom op: a clear error or warning, not a crash inside one
from ._validation import debug, debug_enabled, set_debug
from .dispatch import BACKENDS, BackendUnavailableError, available_backends
from .gradcache import GradCache
from .functional import (
    adaptive_temperature_clip_loss,
    clip_loss,
    codebook_loss,
    cosine_schedule,
    density_temperature,
    distill_clip_loss,
    lse_rows,
    matryoshka_ce_rows,
    matryoshka_clip_loss,
    max_margin_loss,
    mmts_temperature,
    momentum_contrastive_loss,
    oblique_clip_loss,
    siglip_loss,
    sinkhorn,
)
from .modules import (
    ClipLoss,
    CodebookLoss,
    CodisLoss,
    DensityTemperatureClipLoss,
    DistillClipLoss,
    EMATeacher,
    FeatureQueue,
    MaxMarginLoss,
    MMTSClipLoss,
    MMTSMaxMarginLoss,
    ObliqueClipLoss,
    SigLipLoss,
)

__version__ = "0.1.0"

__all__ = [
    "clip_loss", "siglip_loss", "oblique_clip_loss", "adaptive_temperature_clip_loss", "max_margin_loss",
    "mmts_temperature", "density_temperature", "sinkhorn", "codebook_loss", "cosine_schedule",
    "ClipLoss", "SigLipLoss", "ObliqueClipLoss", "MMTSClipLoss", "MMTSMaxMarginLoss", "DensityTemperatureClipLoss",
    "MaxMarginLoss", "CodebookLoss", "CodisLoss", "FeatureQueue", "EMATeacher", "momentum_contrastive_loss",
    "distill_clip_loss", "DistillClipLoss", "lse_rows",
    "matryoshka_ce_rows", "matryoshka_clip_loss",
    "GradCache",
    "BACKENDS", "BackendUnavailableError", "available_backends", "debug", "debug_enabled", "set_debug",
]
