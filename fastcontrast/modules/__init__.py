"""``nn.Module`` wrappers: one per loss family; ``ClipLoss``, ``SigLipLoss``, ``DistillClipLoss`` match
open_clip's constructors and ``forward``. Each module only chooses a mode; the work is in ``fastcontrast.functional``
(one process) and ``fastcontrast.distributed`` (the gathers and rings)."""
from .clip import ClipLoss, DistillClipLoss, ObliqueClipLoss, SigLipLoss
from .codis import CodebookLoss, CodisLoss, EMATeacher, FeatureQueue
from .mmts import DensityTemperatureClipLoss, MaxMarginLoss, MMTSClipLoss, MMTSMaxMarginLoss

__all__ = ["ClipLoss", "SigLipLoss", "ObliqueClipLoss", "DistillClipLoss", "MMTSClipLoss", "MMTSMaxMarginLoss",
           "DensityTemperatureClipLoss", "MaxMarginLoss", "CodebookLoss", "FeatureQueue", "EMATeacher", "CodisLoss"]
