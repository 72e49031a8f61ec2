"""Packaging. The C++ CPU backend is compiled with ninja on first use and cached (mmts_kernels/cpp_backend/_build.py),
so installing needs no compiler and no torch in the build environment. Wheels carry the C++ sources inside the
package (mmts_kernels/csrc/) so that an installed copy can build them too; a source checkout uses csrc/ directly."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithCSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "mmts_kernels" / "csrc"
        target.mkdir(parents=True, exist_ok=True)
        for source in Path(__file__).resolve().parent.joinpath("csrc").glob("*.[ch]*"):
            shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithCSources})
