"""Build script: Python packaging plus the native trajectory buffer, built by CMake (CMakeLists.txt is the one
description of the native build; this file only drives it).

Environment:
  CMAKE_BUILD_PARALLEL_LEVEL / MAX_JOBS   cap the build's parallelism
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    m = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
    return m.group(1) if m else "0.0.0"


class CMakeExtension(Extension):
    """An extension module produced by the CMake project at the repository root."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt once with Ninja in build_temp; modules land where setuptools expects them
    (copied in-tree for editable installs by setuptools itself)."""

    def build_extensions(self) -> None:
        if not self.extensions:
            return
        out_dir = Path(self.get_ext_fullpath(self.extensions[0].name)).resolve().parent
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        import pybind11

        cfg = "Debug" if self.debug else "Release"
        args = [
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPOLYGRAD_FAST_VERSION={_version()}",
        ]
        if shutil.which("ninja") or _pip_ninja():
            args += ["-G", "Ninja"]
            if _pip_ninja():
                args.append(f"-DCMAKE_MAKE_PROGRAM={_pip_ninja()}")
        build_args = ["--build", ".", "--config", cfg]
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or os.environ.get("MAX_JOBS")
        if jobs:
            build_args += ["--parallel", jobs]
        cmake = _cmake_exe()
        subprocess.run([cmake, str(ROOT), *args], cwd=build_temp, check=True)
        subprocess.run([cmake, *build_args], cwd=build_temp, check=True)
        for ext in self.extensions:
            target = Path(self.get_ext_fullpath(ext.name))
            if not target.exists():
                raise RuntimeError(f"CMake build did not produce {target}")


def _pip_ninja() -> str | None:
    try:
        import ninja  # the PyPI package from [build-system] requires

        path = os.path.join(ninja.BIN_DIR, "ninja")
        return path if os.path.exists(path) else None
    except Exception:
        return None


def _cmake_exe() -> str:
    try:
        import cmake  # the PyPI package from [build-system] requires

        return os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
    except Exception:
        exe = shutil.which("cmake")
        if not exe:
            raise RuntimeError("polygrad_fast: cmake not found (pip install cmake)")
        return exe


setup(
    packages=find_packages(include=["polygrad_fast", "polygrad_fast.*"]) + ["polygrad_fast.kernels"],
    # kernels/ lives at the top level of the repository but is installed inside the polygrad_fast namespace.
    package_dir={"polygrad_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension("polygrad_fast._buffer_native"), CMakeExtension("polygrad_fast._cpu_ops")],
    cmdclass={"build_ext": CMakeBuild},
)
