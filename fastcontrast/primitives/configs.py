"""Launch configurations of every Triton kernel: one table, per GPU architecture and dtype class.

The launchers ask :func:`config` (kernel name, device, dtype); ``python -m fastcontrast aot`` compiles every entry
of the table for its architecture without a GPU and reports registers, spills and shared memory
(benchmarks/results/triton_aot.md), so each entry is checked to fit its arch: shared memory per block at most
166,912 B on sm_80 (A100) and 232,448 B on sm_90 (H100), and at most 512 B of stack.

Architectures: "sm80" (Ampere: A100, also the fallback for anything older), "sm90" (Hopper) and "sm100"
(Blackwell: the Hopper tiles until a Blackwell GPU has tuned its own; compiled and checked like the others). Dtype classes: "16" (fp16/bf16: tensor cores, 2-byte tiles) and "32"
(fp32/tf32: 4-byte tiles, so half the K-depth per stage to keep the same pipeline within shared memory).
Under the Triton interpreter (tests on the CPU) every kernel gets small tiles, so the tests cover ragged tails
and several K-chunks.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

ARCHS = ("sm80", "sm90", "sm100")
CC = {"sm80": 80, "sm90": 90, "sm100": 100}
SMEM_LIMIT = {"sm80": 166_912, "sm90": 232_448, "sm100": 232_448}
DTYPE_CLASSES = ("16", "32")

INTERPRETER = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
INTERPRETER_RC = dict(BLOCK_R=32, BLOCK_C=32, num_warps=4, num_stages=1)
INTERPRET_REAL_TILES = False  # tests/test_triton_variants.py: run a variant's own sm_90 tiles on the interpreter

# 16-bit: the H100 tile sweep (RESULTS.md, benchmarks/tune_infonce.py): 128×64×64, 8 warps, 4 stages for the InfoNCE
# kernels, 128×128×64 for the rest; 3-4 K-chunks stay in shared memory on both archs (triton_aot.md).
# 32-bit: BLOCK_K = 32 and 3 stages: the 16-bit tiles in fp32 asked for 196,608 B (over an A100's 166,912) and
# spilled 1-6 KB at 255 registers; 128×64×32 spills at most 16 B on either arch, as ieee or tf32 dots.
_PAIR16 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4)
_WIDE16 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=4)
_PAIR32 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)

# Structural switches, beside the tiles (each documented at its kernel):
#   FLAT (_lse_fwd_kernel, _hinge_fwd_kernel): one (column tile × K-chunk) loop, so the K pipeline stays warm
#     across column tiles;
#   COL_SPLIT (launcher only, _lse_fwd_kernel): split the columns over a second grid axis when the row blocks
#     alone fill less than one wave of SMs (N = 4096: 32 row blocks on 132 SMs); CTAS = CTAs per SM expected;
#   GROUP (_grad_tile_kernel): column tiles swept together by the programs in flight (L2 reuse);
#   maxnreg (a Triton launch option): the register cap that lets two CTAs share an SM.
_PLAIN = dict(FLAT=False, COL_SPLIT=False, GROUP=1)
_HOPPER = dict(FLAT=True, COL_SPLIT=True, GROUP=8)
LAUNCHER_KEYS = ("COL_SPLIT", "CTAS")  # read by the launcher, never passed to a kernel
_STRUCT = {"_lse_fwd_kernel": ("FLAT", "COL_SPLIT", "CTAS"), "_grad_tile_kernel": ("GROUP",),
           "_hinge_fwd_kernel": ("FLAT",), "_lse_masked_fwd_kernel": ("COL_SPLIT", "CTAS"),
           "_masked_grad_tile_kernel": ("GROUP",), "_matryoshka_grad_kernel": ("GROUP",)}


def _pairwise(c16: dict, c32: dict = _PAIR32, **per_arch16) -> Dict[Tuple[str, str], dict]:
    """One config per dtype class on every arch; ``per_arch16`` replaces the 16-bit one on some archs."""
    return {**{(a, "16"): dict(per_arch16.get(a, c16)) for a in ARCHS}, **{(a, "32"): dict(c32) for a in ARCHS}}


def _with(table: Dict[str, Dict[Tuple[str, str], dict]], flags: dict) -> Dict[str, Dict[Tuple[str, str], dict]]:
    """``table`` with each kernel's structural switches (``_STRUCT``) taken from ``flags``."""
    out = {}
    for kernel, by in table.items():
        keys = _STRUCT.get(kernel, ())
        out[kernel] = {k: {**cfg, **{f: flags[f] for f in keys if f in flags}} for k, cfg in by.items()}
    return out


_ROWCOL = {(a, c): dict(BLOCK_R=64, BLOCK_C=128, num_warps=4, num_stages=3) for a in ARCHS for c in DTYPE_CLASSES}

# "baseline": the launch table every GPU figure up to issue 17 was measured with (H100, 2026-11-23).
_BASELINE = _with({
    "_lse_fwd_kernel": _pairwise(_PAIR16),
    "_grad_tile_kernel": _pairwise(_PAIR16),
    "_hinge_fwd_kernel": _pairwise(_WIDE16),
    "_hinge_grad_tile_kernel": _pairwise(_WIDE16),
    "_hinge_pair_fwd_kernel": _pairwise(_PAIR16),
    "_hinge_pair_grad_tile_kernel": _pairwise(_PAIR16),
    # the masked log-sum-exp (primitives/lse_masked_triton.py): the InfoNCE tiles; a guide's K loop gets half the
    # K-chunk when its elements are wider than the features' (the launcher's _guide_k)
    "_lse_masked_fwd_kernel": _pairwise(_PAIR16),
    "_masked_grad_tile_kernel": _pairwise(_PAIR16),
    "_softplus_rows_kernel": _pairwise(_WIDE16),
    "_sigmoid_grad_tile_kernel": _pairwise(_WIDE16),
    # Matryoshka (primitives/matryoshka_triton.py): the forward on the InfoNCE tiles (the prefixes' row statistics
    # add 2·P floats per row). The backward's checkpoint epilogues (P, Q, G, partial sums) run between K loops with
    # the accumulator live: 64×64 on 8 warps, as 128×64 spills 352 B (aligned) to 1,376 B (odd dims) of stack on
    # sm_90 (aot, Triton 3.9), 64×64 at most 360 B (16-bit) / 40 B (32-bit, BLOCK_K 32)
    "_matryoshka_fwd_kernel": _pairwise(_PAIR16),
    "_matryoshka_grad_kernel": _pairwise(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=4),
                                         dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=3)),
    "_lse_axis_kernel": _ROWCOL,
    "_sinkhorn_out_kernel": _ROWCOL,
}, _PLAIN)


def _hopper(wide16: dict, flags: dict, one_cta: Tuple[str, ...] = ()) -> Dict[str, Dict[Tuple[str, str], dict]]:
    """The baseline with every S-tile kernel's 16-bit tile widened to ``wide16`` on sm_90/sm_100 (HGMMA n >= 128;
    sm_80 keeps its tiles) and the structural switches ``flags`` on every arch; the kernels of ``one_cta`` take the
    one-CTA wide tile (_WIDE16, CTAS = 1) there whatever ``wide16`` is."""
    hop = {"sm90": wide16, "sm100": wide16}
    # sm_100's _grad_tile_kernel keeps 128×64: at 128×128 its epilogue (P, Q, G from the TMEM accumulator)
    # spills 640 B at 255 registers (aot, Triton 3.9); sm_100 has no HGMMA-width requirement
    narrow100 = ("_grad_tile_kernel", "_masked_grad_tile_kernel")
    s_tile = ("_lse_fwd_kernel", "_grad_tile_kernel", "_hinge_fwd_kernel", "_hinge_grad_tile_kernel",
              "_hinge_pair_fwd_kernel", "_hinge_pair_grad_tile_kernel", "_softplus_rows_kernel",
              "_sigmoid_grad_tile_kernel", "_lse_masked_fwd_kernel", "_masked_grad_tile_kernel")
    t = {k: ({key: dict(_WIDE16 if k in one_cta and key[0] in hop else hop.get(key[0], cfg))
              if key[1] == "16" and not (k in narrow100 and key[0] == "sm100") else dict(cfg)
              for key, cfg in by.items()}
             if k in s_tile else by) for k, by in _BASELINE.items()}
    out = _with(t, flags)
    for k in one_cta:  # one CTA per SM: the launcher's column split aims at one wave of them
        for key, cfg in out[k].items():
            if key[0] in hop and "CTAS" in cfg:
                cfg["CTAS"] = 1
    return out


# Variants of the one launch table: each a complete table, selectable at run time (:func:`set_variant`,
# FASTCONTRAST_TRITON_VARIANT) so that one GPU session A/Bs them (benchmarks/gpu_session.sh, step "ab"). On sm_90
# (registers and CTAs/SM: benchmarks/results/triton_aot.md):
#   hopper_tiles: 128×128×64 S tiles, 8 warps, 4 stages (HGMMA 64x128x16), the baseline's loops and grids:
#                 the tile alone;
#   hopper:       those tiles with the warm K pipeline, the split forward grid and the grouped backward order;
#   hopper_2cta:  64×128×64 on one warpgroup, 4 stages (96 KB): two CTAs per SM by registers (≤ 255 × 128
#                 threads) and shared memory, so one's exp2 epilogue runs beside the other's MMAs. Two CTAs of
#                 128×128 do not fit: a register cap of 128 (maxnreg) spills 360-860 B, and 4 warps holding a
#                 128×128 fp32 accumulator spill 200-1,464 B (aot, Triton 3.9). The masked forward keeps the
#                 one-CTA 128×128 tile here: its epilogue (S, the guide's tile, the masks) on 4 warps at 64×128
#                 spills 856-888 B (aot, Triton 3.9, sm_90/sm_100); 128×128 on 8 warps: 0-440 B.
VARIANTS: Dict[str, Dict[str, Dict[Tuple[str, str], dict]]] = {
    "baseline": _BASELINE,
    "hopper_tiles": _hopper(_WIDE16, dict(_PLAIN, CTAS=1)),
    "hopper": _hopper(_WIDE16, dict(_HOPPER, CTAS=1)),
    "hopper_2cta": _hopper(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
                           dict(_HOPPER, CTAS=2), one_cta=("_lse_masked_fwd_kernel",)),
}
# The variant each arch runs unless told otherwise. sm_80 keeps the measured baseline until an A100 A/B says
# otherwise; sm_90/sm_100 run the wide tiles (the default until the H200 A/B of issue 17 sets it).
DEFAULT_VARIANT = {"sm80": "baseline", "sm90": "hopper", "sm100": "hopper"}
ENV_VARIANT = "FASTCONTRAST_TRITON_VARIANT"
_SELECTED: Optional[str] = None

OVERRIDE: Dict[str, dict] = {}  # kernel -> config: benchmarks/tune_infonce.py sweeps through this


def set_variant(name: Optional[str]) -> None:
    """Use launch-table variant ``name`` (a key of :data:`VARIANTS`) on every arch; None: each arch's default
    (:data:`DEFAULT_VARIANT`), unless FASTCONTRAST_TRITON_VARIANT names one."""
    if name is not None and name not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)} or None, got {name!r}")
    global _SELECTED
    _SELECTED = name


def variant(arch: str) -> str:
    """The variant that launches on ``arch``: :func:`set_variant`'s, else FASTCONTRAST_TRITON_VARIANT, else the
    arch's default."""
    name = _SELECTED or os.environ.get(ENV_VARIANT) or DEFAULT_VARIANT[arch]
    if name not in VARIANTS:
        raise ValueError(f"{ENV_VARIANT} must be one of {sorted(VARIANTS)}, got {name!r}")
    return name


def arch_of(device: torch.device) -> str:
    major, _ = torch.cuda.get_device_capability(device)
    return "sm100" if major >= 10 else "sm90" if major >= 9 else "sm80"


def dtype_class(dtype: torch.dtype) -> str:
    return "16" if dtype in (torch.float16, torch.bfloat16) else "32"


# Launches whose feature rows are not 16-aligned (an odd d, a per-token width such as 40/3): without tt.divisibility
# Triton cannot vectorise their loads and the wide tiles spill (static report, sm_90: the 128×128 S tiles of
# _lse_fwd_kernel / _grad_tile_kernel 648-800 B of stack, 64×128 up to 1,040 B; _sigmoid_grad_tile_kernel 656 /
# 928 B; _lse_axis_kernel fp32 64×128 on 4 warps 544-624 B). These tiles stay within 512 B on every arch (probed
# with aot's builds: <= 304 B, 0 B, 0 B). The variant's structural switches (FLAT, COL_SPLIT, GROUP) are kept.
UNALIGNED: Dict[str, Dict[str, dict]] = {  # kernel -> dtype class -> tile
    "_lse_fwd_kernel": {"16": _PAIR16},
    "_grad_tile_kernel": {"16": _PAIR16},
    "_sigmoid_grad_tile_kernel": {"16": _PAIR16},
    "_lse_masked_fwd_kernel": {"16": _PAIR16},
    "_masked_grad_tile_kernel": {"16": _PAIR16},
    "_lse_axis_kernel": {"16": dict(BLOCK_R=32, BLOCK_C=128, num_warps=4, num_stages=3),
                         "32": dict(BLOCK_R=32, BLOCK_C=128, num_warps=4, num_stages=3)},
}
# the integer arguments whose alignment decides it (the row width and the row strides)
ALIGN_ARGS = {"_lse_fwd_kernel": ("D", "DT", "stride_am", "stride_bm"),
              "_grad_tile_kernel": ("D", "DT", "stride_am", "stride_bm"),
              "_sigmoid_grad_tile_kernel": ("D", "stride_am", "stride_bm"), "_lse_axis_kernel": ("C", "stride_r"),
              # the guide's width and strides count where a guide is launched (the launcher passes them then)
              "_lse_masked_fwd_kernel": ("D", "DG", "stride_am", "stride_bm", "stride_ga", "stride_gb"),
              "_masked_grad_tile_kernel": ("D", "DG", "stride_am", "stride_bm", "stride_ga", "stride_gb")}


def is_aligned(kernel: str, **ints: int) -> bool:
    """Whether a launch of ``kernel`` with these integer arguments gets the table's tile (every argument of
    :data:`ALIGN_ARGS` divisible by 16, as Triton specialises them) or its :data:`UNALIGNED` one."""
    return all(ints[n] % 16 == 0 for n in ALIGN_ARGS.get(kernel, ()) if n in ints)


def table_config(name: str, kernel: str, arch: str, dclass: str, aligned: bool = True) -> dict:
    """Variant ``name``'s configuration of ``kernel`` on ``arch`` for a dtype class, for an aligned launch or not
    (what the launcher picks; the static report builds the same)."""
    cfg = dict(VARIANTS[name][kernel][(arch, dclass)])
    narrow = UNALIGNED.get(kernel, {}).get(dclass)
    if not aligned and narrow is not None:
        cfg = dict(narrow, **{k: v for k, v in cfg.items() if k not in narrow and not k.startswith("BLOCK")
                              and k not in _TRITON_OPTIONS})
    return cfg


def config(kernel: str, device: torch.device, dtype: torch.dtype, aligned: bool = True) -> dict:
    """The launch configuration (tile constexprs plus num_warps/num_stages) of ``kernel`` on ``device``;
    ``aligned``: :func:`is_aligned` of the launch (an unaligned one gets the narrower :data:`UNALIGNED` tile)."""
    if kernel in OVERRIDE:
        return dict(OVERRIDE[kernel])
    if device.type != "cuda":
        # the interpreter: small tiles, and the variant's structural switches (so the tests run each variant's
        # code path: flattened loop, split grid, grouped order); INTERPRET_REAL_TILES: its sm_90 tiles as well
        table = VARIANTS[variant("sm90")]
        by = table[kernel]
        if INTERPRET_REAL_TILES:
            return {k: v for k, v in by[("sm90", dtype_class(dtype))].items() if k != "maxnreg"}
        small = INTERPRETER_RC if "BLOCK_R" in next(iter(by.values())) else INTERPRETER
        return dict(small, **{k: v for k, v in by[("sm90", dtype_class(dtype))].items()
                              if k not in small and not k.startswith("BLOCK") and k not in _TRITON_OPTIONS})
    arch = arch_of(device)
    return table_config(variant(arch), kernel, arch, dtype_class(dtype), aligned)


_TRITON_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def launch(kernel: str, device: torch.device, dtype: torch.dtype, aligned: bool = True) -> Tuple[dict, int, int]:
    """(kernel keyword arguments: tile constexprs and launch options such as maxnreg, num_warps, num_stages);
    launcher-only keys (``LAUNCHER_KEYS``) are dropped."""
    cfg = config(kernel, device, dtype, aligned)
    for k in LAUNCHER_KEYS:
        cfg.pop(k, None)
    return cfg, cfg.pop("num_warps"), cfg.pop("num_stages")
