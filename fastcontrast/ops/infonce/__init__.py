from ...dispatch import register
from .reference import infonce_reference

register("infonce", "reference")(infonce_reference)

from . import function  # noqa: E402,F401  (custom op; registers "triton" when triton imports)
