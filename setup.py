# SPDX-License-Identifier: Apache-2.0
"""Build of dimple_rt and its C++/CUDA extension ``dimple_rt._C``.

Install torch first, then build against it without build isolation (so the extension links the torch it
runs with; see shared/design/build.md):

    pip install torch==2.13.0 ninja
    pip install --no-build-isolation .          # or -e . while developing

``build_config()`` is the one place that lists sources and flags; CMakeLists.txt reads it through
cmake/build_config.py. Environment knobs:

- ``DIMPLE_RT_CPU_ISA`` = auto (default) | avx512 | avx2 | default. ``auto`` compiles the whole extension
  for the best x86 vector ISA that both this CPU (as torch detects it) and the compiler support, and defines
  at::vec's CPU_CAPABILITY to match, so ``at::vec::Vectorized<float>`` is 16 (AVX-512) or 8 (AVX2) lanes of
  real SIMD. The extension is built on the machine that runs it; to build for another machine, pick its
  ISA (``default`` is portable). ``dimple_rt.ops`` refuses to load a build whose ISA this CPU lacks.
  AVX-512-BF16 instructions are not used: bf16 tiles are widened to fp32 (a shift) and all maths is fp32.
- ``DIMPLE_RT_CUDA`` = auto (default) | 1 | 0. ``auto`` compiles ``csrc/cuda/*.cu`` when the installed torch
  is a CUDA build (``torch.version.cuda``) and a CUDA toolkit is found; never by probing for a GPU.
  ``CUDA_HOME`` names the toolkit root (the folder whose bin/ holds the real nvcc; the nvcc on PATH may be a
  wrapper script). ``TORCH_CUDA_ARCH_LIST`` defaults to "8.0;9.0+PTX" (needed when no GPU is visible; the PTX
  lets GPUs newer than sm_90 JIT-compile the kernels instead of failing with "no kernel image").
- ``DEBUG=1``: -O0 -g.

The extension always links the shared libstdc++ that torch uses (see shared_libstdcxx_link_args).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

try:
    import torch
except ImportError:
    raise SystemExit(
        "dimple_rt builds a C++ extension against the installed torch, and torch is not importable here.\n"
        "Install torch into this environment first, then build without build isolation:\n"
        "    pip install torch==2.13.0 ninja\n"
        "    pip install --no-build-isolation .\n"
    ) from None

# Compiler flags for each x86 ISA, as torch compiles its own AVX2/AVX-512 kernels, plus the at::vec
# macros that select the matching Vectorized<T> implementation (ATen/cpu/vec/vec.h).
ISA_FLAGS: dict[str, list[str]] = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "default": [],
}
ISA_DEFINES: dict[str, list[str]] = {
    "avx512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "default": ["-DCPU_CAPABILITY=DEFAULT"],
}
_ISA_PROBE = {
    "avx512": "#include <immintrin.h>\n__m512 f(__m512 a) { return _mm512_fmadd_ps(a, a, a); }\n",
    "avx2": "#include <immintrin.h>\n__m256 f(__m256 a) { return _mm256_fmadd_ps(a, a, a); }\n",
}


def _rel(pattern: str) -> list[str]:
    return sorted(glob.glob(pattern, root_dir=ROOT))


def _env_choice(name: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in allowed:
        raise SystemExit(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _cpu_supports(isa: str) -> bool:
    # torch's own cpuinfo-based detection (the hardware, not ATEN_CPU_CAPABILITY); the same test runs in
    # dimple_rt.ops at import time.
    check = {"avx512": "_is_avx512_supported", "avx2": "_is_avx2_supported"}.get(isa)
    return check is None or bool(getattr(torch.cpu, check, lambda: False)())


def _cxx() -> list[str]:
    return (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()


def _compiler_supports(isa: str) -> bool:
    if isa not in _ISA_PROBE:
        return True
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write(_ISA_PROBE[isa])
        cmd = [*_cxx(), *ISA_FLAGS[isa], "-c", src, "-o", os.path.join(tmp, "probe.o")]
        try:
            return subprocess.run(cmd, capture_output=True, check=False).returncode == 0
        except OSError:
            return False


def choose_cpu_isa() -> str:
    requested = _env_choice("DIMPLE_RT_CPU_ISA", ("auto", "avx512", "avx2", "default"))
    if requested != "auto":
        if not _compiler_supports(requested):
            raise SystemExit(f"DIMPLE_RT_CPU_ISA={requested}: the C++ compiler does not accept {ISA_FLAGS[requested]}")
        return requested
    if sysconfig.get_platform().endswith(("x86_64", "amd64")):
        for isa in ("avx512", "avx2"):
            if _cpu_supports(isa) and _compiler_supports(isa):
                return isa
    return "default"


def shared_libstdcxx_link_args() -> list[str]:
    """Make sure the extension uses the C++ runtime that torch uses, never a static copy of its own.

    A compiler whose lib dir has only libstdc++.a (the GPU machines' /opt/gcc wrapper) links libstdc++ into the
    extension statically; an exception thrown by a kernel (TORCH_CHECK) is then raised by one C++ runtime and
    caught by torch's, and the process crashes. In that case link the libstdc++.so.6 that torch loaded.
    """
    try:
        probe = subprocess.run([*_cxx(), "-print-file-name=libstdc++.so"], capture_output=True, text=True, check=False)
    except OSError:
        return []  # no such compiler: the build itself will say so
    if os.path.isabs(probe.stdout.strip()) or not os.path.exists("/proc/self/maps"):
        return []  # the compiler links the shared runtime by itself (or this is not Linux)
    with open("/proc/self/maps") as f:
        loaded = sorted({line.split()[-1] for line in f if "/libstdc++.so" in line})
    if not loaded:
        raise SystemExit(f"{' '.join(_cxx())} would link libstdc++ statically and torch's libstdc++.so was not found")
    return loaded[:1]


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME/$CUDA_PATH, else the root of the real nvcc, else /usr/local/cuda*."""

    def is_root(path: str) -> bool:
        return os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
            os.path.join(path, "include", "cuda_runtime.h")
        )

    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if not is_root(root):
                raise SystemExit(f"{var}={root} is not a CUDA toolkit root (no bin/nvcc and include/cuda_runtime.h)")
            return root
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:  # may be a wrapper script (as here: /usr/local/bin/nvcc), then its parent is not the root
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    return next((c for c in candidates if is_root(c)), None)


def choose_cuda() -> str | None:
    """The toolkit root when the CUDA sources are compiled, else None. Decided from the installed torch and
    the toolkit, never from torch.cuda.is_available() (a build machine may have no GPU)."""
    requested = _env_choice("DIMPLE_RT_CUDA", ("auto", "1", "0"))
    if requested == "0":
        return None
    cuda_home = find_cuda_home() if torch.version.cuda else None
    if requested == "1" and cuda_home is None:
        why = "no CUDA toolkit (set CUDA_HOME)" if torch.version.cuda else f"torch {torch.__version__} is a CPU build"
        raise SystemExit(f"DIMPLE_RT_CUDA=1 but {why}")
    return cuda_home


def build_config() -> dict:
    """Sources (relative to the repository root) and flags of the extension: the one list of both."""
    debug = os.environ.get("DEBUG", "0") == "1"
    isa = choose_cpu_isa()
    cuda_home = choose_cuda()
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # No -std here: torch.utils.cpp_extension adds the standard its headers and libraries were built with
    # (C++17 for torch 2.11, C++20 for 2.13), and CMake takes it from the torch target; mixing standards
    # across torch's inline headers invites ABI/ODR trouble. Our own sources are plain C++17.
    defines = ["-DDIMPLE_RT_WITH_CUDA=1"] if cuda_home else []
    # -Wno-maybe-uninitialized: gcc 12 reports false positives inside its own avx512fintrin.h.
    warn = ["-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"]
    cxx = [*opt, "-fopenmp", *warn, *ISA_FLAGS[isa], *ISA_DEFINES[isa]]
    cuda_sources: list[str] = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if cuda_home:
        cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
        # The minimal toolkit lacks cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h includes; the nvidia
        # pip packages next to a CUDA torch carry them.
        include_dirs += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "include")))
    return {
        "cpu_isa": isa,
        "cuda_home": cuda_home,
        "sources": _rel("csrc/*.cpp") + _rel("csrc/common/*.cpp") + _rel("csrc/cpu/*.cpp"),
        "cuda_sources": cuda_sources,
        "include_dirs": include_dirs,
        "cxx_flags": cxx + defines,
        # -Xptxas=-v: ptxas prints registers, shared memory and spills of every kernel (benchmarks/RESULTS.md).
        # No --use_fast_math: confident_select's decisions need the accurate expf/logf that torch uses.
        "nvcc_flags": [*opt, "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-v", *defines],
        "link_flags": ["-fopenmp", *shared_libstdcxx_link_args()] + (["-g"] if debug else []),
    }


def extensions() -> list:
    config = build_config()
    print(
        f"dimple_rt._C: CPU ISA {config['cpu_isa']}, CUDA "
        + (f"on ({config['cuda_home']})" if config["cuda_home"] else "off"),
        file=sys.stderr,
    )
    if config["cuda_home"]:
        os.environ["CUDA_HOME"] = config["cuda_home"]  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # +PTX: newer GPUs JIT it
    from torch.utils import cpp_extension

    kind = cpp_extension.CUDAExtension if config["cuda_home"] else cpp_extension.CppExtension
    extra_compile_args = {"cxx": config["cxx_flags"]}
    if config["cuda_home"]:
        extra_compile_args["nvcc"] = config["nvcc_flags"]
    return [
        kind(
            "dimple_rt._C",
            config["sources"] + config["cuda_sources"],
            include_dirs=config["include_dirs"],
            extra_compile_args=extra_compile_args,
            extra_link_args=config["link_flags"],
        )
    ]


if __name__ == "__main__":
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["dimple_rt", "dimple_rt.*"]),
        package_data={"dimple_rt": ["**/*.json", "**/*.safetensors", "**/*.txt"]},
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension},
    )
