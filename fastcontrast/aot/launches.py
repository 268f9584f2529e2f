"""Capturing the package's kernel launches: each launch as a GPU launch specialises it, from the workloads run on
the Triton interpreter (or from a pytest run, benchmarks/launch_capture.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Dict, List, Optional


# ------------------------------------------------------------------------------------------- capturing launches
_TNAME = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.int32": "i32",
          "torch.int64": "i64", "torch.float64": "fp64", "torch.bool": "i1", "torch.uint8": "u8"}
_PARAMS: Dict[object, list] = {}


def launch_record(fn, args, kwargs) -> dict:
    """One kernel launch as a GPU launch specialises it: argument types, constexprs, and Triton's specialisation
    of the other arguments (an integer equal to 1 becomes the constant 1; an integer divisible by 16 and a
    pointer aligned to 16 bytes get ``tt.divisibility = 16``; ``align`` lists those, the rest are the launch's
    unaligned arguments). ``fn`` is the Python function of the kernel."""
    import inspect

    import torch

    params = _PARAMS.get(fn)
    if params is None:
        params = _PARAMS[fn] = [(p.name, "constexpr" in str(p.annotation), p.default)
                                for p in inspect.signature(fn).parameters.values()]
    bound = dict(zip([p[0] for p in params], args))
    bound.update(kwargs)
    sig, const, align, feats = {}, {}, [], []
    for name, is_const, default in params:
        v = bound.get(name, default)
        if is_const or v is None or isinstance(v, str):
            sig[name] = "constexpr"
            const[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TNAME.get(str(v.dtype), str(v.dtype))
            if v.data_ptr() % 16 == 0:
                align.append(name)
            if v.dim() == 2:
                feats.append(v)
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):
            if v == 1:  # Triton makes an integer argument equal to 1 a constant
                sig[name], const[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
                if v % 16 == 0:
                    align.append(name)
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name] = "constexpr"
            const[name] = v
    dtype = _TNAME.get(str(feats[0].dtype), "fp32") if feats else "fp32"
    return dict(module=fn.__module__, kernel=fn.__name__, dtype=dtype, signature=sig, constexprs=const,
                align=sorted(align))


def record_key(rec: dict) -> str:
    return json.dumps([rec["module"], rec["kernel"], rec["dtype"], rec["signature"], rec["constexprs"],
                       rec.get("align"), rec.get("variant")], sort_keys=True)


def install_launch_hook(sink):
    """Call ``sink(launch_record(...))`` at every Triton kernel launch of this process, on the interpreter
    (TRITON_INTERPRET=1) or a GPU, then launch as usual; each record also names the launch-table variant in
    effect (``variant``: what a GPU of the device's arch, sm_90, would launch). Returns the function that
    removes the hook again."""
    import triton.runtime.interpreter as interp
    import triton.runtime.jit as jit

    from ..primitives import configs

    undo = []
    for cls in (interp.InterpretedFunction, jit.JITFunction):
        orig = cls.run

        def run(self, *args, grid, warmup, _orig=orig, **kwargs):
            if not warmup:
                rec = launch_record(self.fn, args, kwargs)
                rec["variant"] = configs.variant("sm90")
                sink(rec)
            return _orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        cls.run = run
        undo.append((cls, orig))

    def remove():
        for cls, orig in undo:
            cls.run = orig

    return remove


# What the package's users, the CLI and each step of benchmarks/gpu_session.sh launch, replayed on the
# interpreter; every record is tagged "<workload>/<detail>" with what made it (see SESSION_STEPS).
WORKLOADS = {
    "report": "the table's launches: every validation case at 64x96x128 with 8 tokens, all sizes, strides and "
              "pointers 16-divisible as at N = 4096.., d = 768: forward and backward (as validate runs them) and "
              "the no-grad forward, fp32 with ieee and with tf32 dots, bf16, fp16; built for every arch and variant",
    "validate": "python -m fastcontrast validate at its default size 37x53x40 with 3 tokens (the session's "
                "validate and resources steps): every case forward and backward, fp32, bf16, fp16 - odd sizes, "
                "strides and per-token widths; and the same forwards under torch.no_grad() (evaluation)",
    "bench": "python -m fastcontrast bench and the session's bench and A/B steps: every op of the bench at N = 64, "
             "d = 256 (16-divisible as N = 4096.., d = 768; d / 16 per oblique token too): the training forward "
             "and backward, and the no-grad forward, fp32, bf16, fp16",
    "tests": "the Triton tests the session's tests step runs (" + ", ".join(
        ("test_infonce_kernels", "test_siglip", "test_margin_kernels", "test_triton_variants",
         "test_deterministic")) + "), on the interpreter under pytest",
}
SESSION_TESTS = ("tests/test_infonce_kernels.py", "tests/test_siglip.py", "tests/test_margin_kernels.py",
                 "tests/test_triton_variants.py", "tests/test_deterministic.py")
_DT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _set_tag(tag):
    _STATE["tag"] = tag


_STATE: Dict[str, object] = {"tag": None}


def _wl_cases(n, m, d, k, dtypes, tag):
    """Every validation case forward and backward exactly as ``validate`` runs it (its ``compare``), then its
    forward under torch.no_grad()."""
    import torch

    from ..validate import compare, default_cases

    for name, tf32 in dtypes:
        dt = getattr(torch, _DT[name])
        torch.backends.cuda.matmul.allow_tf32 = tf32
        suffix = "/tf32" if tf32 else ""
        for case in default_cases(n=n, m=m, d=d, k=k):
            try:
                _set_tag(f"{tag}/{name}{suffix}")
                compare(case, "triton", dt, torch.device("cpu"), 0)
                _set_tag(f"{tag}-nograd/{name}{suffix}")
                with torch.no_grad():
                    case.run("triton", **case.make(torch.Generator().manual_seed(0), torch.device("cpu"), dt))
            except Exception as e:  # noqa: BLE001
                if "no 'triton'" not in str(e):
                    raise
        torch.backends.cuda.matmul.allow_tf32 = False


def _wl_bench(dtypes):
    """Every op the bench can time (the op list's entries with bench inputs: the default ones and the GPU
    session's "embed" step's) as the bench runs it (``make_inputs``, backend triton), forward and backward, then
    the no-grad forward."""
    import torch

    from .. import bench, oplist

    dev = torch.device("cpu")
    for name in dtypes:
        dt = getattr(torch, _DT[name])
        for op in oplist.benchable_ops():
            fn = bench.loss_fn(op, "triton")
            for grad in (True, False):
                inputs = bench.make_inputs(op, 64, 256, dev, dt)
                _set_tag(f"bench/{op}/{name}/{'grad' if grad else 'nograd'}")
                try:
                    with torch.set_grad_enabled(grad):
                        out = fn(**inputs)
                        if grad:
                            out.backward()
                except Exception as e:  # noqa: BLE001
                    if "no 'triton'" not in str(e):
                        raise


class _TestsTagger:
    """pytest plugin of the tests workload: tags each launch with the test file that made it."""

    def pytest_runtest_setup(self, item):
        _set_tag("tests/" + os.path.basename(str(getattr(item, "path", None) or item.fspath)))


def _wl_tests(root: str) -> None:
    import pytest

    os.environ.setdefault("TRITON_INTERPRET", "1")
    rc = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--rootdir", root] +
                     [os.path.join(root, t) for t in SESSION_TESTS], plugins=[_TestsTagger()])
    if rc != 0:
        raise RuntimeError(f"the tests workload failed (pytest exit {rc})")


def _capture_main(names, root=None) -> None:
    """Runs in a subprocess under TRITON_INTERPRET=1: the workloads ``names``, every launch of a fastcontrast
    kernel recorded with the tags of the workloads that made it; prints the records as JSON (last line)."""
    seen: Dict[str, dict] = {}

    def sink(rec):
        if not rec["module"].startswith("fastcontrast"):
            return  # a test's own kernel
        r = seen.setdefault(record_key(rec), rec)
        r.setdefault("workloads", [])
        if _STATE["tag"] not in r["workloads"]:
            r["workloads"].append(_STATE["tag"])

    install_launch_hook(sink)
    for name in names:
        if name == "report":
            _wl_cases(64, 96, 128, 8, (("fp32", False), ("fp32", True), ("bf16", False), ("fp16", False)), "report")
        elif name == "validate":
            _wl_cases(37, 53, 40, 3, (("fp32", False), ("bf16", False), ("fp16", False)), "validate")
        elif name == "bench":
            _wl_bench(("fp32", "bf16", "fp16"))
        elif name == "tests":
            import io

            real = sys.stdout
            sys.stdout = io.StringIO()  # pytest's report stays out of the JSON line
            try:
                _wl_tests(root or os.getcwd())
            finally:
                sys.stdout = real
        else:
            raise ValueError(f"unknown workload {name!r}; expected some of {sorted(WORKLOADS)}")
    print(json.dumps(list(seen.values())))


def capture(workloads=None, root: Optional[str] = None, jobs: Optional[int] = None) -> List[dict]:
    """Every distinct launch (kernel, dtype, signature, constexprs, alignment, variant) the package makes in
    ``workloads`` (default: all of :data:`WORKLOADS`), from subprocesses that run them on the Triton interpreter,
    one per workload, ``jobs`` (default: CPUs) at a time; each record lists the tags of the workloads that made
    it. ``root``: the repository (the tests workload runs its tests/)."""
    import concurrent.futures as cf

    names = list(workloads or WORKLOADS)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")

    def one(name):
        code = f"from fastcontrast.aot.launches import _capture_main; _capture_main({[name]!r}, {root!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3000,
                           cwd=root or None)
        if r.returncode != 0:
            raise RuntimeError(f"capturing the kernel launches of {name} failed:\n{r.stdout[-2000:]}\n"
                               f"{r.stderr[-4000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    with cf.ThreadPoolExecutor(jobs or min(len(names), os.cpu_count() or 1)) as ex:
        parts = list(ex.map(one, names))
    seen: Dict[str, dict] = {}
    for part in parts:
        for rec in part:
            r = seen.setdefault(record_key(rec), dict(rec, workloads=[]))
            r["workloads"] += [w for w in rec["workloads"] if w not in r["workloads"]]
    return list(seen.values())
