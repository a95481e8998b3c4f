"""The CUDA kernel library builds with CMake + nvcc (no GPU needed): CI's compile check.

Builds every architecture the library ships (sm_80/86/89/90 + PTX) into a temporary
directory and checks the C ABI's symbols are exported. Skipped where nvcc or cmake is
missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import find_nvcc

REPO = Path(__file__).resolve().parents[1]
PLUGINS = REPO / "plugins"


pytestmark = [
    pytest.mark.skipif(find_nvcc() is None, reason="nvcc not found (CUDA toolkit not installed)"),
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not found"),
]


def test_kernel_library_builds(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, CUDACXX=find_nvcc())
    configure = ["cmake", "-S", str(PLUGINS), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    run = subprocess.run(configure, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    jobs = str(max(2, os.cpu_count() or 2))
    run = subprocess.run(
        ["cmake", "--build", str(build), "-j", jobs], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-6000:]
    lib = build / "libclada_kernels.so"
    assert lib.is_file(), f"no {lib}: {sorted(p.name for p in build.iterdir())}"
    nm = shutil.which("nm")
    if nm:
        symbols = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True).stdout
        for name in ("clada_sparse_mlp", "clada_sparse_mlp_workspace_size", "clada_kernels_abi_version",
                     "clada_error_string"):
            assert f" {name}\n" in symbols, f"{name} not exported"
    cuobjdump = shutil.which("cuobjdump") or str(Path(find_nvcc()).with_name("cuobjdump"))
    if Path(cuobjdump).is_file():
        listing = subprocess.run([cuobjdump, "--list-elf", "--list-ptx", str(lib)], capture_output=True,
                                 text=True).stdout
        for arch in ("sm_80", "sm_86", "sm_89", "sm_90"):
            assert arch in listing, f"no {arch} code in the library:\n{listing}"
        assert ".ptx" in listing or "compute_90" in listing, f"no PTX in the library:\n{listing}"
