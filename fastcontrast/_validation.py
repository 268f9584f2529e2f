"""Input checks shared by every public function.

Each check raises ``TypeError`` (wrong type / dtype) or ``ValueError`` (wrong shape, empty, out of range,
non-finite) with a message that names the argument and says what was expected, so a bad call fails at the
API boundary instead of deep inside a kernel.

Checks of types, shapes, devices and Python numbers always run: they read no tensor data. Checks of tensor
*values* (NaN/inf in features, a logit scale tensor <= 0, labels out of range, temperatures <= 0) must copy a
result from the device to the host, which stalls a GPU training loop and breaks CUDA-graph capture, so they run
only in debug mode: ``fastcontrast.set_debug(True)`` or the environment variable ``FASTCONTRAST_DEBUG=1``.
With debug off, non-finite inputs propagate as NaN, as in PyTorch's own losses.
"""
from __future__ import annotations

import contextlib
import numbers
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_DEBUG = os.environ.get("FASTCONTRAST_DEBUG", "0").strip().lower() not in ("", "0", "false", "no", "off")


def set_debug(enabled: bool = True) -> None:
    """Turn the value checks (each a device-to-host sync) on or off for the whole process."""
    global _DEBUG
    _DEBUG = bool(enabled)


def debug_enabled() -> bool:
    return _DEBUG


@contextlib.contextmanager
def debug(enabled: bool = True):
    """``with fastcontrast.debug():`` value checks on inside the block only."""
    global _DEBUG
    before, _DEBUG = _DEBUG, bool(enabled)
    try:
        yield
    finally:
        _DEBUG = before


def _check_values() -> bool:
    # value checks read tensor data: opt-in (a host sync each), and never inside a torch.compile trace
    return _DEBUG and not torch.compiler.is_compiling()


def check_features(name: str, t, ndim: int | Sequence[int]) -> None:
    """A float tensor of the given rank with a non-empty batch dimension and a non-empty feature dimension."""
    ndims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(t.shape)}); at least one sample is needed")
    if t.numel() == 0:
        raise ValueError(f"{name} has an empty feature dimension (shape {tuple(t.shape)})")


def check_pair(a_name: str, a: torch.Tensor, b_name: str, b: torch.Tensor, same_batch: bool = False) -> None:
    """Two feature tensors that can meet in one similarity: same device, dtype and trailing shape."""
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}; both must be on one device")
    if a.dtype != b.dtype:
        raise TypeError(f"{a_name} is {a.dtype} but {b_name} is {b.dtype}; both must have one dtype")
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"{a_name} has per-sample shape {tuple(a.shape[1:])} but {b_name} has {tuple(b.shape[1:])}; they must match"
        )
    if same_batch and a.shape[0] != b.shape[0]:
        raise ValueError(f"{a_name} has batch {a.shape[0]} but {b_name} has batch {b.shape[0]}; they must match")


def check_finite(**tensors: Optional[torch.Tensor]) -> None:
    """Debug mode: reject NaN/inf in any of the named tensors (one host sync for all of them)."""
    if not _check_values():
        return
    named = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not named:
        return
    flags = torch.stack([torch.isfinite(v).all() for _, v in named]).cpu()
    for (k, v), ok in zip(named, flags.tolist()):
        if not ok:
            raise ValueError(f"{k} contains non-finite values (NaN or inf)")


def as_scalar_tensor(name: str, value, like: torch.Tensor, positive: bool = True) -> torch.Tensor:
    """A Python number or a one-element tensor, returned as a 0-d tensor on ``like``'s device.

    Tensors keep their autograd graph (a learnable logit scale gets its gradient). A Python number is checked
    always; a tensor's value only in debug mode (reading it is a host sync).
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must have exactly one element, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        if _check_values():
            _check_number(name, float(value.detach()), positive)
        return value.reshape(())
    _check_number(name, float(value), positive)
    return torch.tensor(float(value), device=like.device,
                        dtype=torch.float32 if like.dtype != torch.float64 else like.dtype)


def _check_number(name: str, v: float, positive: bool) -> None:
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")


def check_vector(name: str, t, length: int, like: torch.Tensor, positive: bool = True) -> torch.Tensor:
    """A float vector of the given length on ``like``'s device (per-sample temperatures, scales)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({length},), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the features are on {like.device}")
    if _check_values():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
        if positive and not bool((t > 0).all()):
            raise ValueError(f"{name} must be > 0 everywhere")
    return t


def check_labels(labels, n_rows: int, n_cols: int, like: torch.Tensor, diagonal_as_none: bool = False):
    """Positive column per row. Defaults to the diagonal, which needs n_rows == n_cols; with
    ``diagonal_as_none`` the default stays None (implementations that take None skip an index tensor)."""
    if labels is None:
        if n_rows != n_cols:
            raise ValueError(
                f"labels are required when the two batches differ in size ({n_rows} image vs {n_cols} text rows): "
                "pass labels of shape (N_image,) giving each image's positive text index"
            )
        return None if diagonal_as_none else torch.arange(n_rows, device=like.device)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of dtype int64, got {type(labels).__name__}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an integer tensor (int64), got {labels.dtype}")
    if labels.shape != (n_rows,):
        raise ValueError(f"labels must have shape ({n_rows},), got {tuple(labels.shape)}")
    if labels.device != like.device:
        raise ValueError(f"labels are on {labels.device} but the features are on {like.device}")
    if _check_values():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= n_cols:
            raise ValueError(f"labels must lie in [0, {n_cols}), got values in [{lo}, {hi}]")
    return labels.long()


def labels_guard(labels: Optional[torch.Tensor], upper: int):
    """(indices clamped into [0, upper), bad): ``bad`` is a 0-d bool tensor, True when any index lay outside
    [0, upper) (negative ones included), or None when there is nothing to guard.

    No host sync: the flag stays on the device and :func:`poison` folds it into the loss, so an invalid index is
    NaN (loss and every gradient) rather than a plausible number, and the clamped copy is what reaches the
    kernels (no out-of-bounds load on a GPU, no Python-style wrap of -1 to the last column). In debug mode the
    caller's check already raised a ValueError for such indices, so nothing is added. Serves labels and any
    other index argument (group ids mapped to columns, ...)."""
    if labels is None or _check_values():
        return labels, None
    bad = ((labels < 0) | (labels >= upper)).any()
    return labels.clamp(0, upper - 1), bad


def nonfinite_flag(*tensors) -> Optional[torch.Tensor]:
    """A 0-d bool tensor, True when any of the tensors holds a NaN or an inf, for :func:`poison` (no host sync);
    None in debug mode (:func:`check_finite` raised already) or when there is no tensor. For kernels whose
    comparisons (``z > 0``, max) would drop a NaN instead of propagating it."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts or _check_values():
        return None
    ok = torch.stack([torch.isfinite(t).all() for t in ts]).all()
    return ~ok


def poison(result, *flags: Optional[torch.Tensor]):
    """``result`` times NaN where any flag of :func:`labels_guard` is set, else times exactly 1 (bit-identical):
    a multiplication, so the NaN reaches the gradients of every input too (a masked_fill would zero them)."""
    flags = [f for f in flags if f is not None]
    if not flags:
        return result
    bad = flags[0] if len(flags) == 1 else torch.stack(flags).any()
    return result * torch.where(bad, float("nan"), 1.0).to(result.dtype)


def plus_zero_bias(loss, bias: Optional[torch.Tensor]):
    """``loss + 0·bias``: for a loss computed without a bias that cancels in every softmax, so that the bias
    still gets its exactly-zero gradient and a NaN bias still makes the loss NaN."""
    return loss if bias is None else loss + (bias * 0).to(loss.dtype)


def check_positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return int(v)


def check_positive_float(name: str, v, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(v).__name__}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {v}")
    if v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")
    return v


def check_cluster_sizes(name: str, t) -> torch.Tensor:
    """Each sample's dataset-wide cluster size: a real tensor (N,), integer or float (the official MM-TS loop passes
    ``.float()`` counts, main_lavila_finetune_mir.py:761); positivity checked in debug mode."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,) (cluster sizes), got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold positive numbers (cluster sizes, integer or float), got dtype {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must have shape (N,) with N >= 1, got {tuple(t.shape)}")
    if _check_values() and not bool((t > 0).all()):
        raise ValueError(f"{name} must hold positive numbers (cluster sizes), got a value <= 0")
    return t


def check_step(name: str, step, total_steps: int) -> None:
    """A training step in [0, total_steps]: a number (always checked) or a tensor (checked in debug mode)."""
    if isinstance(step, torch.Tensor):
        if step.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(step.shape)}")
        if not _check_values():
            return
        step = float(step)
    elif isinstance(step, bool) or not isinstance(step, numbers.Real):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {type(step).__name__}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"{name} must lie in [0, total_steps] = [0, {total_steps}], got {step}")


def check_ids(image_ids, text_ids, n: int, m: int, like: torch.Tensor, labels=None):
    """Both or neither; integer (N,) and (M,) on the features' device; not together with labels."""
    if image_ids is None and text_ids is None:
        return None, None
    if image_ids is None or text_ids is None:
        missing = "image_ids" if image_ids is None else "text_ids"
        raise ValueError(f"{missing} is required when the other side's ids are given (pairs with equal ids are "
                         "positives)")
    if labels is not None:
        raise ValueError("pass either labels (one positive per image) or image_ids/text_ids (groups), not both")
    out = []
    for name, ids, length in (("image_ids", image_ids, n), ("text_ids", text_ids, m)):
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"{name} must be an integer torch.Tensor of shape ({length},), got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
        if ids.shape != (length,):
            raise ValueError(f"{name} must have shape ({length},), got {tuple(ids.shape)}")
        if ids.device != like.device:
            raise ValueError(f"{name} is on {ids.device} but the features are on {like.device}")
        out.append(ids.long())
    return out[0], out[1]
