"""Real test hosts for the rollout: booted systemd-nspawn containers with sshd,
each in its own network namespace on a private bridge.

    with Lab(hosts=3) as lab:          # boots fleet-h1..h3 at 198.18.0.1..3
        lab.ssh(lab.hosts[0], "systemctl is-system-running")
        lab.controller_run(["ansible-playbook", ...])   # in the controller's namespace
        lab.controller_call(fn)        # fn runs in a thread inside that namespace

The network is tests/cluster/netns.py's (a bridge in its own namespace, no
default route, nothing on the machine's real interfaces); the controller (the
machine running ansible and the HTTP clients) is one more host on the bridge.
Every container boots the same cached Debian bookworm image
(`ensure_rootfs`, made once by debootstrap) with `--volatile=overlay`, so
nothing a test does survives it. See /work/shared/ansible-testing.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cluster"))

import netns  # noqa: E402

ROOTFS = Path("/var/cache/fleet-test/rootfs-bookworm-v1")
MIRROR = "http://deb.debian.org/debian"
# Everything a host needs, since the hosts cannot reach a package index.
PACKAGES = ("systemd,systemd-sysv,dbus,openssh-server,python3,python3-venv,python3-apt,"
            "python3-packaging,iproute2,procps,mongrel2-core,ca-certificates")
BOOT_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
SSH_OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-o", "ControlMaster=no")


def unavailable_reason() -> str | None:
    reason = netns.unavailable_reason()
    if reason:
        return reason
    for tool, package in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
                          ("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install {package})"
    return None


def ensure_rootfs() -> Path:
    """The cached host image; built once by debootstrap (about 80 s, 330 MB)."""
    if (ROOTFS / ".complete").exists():
        return ROOTFS
    ROOTFS.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="rootfs-", dir=ROOTFS.parent))
    try:
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                        str(building), MIRROR], check=True, capture_output=True, timeout=1200)
        _prepare_image(building)
        (building / ".complete").touch()
        if (ROOTFS / ".complete").exists():  # another run finished first
            shutil.rmtree(building)
        else:
            shutil.rmtree(ROOTFS, ignore_errors=True)
            building.rename(ROOTFS)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return ROOTFS


def _prepare_image(root: Path) -> None:
    """sshd on, root by key only, nothing at boot that waits for a network or a clock."""
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)
    (root / "etc/ssh/sshd_config.d/fleet-test.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n")
    wants = root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    ssh_unit = wants / "ssh.service"  # a link to an absolute path: it resolves only inside
    if not ssh_unit.is_symlink():
        ssh_unit.symlink_to("/lib/systemd/system/ssh.service")
    for unit in ("apt-daily.timer", "apt-daily-upgrade.timer", "systemd-networkd-wait-online.service",
                 "e2scrub_all.timer", "fstrim.timer"):
        (root / "etc/systemd/system" / unit).unlink(missing_ok=True)
        (root / "etc/systemd/system" / unit).symlink_to("/dev/null")
    (root / "etc/machine-id").write_text("")  # a fresh one per boot: each host its own


class Lab:
    def __init__(self, hosts: int = 3) -> None:
        self.net = netns.Network(hosts=hosts + 1)  # the last one is the controller
        self.workdir = Path(tempfile.mkdtemp(prefix="fleet-lab-"))
        self.key = self.workdir / "id_ed25519"
        self.hosts: list[netns.Host] = []
        self.controller: netns.Host | None = None
        self._containers: list[subprocess.Popen] = []

    # -- set-up -------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        rootfs = ensure_rootfs()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        authorized = self.workdir / "authorized_keys"
        authorized.write_text(self.key.with_suffix(".pub").read_text())
        authorized.chmod(0o600)
        self.net.create()
        *self.hosts, self.controller = [self.net.host(i) for i in range(1, len(self.net.hosts) + 1)]
        for number, host in enumerate(self.hosts, 1):
            host.name = f"fleet-h{number}"
            self._boot(rootfs, host, authorized)
        deadline = time.monotonic() + BOOT_TIMEOUT
        for host in self.hosts:
            self._wait_booted(host, deadline)

    def _boot(self, rootfs: Path, host: netns.Host, authorized: Path) -> None:
        hostname = self.workdir / f"{host.name}.hostname"
        hostname.write_text(host.name + "\n")
        log = open(self.workdir / f"{host.name}.console", "wb")
        self._containers.append(subprocess.Popen(
            ["systemd-nspawn", "-D", str(rootfs), "-b", "--register=no", "--keep-unit", "--volatile=overlay",
             "--console=passive", f"--machine={host.name}", f"--network-namespace-path=/run/netns/{host.ns}",
             f"--bind-ro={hostname}:/etc/hostname", f"--bind-ro={authorized}:/root/.ssh/authorized_keys"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        log.close()

    def _wait_booted(self, host: netns.Host, deadline: float) -> None:
        while True:
            done = self.ssh(host, "systemctl is-system-running --wait", timeout=max(5.0, deadline - time.monotonic()),
                            check=False)
            state = done.stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                console = (self.workdir / f"{host.name}.console").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{host.name} did not boot: {state!r} {done.stderr[-500:]}\n{console}")
            time.sleep(0.5)

    # -- use -----------------------------------------------------------------------------

    def controller_run(self, command: list[str], env: dict[str, str] | None = None, cwd: Path | None = None,
                       timeout: float = 300.0) -> subprocess.CompletedProcess:
        """A command on the controller (in its network namespace)."""
        assert self.controller is not None
        return subprocess.run(["ip", "netns", "exec", self.controller.ns, *command], env=env, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)

    def controller_call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in a thread inside the controller's namespace (threads it starts stay there)."""
        assert self.controller is not None
        return self.controller.call(fn, *args)

    def ssh_command(self, host: netns.Host, command: str) -> list[str]:
        return ["ssh", "-i", str(self.key), *SSH_OPTIONS, f"root@{host.address}", command]

    def ssh(self, host: netns.Host, command: str, timeout: float = 60.0, check: bool = True
            ) -> subprocess.CompletedProcess:
        done = self.controller_run(self.ssh_command(host, command), timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"ssh {host.name} {command!r}: exit {done.returncode}: {done.stderr[-1000:]}")
        return done

    def write_inventory(self, path: Path, groups: dict[str, list[netns.Host]]) -> None:
        ssh_args = " ".join(SSH_OPTIONS)
        lines = []
        for group, members in groups.items():
            lines.append(f"[{group}]")
            lines += [f"{h.name} ansible_host={h.address} ansible_user=root "
                      f"ansible_ssh_private_key_file={self.key} ansible_ssh_common_args='{ssh_args}' "
                      f"ansible_python_interpreter=/usr/bin/python3" for h in members]
            lines.append("")
        path.write_text("\n".join(lines))

    # -- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop every container (systemd shuts down on SIGTERM to nspawn), then the network."""
        for container in self._containers:
            if container.poll() is None:
                os.killpg(container.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for container in self._containers:
            try:
                container.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(container.pid, signal.SIGKILL)
                container.wait()
        self._containers.clear()
        self.net.destroy()
        shutil.rmtree(self.workdir, ignore_errors=True)


if __name__ == "__main__":
    started = time.monotonic()
    ensure_rootfs()
    print(f"rootfs ready in {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    with Lab() as lab:
        print(f"{len(lab.hosts)} hosts booted in {time.monotonic() - started:.1f} s")
        for host in lab.hosts:
            print(host.name, host.address, lab.ssh(host, "hostname; systemctl is-system-running").stdout.split())
