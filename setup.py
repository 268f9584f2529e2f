"""Optional compiled extension fastcontrast._C from csrc/.

Built against the torch of the environment being installed into, whenever a C++ compiler works: with
``--no-build-isolation`` that torch is importable directly; under pip's default isolated build (which hides the
environment's site-packages) it is located by asking the same interpreter without pip's isolation, so a plain
``pip install .`` builds the extension too. torch is not a build requirement on purpose: an isolated build env
would pull a different (multi-GB, CUDA) torch whose ABI need not match the one the extension is loaded with.
The CUDA part is added when nvcc and a CUDA build of torch are present. Any failure prints one
line and falls back to the pure-Python package. Env: FASTCONTRAST_BUILD_EXT=0 skips the extension,
=1 makes a failed build an error; FASTCONTRAST_BUILD_CUDA=0/1 skips/forces the CUDA part.
"""
import glob
import os
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _notice(msg):
    print(f"fastcontrast: {msg}", file=sys.stderr)


def _import_target_torch():
    """Import the torch the package will run with; under pip's build isolation, borrow it from the target env."""
    try:
        import torch  # noqa: F401
        return
    except ImportError:
        pass
    # pip isolates the build with PYTHONPATH (a sitecustomize that drops site-packages) and PYTHONNOUSERSITE; the
    # same interpreter without them sees the environment we are installing into.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise ImportError("torch is not installed in the target environment")
    # appended, not prepended: the build env's setuptools must keep precedence over the target env's
    sys.path.append(out.stdout.strip().splitlines()[-1])
    import torch  # noqa: F401


def _ext_modules():
    want = os.environ.get("FASTCONTRAST_BUILD_EXT", "auto")
    if want == "0":
        _notice("FASTCONTRAST_BUILD_EXT=0: skipping the C++/CUDA extension (pure-Python install)")
        return [], {}
    cpp = sorted(p for p in glob.glob(os.path.join("csrc", "*.cpp")) if not p.endswith("cuda_binding.cpp"))
    if not cpp:
        return [], {}
    try:
        _import_target_torch()
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001
        if want == "1":
            raise
        _notice(f"torch not importable at build time ({type(e).__name__}: {e}); skipping the extension "
                "(install torch first, then reinstall fastcontrast to build it)")
        return [], {}
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = os.environ.get("FASTCONTRAST_BUILD_CUDA", "auto")
    use_cuda = bool(cu) and want_cuda != "0" and CUDA_HOME is not None and torch.version.cuda is not None
    if want_cuda == "1" and not use_cuda:
        raise RuntimeError("FASTCONTRAST_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing")
    cxx = ["-O3", "-fopenmp"]  # no -std: torch adds the standard its headers need (C++20 for torch 2.13)
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        # The CuTe kernels need the CUTLASS/CuTe headers of the nvidia-cutlass package (a build requirement of the
        # CUDA part only): without it they are left out and the WMMA kernels serve backend="cuda" alone.
        cutlass = cutlass_include()
        macros = [("FASTCONTRAST_WITH_CUDA", "1")] + ([("FASTCONTRAST_WITH_CUTE", "1")] if cutlass else [])
        if not cutlass:
            cu = [f for f in cu if not f.endswith("_cute.cu")]
            _notice("nvidia-cutlass is not installed: building without the CuTe kernels (pip install nvidia-cutlass)")
        ext = CUDAExtension(
            "fastcontrast._C", cpp + [os.path.join("csrc", "cuda_binding.cpp")] + cu,
            define_macros=macros, include_dirs=[cutlass] if cutlass else [],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("fastcontrast._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": _optional(BuildExtension, want == "1")}


def cutlass_include():
    """The CUTLASS/CuTe include folder shipped by the nvidia-cutlass package, or None."""
    try:
        import cutlass_library
    except Exception:  # noqa: BLE001
        return None
    path = os.path.join(os.path.dirname(cutlass_library.__file__), "source", "include")
    return path if os.path.exists(os.path.join(path, "cute", "tensor.hpp")) else None


def _optional(base, strict):
    class OptionalBuildExt(base):
        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001
                if strict:
                    raise
                _notice(f"building the extension failed ({type(e).__name__}: {e}); installing pure Python")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                if strict:
                    raise
                _notice(f"building {ext.name} failed ({type(e).__name__}: {e}); installing pure Python")

    return OptionalBuildExt


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
