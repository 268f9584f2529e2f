from ...dispatch import register
from .reference import infonce_reference, lse_pair_reference

register("infonce", "reference")(infonce_reference)

from . import triton_impl  # noqa: E402,F401  registers "triton" when triton imports
