"""The Ansible rollout, end to end, on real booted hosts.

Three systemd-nspawn containers (systemd as PID 1, sshd) on a private bridge
(tests/deploy/lab.py); ansible-playbook runs over ssh from a controller
namespace on the same bridge. The playbook installs fleet and the app from
wheels built here, Mongrel2 and the master on one host, bare nodes on two.
Then: requests through Mongrel2 are answered by all three hosts; a second run
changes nothing; an app upgrade under load loses no request; the fleet unit
rates "OK" or better with `systemd-analyze security`.

Slow (a few minutes, most of it booting hosts and pip); the timings are
printed (run with -s) for the closing notes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.lab import Lab
from tests.support.load import Load
from tests.support.wheels import APP_MODULE, REPO, build_app_wheel, build_fleet_wheels

PLAYBOOK_DIR = REPO / "deploy" / "ansible"
VENV_BIN = Path(sys.executable).parent
# Another ansible-core (e.g. Debian's 2.14 in /usr/bin) can be tried with this.
ANSIBLE_BIN = Path(os.environ.get("FLEET_TEST_ANSIBLE_BIN", VENV_BIN))
HTTP_PORT = 6767
SEND_PORT, RECV_PORT = 9999, 9998
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
EXPOSURE = re.compile(r"Overall exposure level for \S+: ([\d.]+) (\S+)")

pytestmark = pytest.mark.slow


def keygen() -> str:
    done = subprocess.run([str(VENV_BIN / "fleet"), "keygen"], capture_output=True, text=True, check=True)
    return done.stdout.strip()


class Rollout:
    """The test's inventory, vault and wheels, and the playbook runs against the lab."""

    def __init__(self, lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.master, *self.nodes = lab.hosts
        self.wheels = workdir / "wheels"
        self.wheels.mkdir()
        build_fleet_wheels(self.wheels)
        for version in ("1.0", "2.0"):
            build_app_wheel(self.wheels, version)
        self.inventory = workdir / "inventory"
        (self.inventory / "group_vars" / "all").mkdir(parents=True)
        lab.write_inventory(self.inventory / "hosts.ini", {"fleet_master": [self.master], "fleet_nodes": self.nodes})
        self._write_vars()

    def _write_vars(self) -> None:
        master = self.master.address
        group = f"239.{secrets.randbelow(200) + 20}.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
        settings = {
            "fleet_install_source": "wheels",
            "fleet_wheel_dir": str(self.wheels),
            "fleet_package": "fleet==0.1.0",
            "fleet_cluster": f"{group}:1717",
            "fleet_cluster_name": f"rollout-{secrets.token_hex(3)}",
            "fleet_cluster_key": "{{ vault_fleet_cluster_key }}",
            "fleet_module": APP_MODULE,
            "fleet_processes": 2,
            "fleet_threads": 2,
            "fleet_zeromq": [f"tcp://{master}:{SEND_PORT},tcp://{master}:{RECV_PORT}"],
            "fleet_mongrel2": "{{ fleet_role == 'master' }}",
            "fleet_mongrel2_port": HTTP_PORT,
            "fleet_mongrel2_handlers": [
                {"route": "/", "send_spec": f"tcp://{master}:{SEND_PORT}", "recv_spec": f"tcp://{master}:{RECV_PORT}"},
            ],
        }
        (self.inventory / "group_vars" / "all" / "main.yml").write_text(yaml.safe_dump(settings))
        # The key goes through ansible-vault, as an operator's would.
        self.vault_password = self.workdir / "vault-password"
        self.vault_password.write_text(secrets.token_hex(16) + "\n")
        self.vault_password.chmod(0o600)
        key = self.key = keygen()
        vaulted = subprocess.run(
            [str(ANSIBLE_BIN / "ansible-vault"), "encrypt_string", "--vault-password-file", str(self.vault_password),
             "--stdin-name", "vault_fleet_cluster_key"],
            input=key.strip(), capture_output=True, text=True, check=True).stdout
        (self.inventory / "group_vars" / "all" / "vault.yml").write_text(vaulted)

    def play(self, app_version: str, *extra: str, succeed: bool = True) -> tuple[dict[str, dict[str, int]], float, str]:
        """Run site.yml; returns the recap per host, the seconds it took and the output."""
        extra_vars = json.dumps({"fleet_app_packages": [f"labapp=={app_version}"], "fleet_app_version": app_version})
        command = [str(ANSIBLE_BIN / "ansible-playbook"), "-i", str(self.inventory / "hosts.ini"), "site.yml",
                   "--vault-password-file", str(self.vault_password), "-e", extra_vars, *extra]
        env = {"PATH": f"{ANSIBLE_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_CONFIG": str(PLAYBOOK_DIR / "ansible.cfg"), "HOME": str(self.workdir),
               "ANSIBLE_LOCAL_TEMP": str(self.workdir / "ansible-tmp"),
               "ANSIBLE_LOG_PATH": str(self.workdir / "ansible.log")}  # timestamped, for a slow run
        started = time.monotonic()
        done = self.lab.controller_run(command, env=env, cwd=PLAYBOOK_DIR, timeout=900)
        took = time.monotonic() - started
        output = done.stdout + done.stderr
        recap = {m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
                 for m in RECAP.finditer(output)}
        if succeed:
            assert done.returncode == 0 and len(recap) == len(self.lab.hosts), output[-6000:]
        else:
            assert done.returncode != 0, output[-6000:]
        return recap, took, output

    def url(self) -> tuple[str, int]:
        return self.master.address, HTTP_PORT

    def answers(self, count: int, connections: int = 6) -> list[dict]:
        """`count` requests through Mongrel2 over several keep-alive connections."""
        from concurrent.futures import ThreadPoolExecutor

        from tests.support.load import json_answers

        host, port = self.url()

        def run() -> list[dict]:
            with ThreadPoolExecutor(connections) as pool:
                parts = pool.map(lambda _: json_answers(host, port, "/", count // connections), range(connections))
            return [answer for part in parts for answer in part]

        return self.lab.controller_call(run)

    def load(self):
        host, port = self.url()
        load = Load(port, "/", expect=lambda body: b'"version"' in body, clients=4, pause=0.005,
                    timeout=10.0, max_duration=600, host=host)
        self.lab.controller_call(load.start)  # its client threads live in the controller's namespace
        return load

    def main_pid(self, host) -> str:
        return self.lab.ssh(host, "systemctl show -p MainPID --value fleet").stdout.strip()

    def exposure(self, unit: str) -> tuple[float, str]:
        out = self.lab.ssh(self.master, f"systemd-analyze security {unit}").stdout
        match = EXPOSURE.search(out)
        assert match, out[-2000:]
        return float(match[1]), match[2]


@pytest.fixture(scope="module")
def rollout(lab: Lab, tmp_path_factory) -> Rollout:
    return Rollout(lab, tmp_path_factory.mktemp("rollout"))


def test_playbook_deploys_serves_from_every_host_reruns_clean_and_upgrades_without_loss(rollout: Rollout) -> None:
    timings: dict[str, float] = {}
    names = {host.name for host in rollout.lab.hosts}

    recap, timings["first deploy"], output = rollout.play("1.0")
    assert all(r["failed"] == 0 and r["changed"] > 0 for r in recap.values()), recap

    answers = rollout.answers(120)
    assert {a["host"] for a in answers} == names, f"answered by {sorted({a['host'] for a in answers})}"
    assert {a["version"] for a in answers} == {"1.0"}

    recap, timings["idempotent rerun"], output = rollout.play("1.0")
    assert all(r["changed"] == 0 for r in recap.values()), f"{recap}\n{output[-6000:]}"
    recap, timings["--check --diff"], output = rollout.play("1.0", "--check", "--diff")
    assert all(r["changed"] == 0 for r in recap.values()), f"{recap}\n{output[-6000:]}"

    score, rating = rollout.exposure("fleet.service")
    assert rating in ("SAFE", "OK"), f"systemd-analyze security rates fleet.service {score} {rating}"
    # Type=notify under the real systemd: started means the workers are ready, and the loop pings the watchdog.
    shown = rollout.lab.ssh(rollout.master, "systemctl show -p Type -p StatusText -p WatchdogUSec "
                                            "-p WatchdogTimestampMonotonic fleet").stdout
    assert "Type=notify" in shown and "StatusText=generation 1: 2 worker(s) ready" in shown, shown
    assert "WatchdogUSec=30s" in shown and "WatchdogTimestampMonotonic=0" not in shown, shown

    # Every event once in the journal (each line carries its own timestamp and pid, so a repeat is a double).
    for host in rollout.lab.hosts:
        journal = rollout.lab.ssh(host, "journalctl -u fleet -o cat --no-pager").stdout.splitlines()
        lines = [line for line in journal if line.startswith("20")]  # fleet's own, not systemd's
        assert lines and len(lines) == len(set(lines)), f"{host.name}: a line logged twice:\n" + "\n".join(journal)

    load = rollout.load()
    try:
        load.wait_succeeded(50)
        recap, timings["app upgrade under load"], output = rollout.play("2.0")
        load.wait_succeeded(50)  # still flowing after the upgrade
    finally:
        report = load.stop()
    assert report.clean, f"{report.summary()}\n{output[-4000:]}"
    answers = rollout.answers(120)
    assert {a["host"] for a in answers} == names and {a["version"] for a in answers} == {"2.0"}, answers[:5]

    # A key rotation under load in three plays (docs/security.md): add the new key second, sign with
    # it, drop the old. Each changes the key file, which HUPs the service: no restart, nothing lost.
    old, new = rollout.key, keygen()
    pids = {host.name: rollout.main_pid(host) for host in rollout.lab.hosts}
    load = rollout.load()
    try:
        load.wait_succeeded(50)
        for number, keys in enumerate((f"{old}\n{new}", f"{new}\n{old}", new), 1):
            recap, timings[f"key rotation play {number}"], output = rollout.play(
                "2.0", "-e", json.dumps({"fleet_cluster_key": keys}))
            assert all(r["failed"] == 0 for r in recap.values()), f"{recap}\n{output[-4000:]}"
        load.wait_succeeded(50)
    finally:
        rotation = load.stop()
    assert rotation.clean, rotation.summary()
    assert {host.name: rollout.main_pid(host) for host in rollout.lab.hosts} == pids, "a service was restarted"
    rollout.key = new
    assert {a["host"] for a in rollout.answers(60)} == names

    # A host that fails stops the rollout before the next batch is touched.
    first, second = rollout.nodes
    host_vars = rollout.inventory / "host_vars"
    host_vars.mkdir()
    (host_vars / f"{first.name}.yml").write_text(yaml.safe_dump({"fleet_package": "fleet==99.0"}))
    recap, _, output = rollout.play("2.0", succeed=False)
    assert recap[first.name]["failed"] == 1 and second.name not in recap, f"{recap}\n{output[-4000:]}"
    assert {a["host"] for a in rollout.answers(60)} == names  # and every host still serves

    print(f"\nrollout on {len(names)} hosts: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
          + f"; fleet.service exposure {score} {rating}; under load during the upgrade: {report.summary()}"
          + f"; during the key rotation: {rotation.summary()}")
