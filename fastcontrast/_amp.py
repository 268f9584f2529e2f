"""Every op under ``torch.autocast``: one cast policy, applied at the public API and to the custom ops.

Inside an autocast region a trainer's features arrive in the autocast dtype (fp16/bf16 from the last matmul)
or in float32, possibly mixed. The policy:

* the features are cast to one compute dtype: the autocast dtype on CUDA (tensor-core kernels, as cuBLAS
  matmuls under autocast), float32 on the CPU (the CPU kernels compute in float32 whatever they are given);
  float64 is never touched, as autocast leaves it alone;
* the loss itself runs with autocast off, so nothing inside is re-cast behind the kernels' back (the C++
  kernels would otherwise receive an fp16 GEMM result), and scales, temperatures and statistics stay float32;
* the loss comes back as float32, like ``F.cross_entropy`` under autocast.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable, Optional, Sequence

import torch


def feature_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype features are computed in under an enclosing autocast on ``device_type``; None outside one."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type) if device_type == "cuda" else torch.float32


def _cast(t, dtype: torch.dtype):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 and t.dtype != dtype:
        return t.to(dtype)
    return t


def _float32(out):
    if isinstance(out, torch.Tensor):
        return out if out.dtype in (torch.float32, torch.float64) else out.float()
    if isinstance(out, tuple):  # (loss, stats) of codebook_loss
        return (_float32(out[0]),) + out[1:]
    return out


def autocast_aware(*features: str) -> Callable:
    """Decorator for a public loss whose arguments named ``features`` are feature tensors (see module doc).

    Outside autocast it costs one flag read; inside, the named arguments are cast and the loss runs with
    autocast disabled on their device.
    """
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not torch._C._is_any_autocast_enabled():
                return fn(*args, **kwargs)
            bound = sig.bind(*args, **kwargs)
            first = bound.arguments.get(features[0])
            if not isinstance(first, torch.Tensor):
                return fn(*args, **kwargs)  # the validation inside names the bad argument
            dev = first.device.type
            dtype = feature_dtype(dev)
            if dtype is None:
                return fn(*args, **kwargs)
            for name in features:
                if name in bound.arguments:
                    bound.arguments[name] = _cast(bound.arguments[name], dtype)
            with torch.autocast(dev, enabled=False):
                return _float32(fn(*bound.args, **bound.kwargs))

        return wrapper

    return deco


_LIB = torch.library.Library("fastcontrast", "IMPL")


def register_custom_op(qualname: str, feature_positions: Sequence[int]) -> None:
    """Autocast rules for a ``torch.library`` custom op: the features at ``feature_positions`` follow the policy
    above, everything else passes unchanged, and the op runs with autocast off (also under torch.compile)."""
    op = torch._library.utils.lookup_op(qualname)
    name = qualname.split("::")[1]
    for device_type in ("cpu", "cuda"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _dev=device_type, _excl=keyset):
            dtype = feature_dtype(_dev)
            if dtype is not None:
                args = tuple(_cast(a, dtype) if i in feature_positions else a for i, a in enumerate(args))
            with torch._C._ExcludeDispatchKeyGuard(_excl):
                return op(*args)

        _LIB.impl(name, kernel, key, with_keyset=True)
