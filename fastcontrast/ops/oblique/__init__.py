# The oblique loss runs on the shared "infonce" op with per-token normalisation (tokens=K); see reference.py.
from .reference import oblique_clip_loss_reference, oblique_similarity_reference  # noqa: F401
