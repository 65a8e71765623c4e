"""What the rollout test installs on its hosts: fleet's wheels and a tiny app at two versions.

The test hosts have no package index, as in a locked-down production
network: the role copies these wheels over and pip installs them offline.
"""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
APP_MODULE = "labapp:application"

# The app says which host and which version answered, and has a __version__
# that workers report in their heartbeats (the health gate waits for it).
_APP_SOURCE = '''\
import json
import os
import socket

__version__ = "{version}"


def application(environ, start_response):
    body = json.dumps({{"host": socket.gethostname(), "version": __version__, "pid": os.getpid()}}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


def build_fleet_wheels(dest: Path) -> None:
    """fleet from this checkout, and every dependency, as wheels in `dest`."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    str(REPO), "-w", str(dest)], check=True, timeout=600)


def build_app_wheel(dest: Path, version: str) -> Path:
    """The `labapp` wheel at `version`, written directly (a wheel is a zip with metadata)."""
    dist_info = f"labapp-{version}.dist-info"
    files = {
        "labapp.py": _APP_SOURCE.format(version=version).encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: labapp\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: fleet-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},sha256={_digest(data)},{len(data)}" for name, data in files.items()]
    files[f"{dist_info}/RECORD"] = ("\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n").encode()
    path = dest / f"labapp-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as wheel:
        for name, data in files.items():
            wheel.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return path


def _digest(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
