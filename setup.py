"""Build driver: setuptools hands the compiled extension `v2l_fast._C` to CMake + ninja.

CMakeLists.txt decides what goes in: the C++ sources always, the CUDA sources only when the
installed torch is a CUDA build and nvcc is present. Set V2L_NO_EXT=1 to skip the extension
entirely (pure-Python install; `v2l_fast` then runs on the torch and triton backends only).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # the build compiles against the torch already installed

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_BUILD_TYPE={config}",
            f"-DV2L_VERSION={self.distribution.get_version()}",
            "-GNinja",
        ]
        if "CUDA_ARCHS" in os.environ:
            cmake_args.append(f"-DV2L_CUDA_ARCHS={os.environ['CUDA_ARCHS']}")
        subprocess.run(["cmake", str(ROOT), *cmake_args], cwd=build_dir, check=True)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


ext_modules = [] if os.environ.get("V2L_NO_EXT") == "1" else [CMakeExtension("v2l_fast._C")]
# The Triton kernels live at the top level (design card) and import as `v2l_fast.kernels`.
packages = find_packages(include=["v2l_fast", "v2l_fast.*"]) + ["v2l_fast.kernels"]
setup(
    packages=packages,
    package_dir={"v2l_fast.kernels": "kernels"},
    # the embedded default (v2l_fast.data.embedded): trained toy VLM, hypernetwork, sample clips
    package_data={"v2l_fast": ["assets/toy/*", "assets/toy/*/*"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": CMakeBuild},
)
