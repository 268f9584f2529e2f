"""Triton kernels (filled in by the Triton issue)."""
