"""What the bench runs: each op's inputs and FLOP/byte floors, fastcontrast's backends, and the baselines users
would run instead (IMPLS: one table)."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .. import functional as Fn



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


OPS = ("clip", "siglip", "oblique", "mmts", "mmts_margin", "codebook", "momentum", "clip_multipos", "distill")
_DISPATCH_OP = {"clip": "infonce", "siglip": "siglip", "oblique": "infonce", "mmts": "infonce",
                "mmts_margin": "max_margin", "codebook": "swapped_prediction", "momentum": "momentum_contrastive",
                "clip_multipos": "infonce", "distill": "distill"}

# What each fastcontrast implementation name in the tables means (the baselines: IMPLS below).
LEGEND = {
    "fastcontrast[triton]": "fused Triton kernels (tiled, never N×N; the default on CUDA)",
    "fastcontrast[cuda]": "fused CUDA kernels of csrc/ (backend='cuda')",
    "fastcontrast[cpu]": "fused C++ CPU kernels of csrc/ (BLAS row blocks; the default on CPU when built)",
    "fastcontrast[dense]": "the materialised path (backend='dense': one GEMM, N×N statistics; auto's pick when small)",
    "fastcontrast[torch-tiles]": "the same tiling in plain PyTorch blocks: what runs without the C++ extension",
}

def _codes(n: int) -> int:
    return max(16, min(4096, n // 4))


def make_inputs(op: str, n: int, d: int, dev: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Fresh random leaves (requires_grad where the loss is differentiable) for one op at batch n."""
    g = torch.Generator().manual_seed(n)

    def feat(*shape):
        return torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1).to(dev, dtype).requires_grad_()

    def scalar(v):
        return torch.tensor(v, device=dev, requires_grad=True)

    def mmts_tau():  # MM-TS: τ_i(t) from dataset-wide cluster sizes (one τ per pair)
        sizes = torch.randint(1, 1000, (n,), generator=g)
        return Fn.mmts_temperature(sizes, 100, 10_000, 1, 999).to(dev)

    if op == "clip":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(14.3)}
    if op == "siglip":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(10.0),
                "logit_bias": scalar(-10.0)}
    if op == "oblique":
        return {"image_tokens": feat(n, 16, d // 16), "text_tokens": feat(n, 16, d // 16)}  # Sun: K = 16, scale 1
    if op == "mmts":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "tau_image": mmts_tau()}
    if op == "mmts_margin":
        return {"image_features": feat(n, d), "text_features": feat(n, d), "margin": mmts_tau()}
    if op == "codebook":
        out = {k: feat(n, d) for k in ("image_features", "text_features")}
        out.update({k: feat(n, d).detach() for k in ("teacher_image_features", "teacher_text_features")})
        out["codebook"] = feat(_codes(n), d)
        return out
    if op == "clip_multipos":  # group ids: about 5 captions per image id (COCO-like), shared by both sides
        ids = torch.randint(0, max(1, n // 5), (n,), generator=g).to(dev)
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(14.3),
                "image_ids": ids, "text_ids": ids}
    if op == "distill":  # open_clip's --distill: student features and scale, a teacher's features and scale
        return {"image_features": feat(n, d), "text_features": feat(n, d), "logit_scale": scalar(14.3),
                "teacher_image_features": feat(n, d).detach(), "teacher_text_features": feat(n, d).detach(),
                "teacher_logit_scale": torch.tensor(100.0, device=dev)}
    if op == "momentum":  # ALBEF/CODIS instance term: N queries against N teacher keys + a queue of 4N
        return {"query": feat(n, d), "keys": feat(n, d).detach(), "teacher_query": feat(n, d).detach(),
                "queue": feat(4 * n, d).detach(), "logit_scale": scalar(1 / 0.07)}
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def loss_fn(op: str, backend: str) -> Callable[..., torch.Tensor]:
    return {
        "clip": lambda **kw: Fn.clip_loss(**kw, backend=backend),
        "siglip": lambda **kw: Fn.siglip_loss(**kw, backend=backend),
        "oblique": lambda **kw: Fn.oblique_clip_loss(**kw, backend=backend),
        "mmts": lambda **kw: Fn.adaptive_temperature_clip_loss(**kw, backend=backend),
        "mmts_margin": lambda **kw: Fn.max_margin_loss(**kw, backend=backend),
        "codebook": lambda **kw: Fn.codebook_loss(**kw, tau=0.1, epsilon=0.05, n_iters=3, backend=backend),
        "momentum": lambda **kw: Fn.momentum_contrastive_loss(**kw, alpha=0.4, backend=backend),
        "clip_multipos": lambda **kw: Fn.clip_loss(**kw, backend=backend),
        "distill": lambda **kw: sum(Fn.distill_clip_loss(**kw, backend=backend)),  # contrastive + distill
    }[op]


def flops(op: str, n: int, d: int) -> float:
    """Floor of forward+backward in FLOPs: the pairwise similarity once, then one GEMM each for the gradients
    that exist (3 units of 2·N·M·d; the symmetric losses need both feature gradients)."""
    if op == "codebook":  # two sides × (scores + 2 grad GEMMs) + two teacher score matrices
        return 2 * 6 * n * _codes(n) * d + 2 * 2 * n * _codes(n) * d
    if op == "momentum":  # student scores + the query gradient, plus the teacher's soft-target pass (2 GEMMs)
        m = 5 * n
        return 2 * n * m * d * 2 + 2 * n * m * d * 2
    if op == "distill":  # the student's S and its two gradient GEMMs, plus the teacher's S once
        return 8 * n * n * d
    return 6 * n * n * d


def bytes_floor(op: str, n: int, d: int, elt: int) -> float:
    """Each input read once, each gradient written once."""
    if op == "codebook":
        k = _codes(n)
        return (4 * n * d + k * d + 2 * n * d + k * d) * elt
    if op == "momentum":
        return (3 * n * d + 4 * n * d + n * d) * elt
    if op == "distill":
        return 6 * n * d * elt
    return 4 * n * d * elt


def _amp(dev: torch.device, dtype: torch.dtype):
    """The autocast a trainer runs its loss under when its features are ``dtype`` (none for float32)."""
    return torch.autocast(dev.type, dtype=dtype, enabled=dtype in (torch.bfloat16, torch.float16))


# open_clip's loss classes and the bench inputs their forward takes, in order
_OPEN_CLIP = {
    "clip": ("ClipLoss", ("image_features", "text_features", "logit_scale")),
    "siglip": ("SigLipLoss", ("image_features", "text_features", "logit_scale", "logit_bias")),
    "distill": ("DistillClipLoss", ("image_features", "text_features", "logit_scale", "teacher_image_features",
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
    Impl("open_clip ClipLoss", ("clip",), _make_open_clip(False),
         "open_clip.loss.ClipLoss on the bench dtype's features under torch.autocast(that dtype), as open_clip's "
         "trainer runs it (--precision amp_bf16); materialises the N×N logits"),
    Impl("open_clip ClipLoss (compiled)", ("clip",), _make_open_clip(True), "the same " + _COMPILED, compiled=True),
    Impl("open_clip SigLipLoss", ("siglip",), _make_open_clip(False),
         "open_clip.loss.SigLipLoss on the bench dtype's features under torch.autocast(that dtype), as open_clip's "
         "trainer runs it; materialises the N×N logits"),
    Impl("open_clip SigLipLoss (compiled)", ("siglip",), _make_open_clip(True), "the same " + _COMPILED,
         compiled=True),
    Impl("open_clip DistillClipLoss", ("distill",), _make_open_clip(False),
         "open_clip.loss.DistillClipLoss under torch.autocast (student and teacher logits materialised)"),
    Impl("reference fp32 (eager)", OPS, _make_reference(False),
         "fastcontrast's readable reference: features upcast to float32, TF32 off (torch's default), the N×N "
         "logits materialised; eager PyTorch"),
    Impl("reference fp32 (compiled)", OPS, _make_reference(True), "the float32 reference " + _COMPILED,
         compiled=True),
    Impl("Inf-CL (flash, 2 calls)", ("clip",), _make_inf_cl,
         "Inf-CL 1.2.1's cal_flash_loss, once per direction (it is one-directional); it upcasts to float32 and "
         "multiplies in TF32", cuda_only=True),
    Impl("siglip-kernel", ("siglip",), _make_siglip_kernel,
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
        why = unavailable_reason(_DISPATCH_OP[op], "triton", dev)
        for v in variants:
            out[f"fastcontrast[triton:{v}]"] = (loss_fn(op, "triton") if why is None
                                               else _unavailable(f"triton: {why}"))
        return out
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    for fused in available_backends(_DISPATCH_OP[op], dev):  # every fast backend that runs here, auto's first
        # Triton on the CPU only under the interpreter (the GPU session's dry run)
        if fused != "reference" and not (fused == "triton" and dev.type == "cpu" and not interp):
            out[f"fastcontrast[{fused}]"] = loss_fn(op, fused)
    if op == "clip" and dev.type == "cpu" and not interp:
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
    from ..losses.clip_loss import infonce_fused

    def tiles(image_features, text_features, logit_scale):
        n = image_features.shape[0]
        s = logit_scale.expand(n)
        return infonce_fused(image_features, text_features, s, s, None,
                             torch.arange(n, device=image_features.device), False, 1, "torch")

    return tiles
