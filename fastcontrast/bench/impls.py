"""What the bench runs: each op's inputs and FLOP/byte floors, fastcontrast's backends, and the baselines users
would run instead (IMPLS: one table)."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import oplist



# ------------------------------------------------------------------------------------------------ candidates
def _configs():
    """The launch-table module (fastcontrast.primitives.configs)."""
    from ..primitives import configs

    return configs


def _open_clip_loss(name: str = "ClipLoss"):
    from .._compat import open_clip_loss_module

    mod = open_clip_loss_module()
    return None if mod is None else getattr(mod, name)()


def _inf_cl():
    """Inf-CL's single-GPU Triton loss; it is one-directional (rows → columns), so CLIP's loss is two calls."""
    try:
        from inf_cl import cal_flash_loss  # type: ignore  (cal_inf_loss needs a process group)
    except Exception:  # noqa: BLE001
        return None
    return lambda x, y, s: 0.5 * (cal_flash_loss(x, y, scale=s).mean() + cal_flash_loss(y, x, scale=s).mean())


def _siglip_kernel():
    """siglip-kernel 0.1.2's fused_siglip_loss (log-temperature and bias as tensors; its default routing: the
    chunked cuBLAS + fused BCE path for bf16/fp16); None when it is not installed."""
    try:
        from siglip_kernel import fused_siglip_loss  # type: ignore
    except Exception:  # noqa: BLE001
        return None
    return lambda x, y, scale, bias: fused_siglip_loss(x, y, scale.log(), bias)


def _import_error(module: str) -> str:
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:80]}"
    return "importable"


class Unavailable(RuntimeError):
    """A baseline that cannot run here: its row says why instead of vanishing."""


def _unavailable(reason: str) -> Callable:
    def fn(**_):
        raise Unavailable(reason)

    return fn


OPS = oplist.bench_ops()  # the ops bench times by default: the op list's bench entries
BENCHABLE = oplist.benchable_ops()  # every op with bench inputs


# What each fastcontrast implementation name in the tables means (the baselines: IMPLS below).
LEGEND = {
    "fastcontrast[triton]": "fused Triton kernels (tiled, never N×N; the default on CUDA)",
    "fastcontrast[cuda]": "fused CUDA kernels of csrc/ (backend='cuda')",
    "fastcontrast[cpu]": "fused C++ CPU kernels of csrc/ (BLAS row blocks; the default on CPU when built)",
    "fastcontrast[dense]": "the materialised path (backend='dense': one GEMM, N×N statistics; auto's pick when small)",
    "fastcontrast[torch-tiles]": "the same tiling in plain PyTorch blocks: what runs without the C++ extension",
}

def _bench_op(op: str) -> oplist.OpInfo:
    info = oplist.get(op)
    if info.bench_make is None:
        raise ValueError(f"op {op!r} has no bench inputs (fastcontrast.oplist: bench_make); the benched ops are "
                         f"{', '.join(OPS)}")
    return info


def make_inputs(op: str, n: int, d: int, dev: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Fresh random leaves (requires_grad where the loss is differentiable) for one op at batch n: the op list's
    ``bench_make``, seeded by n."""
    return _bench_op(op).bench_make(torch.Generator().manual_seed(n), dev, dtype, n, d)


def loss_fn(op: str, backend: str) -> Callable[..., torch.Tensor]:
    """The op's loss with ``backend`` and the bench's fixed arguments (a tuple's terms summed)."""
    info = _bench_op(op)
    return lambda **kw: info(backend, bench=True, **kw)


def dispatch_op(op: str) -> str:
    return oplist.get(op).dispatch


def flops(op: str, n: int, d: int) -> float:
    """Floor of forward+backward in FLOPs (the op list's model): the pairwise similarity once, then one GEMM each
    for the gradients that exist (3 units of 2·N·M·d for the symmetric losses)."""
    return _bench_op(op).flops(n, d)


def bytes_floor(op: str, n: int, d: int, elt: int) -> float:
    """Each input read once, each gradient written once (the op list's model)."""
    return _bench_op(op).bytes(n, d, elt)


def _amp(dev: torch.device, dtype: torch.dtype):
    """The autocast a trainer runs its loss under when its features are ``dtype`` (none for float32)."""
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))


# open_clip's loss classes and the bench inputs their forward takes, in order
_OPEN_CLIP = {
    "clip_loss": ("ClipLoss", ("image_features", "text_features", "logit_scale")),
    "siglip_loss": ("SigLipLoss", ("image_features", "text_features", "logit_scale", "logit_bias")),
    "distill_clip_loss": ("DistillClipLoss", ("image_features", "text_features", "logit_scale", "teacher_image_features",
                                    "teacher_text_features", "teacher_logit_scale")),
}


def _make_open_clip(compiled: bool):
    def make(op, dev, dtype):
        cls, args = _OPEN_CLIP[op]
        oc = _open_clip_loss(cls)
        if oc is None:
            raise Unavailable(f"open_clip: {_import_error('open_clip')}")

        def f(**kw):
            with _amp(dev, dtype):  # as open_clip's trainer runs its loss (--precision amp_bf16)
                out = oc(*[kw[a] for a in args])
            return sum(out) if isinstance(out, (tuple, list)) else out

        return torch.compile(f, dynamic=False) if compiled else f

    return make


def _make_reference(compiled: bool):
    def make(op, dev, dtype):
        f = loss_fn(op, "reference")
        return torch.compile(f, dynamic=False) if compiled else f

    return make


def _make_inf_cl(op, dev, dtype):
    inf = _inf_cl()
    if inf is None:
        raise Unavailable(f"inf_cl: {_import_error('inf_cl')}")
    return lambda image_features, text_features, logit_scale: inf(image_features, text_features, logit_scale)


def _make_siglip_kernel(op, dev, dtype):
    sk = _siglip_kernel()
    if sk is None:
        raise Unavailable(f"siglip_kernel: {_import_error('siglip_kernel')}")
    return lambda image_features, text_features, logit_scale, logit_bias: sk(image_features, text_features,
                                                                            logit_scale, logit_bias)


@dataclasses.dataclass(frozen=True)
class Impl:
    """A baseline: what users of an op would run instead of fastcontrast."""
    name: str
    ops: Tuple[str, ...]
    make: Callable[[str, torch.device, torch.dtype], Callable]  # (op, device, dtype) -> loss(**inputs)
    legend: str
    compiled: bool = False
    cuda_only: bool = False
    grads_in_forward: bool = False  # computes its gradients inside its forward (its fwd column stays empty)


_COMPILED = ("under torch.compile(dynamic=False): one graph per size, as a fixed-batch training run compiles it "
             "(compiled in the warm-up, before timing)")
# The baselines, one table. Features are the bench dtype (bf16 on the GPU), the dtype their users run them in.
IMPLS: Tuple[Impl, ...] = (
    Impl("open_clip ClipLoss", ("clip_loss",), _make_open_clip(False),
         "open_clip.loss.ClipLoss on the bench dtype's features under torch.autocast(that dtype), as open_clip's "
         "trainer runs it (--precision amp_bf16); materialises the N×N logits"),
    Impl("open_clip ClipLoss (compiled)", ("clip_loss",), _make_open_clip(True), "the same " + _COMPILED, compiled=True),
    Impl("open_clip SigLipLoss", ("siglip_loss",), _make_open_clip(False),
         "open_clip.loss.SigLipLoss on the bench dtype's features under torch.autocast(that dtype), as open_clip's "
         "trainer runs it; materialises the N×N logits"),
    Impl("open_clip SigLipLoss (compiled)", ("siglip_loss",), _make_open_clip(True), "the same " + _COMPILED,
         compiled=True),
    Impl("open_clip DistillClipLoss", ("distill_clip_loss",), _make_open_clip(False),
         "open_clip.loss.DistillClipLoss under torch.autocast (student and teacher logits materialised)"),
    Impl("reference fp32 (eager)", BENCHABLE, _make_reference(False),
         "fastcontrast's readable reference: features upcast to float32, TF32 off (torch's default), the N×N "
         "logits materialised; eager PyTorch"),
    Impl("reference fp32 (compiled)", BENCHABLE, _make_reference(True), "the float32 reference " + _COMPILED,
         compiled=True),
    Impl("Inf-CL (flash, 2 calls)", ("clip_loss",), _make_inf_cl,
         "Inf-CL 1.2.1's cal_flash_loss, once per direction (it is one-directional); it upcasts to float32 and "
         "multiplies in TF32", cuda_only=True),
    Impl("siglip-kernel", ("siglip_loss",), _make_siglip_kernel,
         "siglip-kernel 0.1.2 fused_siglip_loss (auto routing: chunked cuBLAS GEMM + fused BCE for bf16/fp16); it "
         "computes the gradients inside its forward and its backward only scales them, so its fwd column is "
         "empty and the note gives its forward call's time", cuda_only=True, grads_in_forward=True),
)
IMPL_BY_NAME = {i.name: i for i in IMPLS}


def describe(name: str) -> str:
    """The legend line of implementation ``name``."""
    if name in LEGEND:
        return LEGEND[name]
    if name in IMPL_BY_NAME:
        return IMPL_BY_NAME[name].legend
    if name.startswith("fastcontrast[triton:"):
        return f"the Triton kernels with launch-table variant(s) {name[20:-1]!r} ({_configs().__name__})"
    return ""


def candidates(op: str, dev: torch.device, with_compile: bool = True, variants: Optional[List[str]] = None,
               explain_missing: bool = False, dtype: torch.dtype = torch.float32) -> Dict[str, Callable]:
    """name -> loss(**inputs) for every implementation of ``op`` available on ``dev``, baselines included.

    ``variants``: the Triton backend once per launch-table variant ("fastcontrast[triton:<variant>]"; the A/B
    itself is :func:`ab_run`). ``explain_missing``: a baseline that cannot run here (not installed, needs CUDA)
    stays as a row whose note says why."""
    out: Dict[str, Callable] = {}
    from ..dispatch import available_backends, unavailable_reason

    if variants:
        why = unavailable_reason(dispatch_op(op), "triton", dev)
        for v in variants:
            out[f"fastcontrast[triton:{v}]"] = (loss_fn(op, "triton") if why is None
                                               else _unavailable(f"triton: {why}"))
        return out
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for fused in available_backends(dispatch_op(op), dev):  # every fast backend that runs here, auto's first
        # Triton on the CPU only under the interpreter (the GPU session's dry run)
        if fused != "reference" and not (fused == "triton" and dev.type == "cpu" and not interp):
            out[f"fastcontrast[{fused}]"] = loss_fn(op, fused)
    if op == "clip_loss" and dev.type == "cpu" and not interp:
        out["fastcontrast[torch-tiles]"] = _torch_tiles()
    for impl in IMPLS:
        if op not in impl.ops or (impl.compiled and not with_compile):
            continue
        if impl.cuda_only and dev.type != "cuda":
            try:
                impl.make(op, dev, dtype)
                why = "needs CUDA"
            except Unavailable as e:
                why = str(e)
            if explain_missing:
                out[impl.name] = _unavailable(why)
            continue
        try:
            out[impl.name] = impl.make(op, dev, dtype)
        except Unavailable as e:
            if explain_missing:
                out[impl.name] = _unavailable(str(e))
    return out


def _torch_tiles():
    """The blockwise PyTorch tiles behind the custom op: what runs on CPU without the C++ extension."""
    from ..dispatch import kernel_impl

    infonce = kernel_impl("infonce", "tiles")

    def tiles(image_features, text_features, logit_scale):
        n = image_features.shape[0]
        s = logit_scale.expand(n)
        return infonce(image_features, text_features, s, s, None, None, False, 1)

    return tiles
