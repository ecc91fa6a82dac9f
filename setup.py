"""Build the one compiled module, vmrun._fastsig, and vmrun-nsinit, the init of a stack's
PID namespace (a small C program: vmrun/nsinit.c); everything else is in pyproject.toml."""

from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExtAndInit(build_ext):
    """build_ext, then vmrun/nsinit.c into the package as the executable vmrun-nsinit
    (next to the extension: in the source tree for an editable install)."""

    def run(self) -> None:
        super().run()
        package = Path(self.get_ext_fullpath("vmrun._fastsig")).parent
        objects = self.compiler.compile(["vmrun/nsinit.c"], output_dir=self.build_temp)
        self.compiler.link_executable(objects, "vmrun-nsinit", output_dir=str(package))


setup(
    ext_modules=cythonize(
        [Extension("vmrun._fastsig", ["vmrun/_fastsig.pyx"])],
        compiler_directives={"language_level": "3"},
    ),
    cmdclass={"build_ext": BuildExtAndInit},
)
