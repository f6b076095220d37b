"""Build script. Python packaging only for now; the native extension is added by the CMake build."""
from setuptools import setup

setup(
    packages=["polygrad_fast", "polygrad_fast.reference", "polygrad_fast.kernels"],
    # kernels/ lives at the top level of the repository but is installed inside the polygrad_fast namespace.
    package_dir={"polygrad_fast.kernels": "kernels"},
)
