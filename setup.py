"""Build the one compiled module, vmrun._fastsig; everything else is in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("vmrun._fastsig", ["vmrun/_fastsig.pyx"])],
        compiler_directives={"language_level": "3"},
    ),
)
