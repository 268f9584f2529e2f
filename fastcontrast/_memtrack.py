"""Peak live bytes of tensors created inside a region (CPU or GPU), counted at the ATen level.

A TorchDispatchMode sees every op's outputs; each new storage adds its bytes until it is freed. Inputs that
exist before the region are not counted, so the number is the *extra* memory an op needs. A custom op would be
one opaque call to such a mode, so ops listed in ``OPAQUE_IMPLS`` are run through their Python implementation
with the mode still active: what they allocate inside is counted too.
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


OPAQUE_IMPLS: dict = {}


class PeakMemory(TorchDispatchMode):
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
        impl = OPAQUE_IMPLS.get(func)
        if impl is not None:
            with self:  # re-enter: the op's internal allocations are tracked as well
                out = impl(*args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
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
