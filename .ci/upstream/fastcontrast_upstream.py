"""pytest plugin for .ci/upstream_tests.sh: runs a trainer's own test suite with or without fastcontrast's patch.

    PYTHONPATH=.ci/upstream FASTCONTRAST_UPSTREAM_PATCH=open_clip python -m pytest -p fastcontrast_upstream ...

FASTCONTRAST_UPSTREAM_PATCH: "open_clip" (fastcontrast.integrations.open_clip.patch()), "transformers"
(apply_fastcontrast_to_clip() and apply_fastcontrast_to_siglip() on the classes) or "none". Either way
torchvision is made importable first (fastcontrast.integrations.ensure_torchvision_importable: the CPU venv's
torchvision is a CUDA build), so the patched and unpatched runs differ by the patch alone. The patch is applied
before the test modules are collected, so their `from open_clip.loss import SigLipLoss` gets the drop-in.
"""
import os
import warnings


def pytest_configure(config):
    from fastcontrast.integrations import ensure_torchvision_importable

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the no-ops notice: expected in the CPU venv
        ensure_torchvision_importable()
    which = os.environ.get("FASTCONTRAST_UPSTREAM_PATCH", "none")
    if which == "open_clip":
        import fastcontrast.integrations.open_clip as fco

        fco.patch()
        import open_clip.loss

        assert open_clip.loss.SigLipLoss is fco.FastSigLipLoss, "the patch did not take"
    elif which == "transformers":
        from fastcontrast.integrations import transformers as fch

        fch.apply_fastcontrast_to_clip()
        fch.apply_fastcontrast_to_siglip()
        from transformers import CLIPModel, SiglipModel

        assert CLIPModel.forward._fastcontrast and SiglipModel.forward._fastcontrast, "the patch did not take"
    elif which != "none":
        raise ValueError(f"FASTCONTRAST_UPSTREAM_PATCH must be open_clip, transformers or none; got {which!r}")


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        f"fastcontrast upstream run: patch = {os.environ.get('FASTCONTRAST_UPSTREAM_PATCH', 'none')}")
