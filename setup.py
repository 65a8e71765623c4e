"""The compiled hot path (C extensions); everything else is in pyproject.toml.

Each extension has a pure-Python twin that stays the reference and the
fallback (FLEET_PURE=1 selects it; fleet.native says which one runs). The
build is optional: without a C compiler and the Python headers pip still
installs fleet, which then runs pure (scripts/bootstrap installs both).
"""

import glob
import runpy

from setuptools import Extension, setup

CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
# The list lives once, in fleet/native.py (which the tests check is all built); read
# without importing the package, which may not be importable while it is being built.
COMPILED = runpy.run_path("fleet/native.py")["COMPILED"]
# The headers the C files share: a change to one rebuilds them all.
HEADERS = sorted(glob.glob("fleet/**/*.h", recursive=True))

setup(
    ext_modules=[
        Extension(
            name, [name.replace(".", "/") + ".c"], depends=HEADERS, extra_compile_args=CFLAGS, optional=True
        )
        for name in COMPILED
    ],
)
