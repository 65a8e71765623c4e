"""The compiled hot path (C extensions); everything else is in pyproject.toml.

Each extension has a pure-Python twin that stays the reference and the
fallback (FLEET_PURE=1 selects it; fleet.native says which one runs). The
build is optional: without a C compiler and the Python headers pip still
installs fleet, which then runs pure (scripts/bootstrap installs both).
"""

from setuptools import Extension, setup

CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]

setup(
    ext_modules=[
        Extension("fleet.dispatch._core", ["fleet/dispatch/_core.c"], extra_compile_args=CFLAGS, optional=True),
        Extension("fleet.dispatch._frames", ["fleet/dispatch/_frames.c"], extra_compile_args=CFLAGS, optional=True),
        Extension("fleet.mongrel2._codec", ["fleet/mongrel2/_codec.c"], extra_compile_args=CFLAGS, optional=True),
        Extension("fleet.wsgi._environ", ["fleet/wsgi/_environ.c"], extra_compile_args=CFLAGS, optional=True),
        Extension("fleet.wsgi._response", ["fleet/wsgi/_response.c"], extra_compile_args=CFLAGS, optional=True),
        Extension("fleet.worker._lane", ["fleet/worker/_lane.c"], extra_compile_args=CFLAGS, optional=True),
    ],
)
