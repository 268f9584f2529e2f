"""One declaration for a fused op: its forward and backward as ``torch.library`` custom ops, their fake (meta)
implementations, the autograd rule, the autocast rule and the double-backward rule.

A fused op is a pair ``fastcontrast::<name>`` / ``fastcontrast::<name>_backward``. Being custom ops with fakes,
both compile under ``torch.compile`` without a graph break; the autograd rule of the forward calls the backward
op; the backward op either raises a clear error when differentiated (its kernel has no derivative of its own) or
has an exact rule of its own. :data:`IMPLS` maps each op to its Python implementation, so that a probe
(``fastcontrast.tools.memtrack``) can look inside instead of seeing one opaque call.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .._amp import register_custom_op as _register_autocast
from . import tiles as T

IMPLS: Dict[object, Callable] = {}  # OpOverload -> its Python implementation


@dataclasses.dataclass(frozen=True)
class DoubleBackward:
    """How the backward op behaves when differentiated (create_graph=True).

    ``rule`` None: it raises :func:`tiles.double_backward_error` naming ``what``, the kernel read from the backward
    op's inputs by ``kernel_of`` and ``alternative``; else ``(setup_context, backward)`` of an exact rule."""
    what: str
    alternative: str = "backend='reference'"
    kernel_of: Callable[[tuple], str] = lambda inputs: "fused"
    rule: Optional[Tuple[Callable, Callable]] = None


def fused_op(name: str, forward: Callable, backward: Callable, *, forward_fake: Callable, backward_fake: Callable,
             setup_context: Callable, gradients: Callable, autocast: Sequence[int], backward_autocast: Sequence[int],
             double_backward: DoubleBackward, check_create_graph: Optional[Callable] = None):
    """Define ``fastcontrast::name`` (``forward``) and ``fastcontrast::name_backward`` (``backward``); returns both
    custom ops. ``forward``/``backward``: annotated Python functions (the schema is read from the annotations).
    ``setup_context(ctx, inputs, output)`` saves what ``gradients(ctx, backward_op, *grad_outputs)`` needs; the
    latter returns one gradient per forward input. ``check_create_graph(ctx)``, if given, runs first in the
    autograd rule (it raises where a differentiable gradient is asked of a kernel that has none).
    ``autocast`` / ``backward_autocast``: positions of the feature arguments that follow the package's autocast
    policy (``fastcontrast._amp``)."""
    fwd = torch.library.custom_op(f"fastcontrast::{name}", mutates_args=())(forward)
    fwd.register_fake(forward_fake)
    bwd = torch.library.custom_op(f"fastcontrast::{name}_backward", mutates_args=())(backward)
    bwd.register_fake(backward_fake)

    def _autograd(ctx, *grads):
        if check_create_graph is not None:
            check_create_graph(ctx)
        return gradients(ctx, bwd, *grads)

    fwd.register_autograd(_autograd, setup_context=setup_context)
    db = double_backward
    if db.rule is None:
        def _setup(ctx, inputs, output):
            ctx.kernel = db.kernel_of(inputs)

        def _refuse(ctx, *grads):
            raise T.double_backward_error(db.what, ctx.kernel, db.alternative)

        bwd.register_autograd(_refuse, setup_context=_setup)
    else:
        bwd.register_autograd(db.rule[1], setup_context=db.rule[0])
    _register_autocast(f"fastcontrast::{name}", tuple(autocast))
    _register_autocast(f"fastcontrast::{name}_backward", tuple(backward_autocast))
    IMPLS[getattr(torch.ops.fastcontrast, name).default] = forward
    IMPLS[getattr(torch.ops.fastcontrast, f"{name}_backward").default] = backward
    return fwd, bwd
