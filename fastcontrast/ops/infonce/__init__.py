from ...dispatch import register
from .dense import infonce_dense
from .reference import ce_rows_reference, infonce_reference

register("infonce", "reference")(infonce_reference)
register("infonce", "dense")(infonce_dense)
register("ce_rows", "reference")(ce_rows_reference)

from . import function  # noqa: E402,F401  (custom op; registers "triton" when triton imports)
from . import distill  # noqa: E402,F401  (DistillClipLoss: teacher-weighted keys on lse_pair)
