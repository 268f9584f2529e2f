"""Probes that watch every ATen op a region runs (CPU or GPU): peak extra memory, and host syncs.

A TorchDispatchMode sees every op. A custom op would be one opaque call to such a mode, so the fused ops
(``fastcontrast.primitives.fused_op.IMPLS``) are run through their Python implementation with the mode still
active: what they do inside (C++ kernels included, whose ATen calls pass through the dispatcher) is seen too.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


from ..primitives.fused_op import IMPLS as OPAQUE_IMPLS


class _SeeInside(TorchDispatchMode):
    def _call(self, func, args, kwargs):
        impl = OPAQUE_IMPLS.get(func)
        if impl is not None:
            with self:  # re-enter: the op's internal work is observed as well
                return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class PeakMemory(_SeeInside):
    """Peak live bytes of tensors created inside the region. Inputs that exist before it are not counted, so the
    number is the *extra* memory an op needs."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.largest = 0
        self._seen = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self._call(func, args, kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key in self._seen or st.nbytes() == 0:
                    continue
                self._seen.add(key)
                nb = st.nbytes()
                self.live += nb
                self.largest = max(self.largest, nb)
                self.peak = max(self.peak, self.live)
                weakref.finalize(st, self._free, key, nb)
        return out


# Ops that make the host wait for the device: reading a value, or an output whose size depends on the data.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::unique_dim",
             "aten::_unique2", "aten::bincount", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero"}


class HostSyncs(_SeeInside):
    """Records every op in the region that would stall the host on a device tensor (``.item()``, ``float(t)``,
    ``bool(t)``, data-dependent output shapes, copies from a device to the CPU). On CPU tensors these are free,
    but the op is the same one that syncs on a GPU, so the probe finds them on a CPU-only machine."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNC_OPS:
            self.syncs.append(name)
        elif name in ("aten::_to_copy", "aten::copy_"):
            out = self._call(func, args, kwargs)
            src, dst = (args[1], args[0]) if name == "aten::copy_" else (args[0], out)
            if src.device.type not in ("cpu", "meta") and dst.device.type == "cpu":
                self.syncs.append(f"{name} {src.device}->cpu")
            return out
        return self._call(func, args, kwargs)


def _matmul_flops(a, b):
    if a.dim() == 1 or b.dim() == 1:
        return 2 * a.numel() * (b.shape[-1] if b.dim() > 1 else 1)
    batch = 1
    for v in a.shape[:-2]:
        batch *= v
    return 2 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


_MM = {"aten::matmul": _matmul_flops,
       "aten::mm": lambda a, b: 2 * a.shape[0] * a.shape[1] * b.shape[1],
       "aten::addmm": lambda c, a, b: 2 * a.shape[0] * a.shape[1] * b.shape[1],
       "aten::bmm": lambda a, b: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2],
       "aten::baddbmm": lambda c, a, b: 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]}


class MatmulFlops(_SeeInside):
    """FLOPs of the ATen matrix products in the region (2·m·n·k each), the custom ops' insides included."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        f = _MM.get(func._schema.name)
        if f is not None:
            self.flops += f(*args[:3] if func._schema.name in ("aten::addmm", "aten::baddbmm") else args[:2])
        return self._call(func, args, kwargs)
