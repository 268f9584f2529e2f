"""Gradient caching: a contrastive loss over a batch larger than the encoders' activations fit in memory.

Gao, Zhang, Han, Callan, *Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup* (2021). The
loss L(f_1, ..., f_T) of T towers' features f_t = E_t(x_t) couples every sample of the batch, but
∂L/∂θ = Σ_t Σ_chunks (∂f_t,c/∂θ)ᵀ · ∂L/∂f_t,c, so a step needs only one chunk's activations at a time:

1. each tower encodes its inputs chunk by chunk under ``torch.no_grad`` (the RNG state before each chunk is kept);
2. the loss runs once on the whole batch of cached features (detached leaves) and is back-propagated to them
   (and to any learnable loss argument such as ``logit_scale``/``logit_bias``, through its own graph);
3. each chunk is encoded again with autograd, from the RNG state of its first pass (so dropout and drop-path draw
   the same masks), and its cached feature gradient is back-propagated through the encoder.

Peak memory: one chunk's activations plus the O(N·D) features and their gradients (the fused losses add
O(N) more); the price is a second forward of every encoder. Gradients equal one backward through the whole
batch encoded with the same RNG draws.
"""
from __future__ import annotations

import contextlib
import numbers
from collections.abc import Mapping
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from . import _validation as V

__all__ = ["GradCache"]


def _is_ddp(m) -> bool:
    return isinstance(m, nn.parallel.DistributedDataParallel)


def _split(name: str, x, chunk: int) -> Tuple[int, List[Any]]:
    """(batch size, chunks along dim 0) of a tensor or a dict of tensors (non-tensor values are repeated)."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            raise ValueError(f"{name} must have a batch dimension (dim 0), got a 0-d tensor")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (dim 0 has size 0)")
        return x.shape[0], list(x.split(chunk))
    if isinstance(x, Mapping):
        sizes = {k: v.shape[0] for k, v in x.items() if isinstance(v, Tensor) and v.dim() > 0}
        if not sizes:
            raise ValueError(f"{name} is a dict without any tensor with a batch dimension")
        if len(set(sizes.values())) != 1:
            raise ValueError(f"{name}: every tensor must have the same batch size (dim 0), got {sizes}")
        n = next(iter(sizes.values()))
        if n == 0:
            raise ValueError(f"{name} is an empty batch (dim 0 has size 0)")
        parts = {k: x[k].split(chunk) for k in sizes}
        count = -(-n // chunk)
        return n, [{k: (parts[k][c] if k in parts else v) for k, v in x.items()} for c in range(count)]
    raise TypeError(f"{name} must be a torch.Tensor or a dict of tensors (chunked along dim 0), "
                    f"got {type(x).__name__}")


def _features(name: str, out) -> Tensor:
    # transformers >= 5 returns a ModelOutput from get_image_features/get_text_features: the features are
    # its pooler_output; older versions (and open_clip) return the tensor itself
    if not isinstance(out, Tensor) and isinstance(getattr(out, "pooler_output", None), Tensor):
        out = out.pooler_output
    if not isinstance(out, Tensor):
        raise TypeError(f"{name} must return a tensor of features (batch first), got {type(out).__name__}; "
                        "wrap it, e.g. lambda x: model(x)[0]")
    return out


def _devices_of(obj, out: set) -> None:
    if isinstance(obj, Tensor):
        if obj.device.type == "cuda":
            out.add(obj.device.index if obj.device.index is not None else torch.cuda.current_device())
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _devices_of(v, out)


def _module_of(encoder) -> Optional[nn.Module]:
    if isinstance(encoder, nn.Module):
        return encoder
    owner = getattr(encoder, "__self__", None)  # a bound method such as model.encode_image
    return owner if isinstance(owner, nn.Module) else None


class _RngState:
    """The CPU generator's state and that of the CUDA devices a chunk can draw from (dropout, drop-path)."""

    def __init__(self, devices: Sequence[int]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]

    @contextlib.contextmanager
    def restored(self):
        # fork_rng puts the generators back afterwards: the replays leave the RNG where the first passes left it
        with torch.random.fork_rng(devices=[d for d, _ in self.cuda]):
            torch.set_rng_state(self.cpu)
            for d, s in self.cuda:
                torch.cuda.set_rng_state(s, d)
            yield


class GradCache:
    """One training step of a contrastive loss over the whole batch with one chunk's activations in memory.

    ``gc = GradCache(encoders, loss_fn, chunk_size, ddp=None, scaler=None)``, then
    ``loss = gc(inputs_1, ..., inputs_T, *loss_args, **loss_kwargs)`` runs the forward *and* the backward and
    returns the loss, detached: the parameters' ``.grad`` hold the gradients of
    ``loss_fn(E_1(inputs_1), ..., E_T(inputs_T), *loss_args, **loss_kwargs)``, the same as one backward through
    the full batch (see the module docstring for the method, Gao et al. 2021). Then ``optimizer.step()``.

    encoders: one callable per tower, ``E_t(chunk) -> (n, ...)`` features; a dict input is passed as keywords,
        ``E_t(**chunk)`` (so ``model.get_text_features`` takes ``{"input_ids", "attention_mask"}`` as is). A
        ``transformers`` ModelOutput result is read through its ``pooler_output``. The same callable may appear
        twice (two views through one encoder). Towers may hold different batch sizes (hard negatives, say):
        the loss decides whether that is valid (``ClipLoss`` pairs i <-> i and says so).
    loss_fn: ``loss_fn(f_1 (N_1, ...), ..., f_T (N_T, ...), *loss_args, **loss_kwargs)`` -> a scalar tensor, or
        a dict of scalars (open_clip's ``output_dict=True``) whose sum is back-propagated. Any fastcontrast loss
        (``ClipLoss``, ``SigLipLoss``, ``clip_loss``, their distributed modes) or any callable. Learnable
        arguments (``model.logit_scale.exp()``, ``logit_bias``) get their gradients through their own graph.
    chunk_size: rows per chunk (an int, or one per tower); the batch is split along dim 0.
    ddp: the ``DistributedDataParallel`` module the encoders run through (one, or one per tower, None for a
        tower outside DDP); an encoder that *is* a DDP module is found by itself. All replays through a DDP
        module but its last run under ``no_sync()``, so its gradients are all-reduced once per step. An encoder
        must call the DDP module (its ``forward``), not ``ddp.module``, or DDP never reduces; a DDP module
        shared by several towers must be built with ``find_unused_parameters=True`` (each replay uses one
        tower) and its forward should return only the features.
    scaler: a ``torch.amp.GradScaler`` (anything with ``.scale(loss)``): the scaled loss is back-propagated, as
        ``scaler.scale(loss).backward()`` would; then ``scaler.step(optimizer); scaler.update()``. Under
        ``torch.autocast`` call ``gc`` inside the autocast region: first passes and replays run in it alike.

    Replays restore the CPU and CUDA RNG states of their first pass (the CUDA devices of the inputs, of the
    encoder's module and the current one); Python's and NumPy's generators are not touched. With
    ``fastcontrast.set_debug(True)`` every replay is compared with its cached features (a host sync) and a
    mismatch (an encoder that is not deterministic given the RNG state) raises.
    """

    def __init__(self, encoders: Sequence[Callable], loss_fn: Callable,
                 chunk_size: Union[int, Sequence[int]], *, ddp=None, scaler=None):
        if callable(encoders) or not isinstance(encoders, (list, tuple)):
            raise TypeError("encoders must be a list or tuple of callables, one per tower, e.g. "
                            f"[model.encode_image, model.encode_text]; got {type(encoders).__name__}")
        if len(encoders) == 0:
            raise ValueError("encoders must hold at least one callable")
        for i, e in enumerate(encoders):
            if not callable(e):
                raise TypeError(f"encoders[{i}] must be callable, got {type(e).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.encoders, self.loss_fn = list(encoders), loss_fn
        t = len(self.encoders)
        sizes = [chunk_size] * t if not isinstance(chunk_size, (list, tuple)) else list(chunk_size)
        if len(sizes) != t:
            raise ValueError(f"chunk_size: give one int or one per tower ({t}), got {len(sizes)} values")
        for c in sizes:
            if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
                raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {c!r}")
        self.chunk_sizes = [int(c) for c in sizes]
        if scaler is not None and not callable(getattr(scaler, "scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler (with .scale(loss)), got {type(scaler).__name__}")
        self.scaler = scaler
        self.ddp = self._ddp_per_tower(ddp)

    def _ddp_per_tower(self, ddp) -> List[Optional[nn.Module]]:
        t = len(self.encoders)
        if isinstance(ddp, (list, tuple)):
            if len(ddp) != t:
                raise ValueError(f"ddp: give one module or one per tower ({t}), got {len(ddp)}")
            mods = list(ddp)
        else:
            mods = [ddp] * t
        for i, e in enumerate(self.encoders):
            if _is_ddp(e):
                if mods[i] is not None and mods[i] is not e:
                    raise ValueError(f"encoders[{i}] is a DistributedDataParallel module but ddp names another")
                mods[i] = e
        for i, m in enumerate(mods):
            if m is not None and not _is_ddp(m):
                raise TypeError(f"ddp{'[%d]' % i if isinstance(ddp, (list, tuple)) else ''} must be a "
                                f"torch.nn.parallel.DistributedDataParallel module, got {type(m).__name__}")
        for m in {id(m): m for m in mods if m is not None}.values():
            if sum(x is m for x in mods) > 1 and not m.find_unused_parameters:
                raise ValueError("ddp: a DistributedDataParallel module shared by several towers needs "
                                 "find_unused_parameters=True (each replay runs one tower, so the other "
                                 "tower's parameters are unused in the backward that all-reduces), or wrap "
                                 "each tower in its own DDP module")
        return mods

    # --------------------------------------------------------------------------------------------- the step
    def __call__(self, *args, **loss_kwargs):
        t = len(self.encoders)
        if len(args) < t:
            raise TypeError(f"GradCache takes one input per tower ({t}) before the loss's arguments, "
                            f"got {len(args)} positional arguments")
        if not torch.is_grad_enabled():
            raise RuntimeError("GradCache computes gradients: call it with gradients enabled "
                               "(not under torch.no_grad or torch.inference_mode)")
        inputs, loss_args = args[:t], args[t:]

        chunks, sizes = [], []
        for i, (x, c) in enumerate(zip(inputs, self.chunk_sizes)):
            n, parts = _split(f"inputs[{i}]", x, c)
            sizes.append(n)
            chunks.append(parts)

        # 1. features without graphs, the RNG state before each chunk kept
        feats, states = [], []
        for i, enc in enumerate(self.encoders):
            devices = self._cuda_devices(enc, inputs[i])
            outs, rng = [], []
            for c, part in enumerate(chunks[i]):
                rng.append(_RngState(devices))
                with torch.no_grad():
                    out = _features(f"encoders[{i}]", self._call(enc, part))
                part_rows = self._rows(part)
                if out.dim() == 0 or out.shape[0] != part_rows:
                    raise ValueError(f"encoders[{i}] must return one row per input sample: chunk {c} has "
                                     f"{part_rows} rows, its features have shape {tuple(out.shape)}")
                outs.append(out)
            f = torch.cat(outs) if len(outs) > 1 else outs[0]
            del outs
            feats.append(f.detach().requires_grad_())
            states.append(rng)

        # 2. the loss once on the whole batch; its backward stops at the cached features
        out = self.loss_fn(*feats, *loss_args, **loss_kwargs)
        total = self._total(out)
        (self.scaler.scale(total) if self.scaler is not None else total).backward()
        grads = []
        for f in feats:
            grads.append(f.grad if f.grad is not None else torch.zeros_like(f))  # a tower the loss ignored
        cached = [f.detach() for f in feats] if V.debug_enabled() else None
        del feats

        # 3. replay each chunk with autograd from its RNG state; all-reduce once per DDP module
        plan = [(i, c) for i in range(t) for c in range(len(chunks[i]))]
        last = {}
        for k, (i, _) in enumerate(plan):
            if self.ddp[i] is not None:
                last[id(self.ddp[i])] = k
        for k, (i, c) in enumerate(plan):
            m = self.ddp[i]
            sync = m is None or last[id(m)] == k
            g = grads[i].split(self.chunk_sizes[i])[c]
            with (contextlib.nullcontext() if sync else m.no_sync()), states[i][c].restored():
                f = _features(f"encoders[{i}]", self._call(self.encoders[i], chunks[i][c]))
                if f.shape != g.shape:
                    raise RuntimeError(f"encoders[{i}] returned shape {tuple(f.shape)} on replay of chunk {c}, "
                                       f"{tuple(g.shape)} on its first pass")
                if cached is not None:
                    self._check_replay(i, c, f, cached[i].split(self.chunk_sizes[i])[c])
                if not f.requires_grad:
                    if m is not None and sync:
                        raise RuntimeError(f"encoders[{i}]'s features do not require grad, but its replay is "
                                           "the one that makes DDP all-reduce; put the frozen tower first")
                    continue  # a frozen tower
                torch.autograd.backward(f, g.to(f.dtype))
        return self._detached(out)

    # -------------------------------------------------------------------------------------------- helpers
    @staticmethod
    def _call(enc, part):
        return enc(**part) if isinstance(part, Mapping) else enc(part)

    @staticmethod
    def _rows(part) -> int:
        if isinstance(part, Tensor):
            return part.shape[0]
        return next(v.shape[0] for v in part.values() if isinstance(v, Tensor) and v.dim() > 0)

    @staticmethod
    def _cuda_devices(enc, x) -> List[int]:
        devs: set = set()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devs.add(torch.cuda.current_device())
            _devices_of(x, devs)
            mod = _module_of(enc)
            if mod is not None:
                p = next(mod.parameters(), None)
                if p is not None:
                    _devices_of(p, devs)
        return sorted(devs)

    @staticmethod
    def _total(out) -> Tensor:
        if isinstance(out, Mapping):
            vals = list(out.values())
            if not vals or not all(isinstance(v, Tensor) for v in vals):
                raise TypeError("loss_fn returned a dict: its values must be tensors (they are summed)")
            out = sum(vals)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise TypeError("loss_fn must return a scalar tensor (or a dict of them), got "
                            f"{type(out).__name__}{tuple(out.shape) if isinstance(out, Tensor) else ''}")
        if not out.requires_grad:
            raise RuntimeError("loss_fn's result does not depend on the features with gradient: it must be "
                               "computed from the features GradCache passes it")
        return out.reshape(())

    @staticmethod
    def _detached(out):
        if isinstance(out, Mapping):
            return {k: v.detach() for k, v in out.items()}
        return out.detach()

    @staticmethod
    def _check_replay(i: int, c: int, replay: Tensor, first: Tensor) -> None:
        tol = 1e-4 if replay.dtype in (torch.float32, torch.float64) else 2e-2
        a, b = replay.detach().float(), first.float()
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        if not err <= tol:
            raise RuntimeError(f"encoders[{i}], chunk {c}: the replay's features differ from the first pass's "
                               f"(relative error {err:.2e} > {tol:.0e}); the encoder is not deterministic given "
                               "the RNG state (an RNG other than torch's, a non-deterministic kernel, or state "
                               "that changes between calls, e.g. BatchNorm statistics in train mode)")
