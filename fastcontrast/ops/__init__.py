"""One folder a loss family: ``reference.py`` (ground truth), Triton kernels and autograd glue beside it.

Importing this package registers every implementation with :mod:`fastcontrast.dispatch`.
"""
from . import adaptive, codebook, infonce, oblique, siglip  # noqa: F401
