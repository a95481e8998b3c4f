"""Build hook: compile the CUDA kernel library (plugins/kernels) and the CPU kernel library
(plugins/cpu) with CMake during the install.

``pip install .`` (or a wheel build) puts ``libclada_kernels.so`` into the package as
``clada_export/lib/libclada_kernels.so``; ``pip install -e .`` writes it there in the source
tree. Where nvcc or cmake is missing the install still succeeds without the library, and the
GPU commands say how to build it (``clada_export/ops/native.py``).

Environment:
  CLADA_CUDA_ARCHS   CMake CUDA architectures (default: the compute capability nvidia-smi
                     reports, else ``90-real``, i.e. Hopper only; e.g. "80-real;90-real;90-virtual")
  CLADA_BUILD_KERNELS  ``0`` skips the build; ``1`` makes a failed or impossible build an error
  CLADA_BUILD_CPU_KERNELS  the same for ``libclada_cpu.so``, which needs cmake and a C++17
                     compiler only (no nvcc): without them the install succeeds, and the torch
                     backend says how to build it (``clada_export/ops/cpu_kernel.py``)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, Distribution, setup
from setuptools.command.build import build

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:  # an older setuptools without build isolation: its wheels keep the default tag
    bdist_wheel = None

ROOT = Path(__file__).resolve().parent
LIB_NAME = "libclada_kernels.so"
CPU_LIB_NAME = "libclada_cpu.so"
PACKAGE_LIB = Path("clada_export") / "lib"


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def default_archs() -> str:
    """The local GPU's architecture when nvidia-smi answers, else Hopper (sm_90)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            caps = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=20).stdout.split()
            archs = sorted({c.replace(".", "") + "-real" for c in caps if c.replace(".", "").isdigit()})
            if archs:
                return ";".join(archs)
        except (OSError, subprocess.SubprocessError):
            pass
    return "90-real"


class build_kernels(Command):
    """Configure and build plugins/ with CMake, then copy libclada_kernels.so into the package.
    Subclasses name another CMake project, library, compiler and switch (build_cpu_kernels)."""

    description = "build libclada_kernels.so (CUDA) into clada_export/lib"
    user_options: list = []
    lib_name = LIB_NAME
    cmake_target = "clada_kernels"  # also the build directory's name
    source = ROOT / "plugins"
    switch = "CLADA_BUILD_KERNELS"
    without = "the CUDA kernel library (the CPU backends work; see docs/gpu.md to build it)"

    def initialize_options(self) -> None:
        self.build_lib = None
        self.build_temp = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build", ("build_lib", "build_lib"), ("build_temp", "build_temp"))

    def _target(self) -> Path:
        # editable installs import the package from the source tree: the library goes there
        return (ROOT if self.editable_mode else Path(self.build_lib)) / PACKAGE_LIB / self.lib_name

    def _compiler(self) -> tuple[str | None, str]:
        """The compiler CMake is given (None when missing) and its name for the message."""
        return find_nvcc(), "nvcc"

    def _configure(self, compiler: str) -> tuple[list[str], str]:
        """Extra CMake configure flags, and what the build line says about them."""
        archs = os.environ.get("CLADA_CUDA_ARCHS") or default_archs()
        return ([f"-DCMAKE_CUDA_ARCHITECTURES={archs}", f"-DCMAKE_CUDA_COMPILER={compiler}",
                 "-DCLADA_KERNELS_ONLY=ON"], f"for CUDA architectures {archs}")

    def run(self) -> None:
        mode = os.environ.get(self.switch, "")
        if mode == "0":
            return
        (compiler, compiler_name), cmake = self._compiler(), shutil.which("cmake")
        if compiler is None or cmake is None:
            missing = compiler_name if compiler is None else "cmake"
            if mode == "1":
                raise SystemExit(f"{self.switch}=1 but {missing} was not found")
            print(f"clada-export: {missing} not found, installing without {self.without}", file=sys.stderr)
            return
        build_dir = Path(self.build_temp).resolve() / self.cmake_target
        flags, label = self._configure(compiler)
        configure = [cmake, "-S", str(self.source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release", *flags]
        if shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        print(f"clada-export: building {self.lib_name} {label}", file=sys.stderr)
        try:
            subprocess.run(configure, check=True)
            subprocess.run([cmake, "--build", str(build_dir), "--target", self.cmake_target, "-j",
                            str(os.cpu_count() or 2)], check=True)
        except subprocess.CalledProcessError as exc:
            if mode == "1":
                raise
            print(f"clada-export: building {self.lib_name} failed ({exc}); installing without it", file=sys.stderr)
            return
        target = self._target()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / self.lib_name, target)

    def get_outputs(self) -> list[str]:
        return [str(self._target())] if self._target().is_file() else []

    def get_output_mapping(self) -> dict[str, str]:
        return {}

    def get_source_files(self) -> list[str]:
        return []


def find_cxx() -> str | None:
    for candidate in (os.environ.get("CXX"), shutil.which("c++"), shutil.which("g++"), shutil.which("clang++")):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


class build_cpu_kernels(build_kernels):
    """Configure and build plugins/cpu with CMake and the C++ compiler, then copy
    libclada_cpu.so into the package. Independent of nvcc and of the CUDA build."""

    description = "build libclada_cpu.so (C++, CPU) into clada_export/lib"
    lib_name = CPU_LIB_NAME
    cmake_target = "clada_cpu"
    source = ROOT / "plugins" / "cpu"
    switch = "CLADA_BUILD_CPU_KERNELS"
    without = ("the CPU kernel library (the torch backend then runs the reference op and says how to build it; "
               "docs/cpu.md)")

    def _compiler(self) -> tuple[str | None, str]:
        return find_cxx(), "a C++ compiler"

    def _configure(self, compiler: str) -> tuple[list[str], str]:
        return [f"-DCMAKE_CXX_COMPILER={compiler}"], f"with {compiler}"


class build_with_kernels(build):
    sub_commands = [*build.sub_commands, ("build_kernels", None), ("build_cpu_kernels", None)]


if bdist_wheel is not None:
    class bdist_wheel_any_python(bdist_wheel):
        """The library is loaded with ctypes, not as a Python extension: one wheel per
        platform (py3-none-linux_x86_64), not per Python version."""

        def get_tag(self) -> tuple[str, str, str]:
            _, _, platform = super().get_tag()
            return "py3", "none", platform


class BinaryDistribution(Distribution):
    """With a native library inside, the wheel is platform-specific (not py3-none-any)."""

    def has_ext_modules(self) -> bool:
        cuda = os.environ.get("CLADA_BUILD_KERNELS") != "0" and find_nvcc() is not None
        cpu = os.environ.get("CLADA_BUILD_CPU_KERNELS") != "0" and find_cxx() is not None and shutil.which("cmake")
        return bool(cuda or cpu)


commands = {"build": build_with_kernels, "build_kernels": build_kernels, "build_cpu_kernels": build_cpu_kernels}
if bdist_wheel is not None:
    commands["bdist_wheel"] = bdist_wheel_any_python
setup(cmdclass=commands, distclass=BinaryDistribution)
