"""fleet.native: the compiled hot path is built, or FLEET_PURE says why it is not used."""

from __future__ import annotations

import os
import subprocess
import sys

from fleet import native


def test_every_compiled_module_is_built_unless_fleet_pure_is_set() -> None:
    if native.PURE:
        assert native.describe() == "pure Python (FLEET_PURE)"
        assert all(native.compiled(name) is None for name in native.COMPILED)
    else:
        assert native.describe() == "compiled", "pip install -e . builds the C extensions (setup.py)"


def test_fleet_pure_selects_the_reference_in_a_fresh_process() -> None:
    code = "from fleet.dispatch import dispatcher, core; print(dispatcher.Core is core.Core)"
    for pure, expected in (("1", "True"), ("0", "False")):
        env = {**os.environ, "FLEET_PURE": pure}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected
