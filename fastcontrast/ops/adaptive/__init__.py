from ...dispatch import register
from .reference import local_density_reference, max_margin_loss_reference

register("max_margin", "reference")(max_margin_loss_reference)
register("density", "reference")(local_density_reference)


from . import function  # noqa: E402,F401  (registers "triton" when triton imports)
