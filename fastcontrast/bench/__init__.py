"""Speed and memory of every loss against what its users would run instead, measured in one run.

``python -m fastcontrast bench [--ops clip,siglip] [--sizes 1024,4096] [--dim 512] [--dtype bfloat16] [--out DIR]``
prints a markdown table per op (min / median / max of forward and forward+backward time, peak extra memory,
ratios to the op's baselines measured in the same run, and the floor: max(FLOPs / measured matmul rate,
bytes / measured copy rate)), a legend saying what each implementation is and how it is timed, and writes
``bench.csv``, ``bench.md`` and ``bench.png`` (time and memory against batch size, log-log) to ``--out``
(default ``benchmarks/out``), saying where. Rows whose spread is large (max > 1.5 × min) or whose forward
exceeds forward+backward (a busy machine) are flagged: rerun them before quoting them.

Baselines (:data:`IMPLS`, one table), each on the same inputs in the same run, in the dtype its users run it:
open_clip's ``ClipLoss``/``SigLipLoss`` on the bench dtype's features under ``torch.autocast`` (as open_clip's
trainer runs them), the same loss under ``torch.compile``, fastcontrast's float32 reference (features upcast,
TF32 off), Inf-CL's ``cal_flash_loss`` and siglip-kernel's ``fused_siglip_loss`` when installed. A row that
runs out of memory says OOM (and the larger sizes of that implementation are not tried); a baseline that cannot
run here is a row saying why.

Timing: "fwd" is the training forward (autograd recording, as in a training step; the output is dropped),
"fwd+bwd" the forward and ``.backward()``; CUDA events around each call, after a warm-up that compiles.
siglip-kernel computes its gradients inside its forward, so its fwd column is left empty and its note gives
its forward call's time (which is its fwd+bwd).
"""
# the bench's public names, wherever they live in the package (benchmarks/ scripts import them from here)
from .ab import ab_run, ab_table, ab_verdict, launched_kernels, variant_groups  # noqa: F401
from .cli import main  # noqa: F401
from .impls import (IMPL_BY_NAME, IMPLS, LEGEND, OPS, Impl, Unavailable, bytes_floor, dispatch_op,  # noqa: F401
                    candidates, describe, flops, loss_fn, make_inputs)
from .sweep import legend, plot, run, to_markdown  # noqa: F401
from .timing import (_device_name, copy_gbps, matmul_tflops, measure, median_ms, peak_extra_bytes,  # noqa: F401
                     time_ms)
