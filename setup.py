"""Build the Cython hot path: each `_core/<name>.pyx` becomes `proxy._core.<name>`."""
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

CORE_MODULES = sorted(p.stem for p in Path("_core").glob("*.pyx"))

extensions = [
    Extension(
        f"proxy._core.{name}",
        [f"_core/{name}.pyx"],
        extra_compile_args=["-O2"],
    )
    for name in CORE_MODULES
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )
)
