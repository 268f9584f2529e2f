from ...dispatch import register
from .reference import siglip_loss_reference

register("siglip", "reference")(siglip_loss_reference)

from . import function  # noqa: E402,F401  (registers "triton" when triton imports)
