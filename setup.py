"""Build the compiled core: every pyx/NAME.pyx becomes the extension paycore.core.NAME."""
import os
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent


def cython_include_dir() -> str:
    """A tree where `cimport paycore.core.NAME` finds pyx/NAME.pxd: the sources
    keep the flat pyx/ layout while the modules live in the paycore.core package."""
    root = HERE / "build" / "cython-include"
    link = root / "paycore" / "core"
    if not link.is_symlink():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(HERE.resolve() / "pyx", target_is_directory=True)
    return str(root)


# Modules are translated and compiled side by side, one per CPU: every build
# (make build, pip install, the Dockerfile's wheel, the install tests) waits for it.
JOBS = os.cpu_count() or 1

# The record's reader and the recent ledger's rebuild call SQLite's C API: the
# library Python's sqlite3 module loads.
LIBRARIES = {"record_reader": ["sqlite3"], "recent_ledger": ["sqlite3"]}

extensions = [
    Extension(
        f"paycore.core.{source.stem}",
        [str(source.relative_to(HERE))],
        extra_compile_args=["-O2"],
        libraries=LIBRARIES.get(source.stem, []),
    )
    for source in sorted((HERE / "pyx").glob("*.pyx"))
]

# The service's sources live in service/ and install as paycore.service.
# Packages are found, never listed: a new one is in the wheel the day it is made.
SERVICE = "paycore.service"
packages = [*find_packages(include=["paycore", "paycore.*"]),
            SERVICE, *(f"{SERVICE}.{package}" for package in find_packages("service"))]

setup(
    packages=packages,
    package_dir={SERVICE: "service"},
    package_data={"paycore.core": ["*.pyi"], "paycore": ["py.typed"]},
    options={"build_ext": {"parallel": JOBS}},
    ext_modules=cythonize(
        extensions,
        nthreads=JOBS,
        include_path=[cython_include_dir()],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
