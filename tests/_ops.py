"""The tests' view of the one op list (``fastcontrast.oplist``): dispatcher ops looked up by public name, the
backends that exist for an op (the cases generated), and the coverage check of a test's own table."""
import pytest
import torch

from fastcontrast import oplist
from fastcontrast.dispatch import registered, unavailable_reason


def dispatch_of(name: str) -> str:
    """The dispatcher op of op-list entry ``name`` (a variant, or a public name: its first entry)."""
    if name in oplist.OP:
        return oplist.OP[name].dispatch
    public = name.split("(")[0]
    found = [o.dispatch for o in oplist.OPS if o.public == public]
    if not found:
        raise KeyError(f"{name!r} names no op of fastcontrast.oplist")
    return found[0]


def existing_backends(op: str, backends=None):
    """The backends ``op`` has an implementation for (in ``backends``' order when given): the cases a test
    generates. A backend without an implementation is no case (its refusal is tested on its own)."""
    have = registered(op)
    return tuple(b for b in (backends or have) if b in have)


def backend_params(op: str, device, backends=None, extra=()):
    """pytest params for the existing backends of ``op`` (plus ``extra``, e.g. "auto"), each skipped with the
    dispatcher's reason where it exists but cannot run here (CUDA on a CPU machine)."""
    out = []
    for b in existing_backends(op, backends) + tuple(extra):
        reason = None if b == "auto" else unavailable_reason(op, b, torch.device(device))
        out.append(pytest.param(b, id=b, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def uncovered(table_names, exempt=()) -> list:
    """The op list's public losses that a test's table (keyed by op-list names or public names, variants in
    parentheses) does not cover, besides ``exempt``."""
    covered = {n.split("(")[0] for n in table_names}
    return sorted({o.public for o in oplist.OPS} - covered - set(exempt))


def assert_linear_memory(peak, sizes=(512, 1024, 2048), largest=None):
    """``peak(n, fused)`` -> a PeakMemory probe of one step at batch n: the fused path's extra memory grows
    linearly in n, the materialised reference's quadratically (so the probe can fail), and no tensor of the fused
    path exceeds ``largest`` bytes at the last size (no N×M buffer, not even a boolean one)."""
    tiled = [peak(n, True) for n in sizes]
    ref = [peak(n, False) for n in sizes]
    assert tiled[2].peak / tiled[1].peak < 2.3, [t.peak for t in tiled]
    assert ref[2].peak / ref[1].peak > 3.5, [r.peak for r in ref]
    if largest is not None:
        assert tiled[2].largest < largest, (tiled[2].largest, largest)
    return tiled, ref
