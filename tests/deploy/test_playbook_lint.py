"""The playbook parses, and ansible-lint's production profile passes (run from
deploy/ansible, the only place it reads deploy/ansible/.ansible-lint)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PLAYBOOK_DIR = Path(__file__).resolve().parents[2] / "deploy" / "ansible"
VENV_BIN = Path(sys.executable).parent


def run(*command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "ANSIBLE_NOCOLOR": "1",
           "NO_COLOR": "1", "ANSIBLE_LOCAL_TEMP": "/tmp/fleet-ansible-lint"}
    return subprocess.run([str(VENV_BIN / command[0]), *command[1:]], cwd=PLAYBOOK_DIR, env=env,
                          capture_output=True, text=True, timeout=300)


def test_playbook_syntax() -> None:
    done = run("ansible-playbook", "--syntax-check", "site.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_ansible_lint_production_profile() -> None:
    done = run("ansible-lint", "--offline")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Profile 'production' was required, and it passed" in output, output
