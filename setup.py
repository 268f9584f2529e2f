"""Optional compiled extension fastcontrast._C from csrc/.

Built when torch is importable in the build environment (``pip install --no-build-isolation .``) and a C++
compiler works; the CUDA part is added when nvcc and a CUDA build of torch are present. Any failure prints one
line and falls back to the pure-Python package. Env: FASTCONTRAST_BUILD_EXT=0 skips the extension,
=1 makes a failed build an error; FASTCONTRAST_BUILD_CUDA=0/1 skips/forces the CUDA part.
"""
import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _notice(msg):
    print(f"fastcontrast: {msg}", file=sys.stderr)


def _ext_modules():
    want = os.environ.get("FASTCONTRAST_BUILD_EXT", "auto")
    if want == "0":
        _notice("FASTCONTRAST_BUILD_EXT=0: skipping the C++/CUDA extension (pure-Python install)")
        return [], {}
    cpp = sorted(p for p in glob.glob(os.path.join("csrc", "*.cpp")) if not p.endswith("cuda_binding.cpp"))
    if not cpp:
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # noqa: BLE001
        if want == "1":
            raise
        _notice(f"torch not importable at build time ({type(e).__name__}); skipping the extension "
                "(use `pip install --no-build-isolation .` to build it)")
        return [], {}
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    want_cuda = os.environ.get("FASTCONTRAST_BUILD_CUDA", "auto")
    use_cuda = bool(cu) and want_cuda != "0" and CUDA_HOME is not None and torch.version.cuda is not None
    if want_cuda == "1" and not use_cuda:
        raise RuntimeError("FASTCONTRAST_BUILD_CUDA=1 but nvcc or a CUDA build of torch is missing")
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        ext = CUDAExtension(
            "fastcontrast._C", cpp + [os.path.join("csrc", "cuda_binding.cpp")] + cu,
            define_macros=[("FASTCONTRAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("fastcontrast._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": _optional(BuildExtension, want == "1")}


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
