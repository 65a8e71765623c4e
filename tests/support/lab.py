"""A lab of real booted hosts (systemd-nspawn containers with sshd) for end-to-end Ansible tests.

    with Lab(hosts=3) as lab:            # fleet-m1, fleet-n1, fleet-n2 at 198.18.0.1..3
        lab.write_inventory(path, {"fleet_master": lab.hosts[:1], "fleet_nodes": lab.hosts[1:]})
        lab.controller_run(["ansible-playbook", "-i", str(path), "site.yml"], cwd=..., timeout=900)
        lab.ssh(lab.hosts[0], "systemctl is-system-running")

Each host is a systemd-nspawn container booted with systemd as PID 1 and
sshd, from one cached Debian bookworm image (`ensure_rootfs`) mounted with
`--volatile=overlay`: whatever a test changes is gone with the container.

The network is tests/support/netns.py's: a bridge in a namespace of its own,
one namespace per host, 198.18.0.0/24, a multicast route, no default route,
nothing in the root namespace. One more namespace on the bridge is the
controller: ssh and ansible-playbook run there (`controller_run`), so the
machine's real interfaces never see a packet of the lab.

Everything a lab makes (key pair, ssh config, known_hosts, ssh control
sockets, per-host files, console logs) lives in one temp dir, and namespace
names carry a random token, so labs can run side by side.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from tests.support import netns

T = TypeVar("T")

# Bump the suffix whenever the recipe below changes: an existing image is reused as it is.
# (v1: one machine id for every host, no /etc/hosts; v2: no python3-setuptools.)
ROOTFS = Path("/var/cache/fleet-test/rootfs-bookworm-v3")
MIRROR = "http://deb.debian.org/debian"
# The hosts have no package index: everything the role installs with apt must be here already.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv", "python3-apt",
            "python3-packaging", "python3-setuptools", "iproute2", "procps", "mongrel2-core", "ca-certificates",
            "netbase")  # /etc/services and /etc/protocols, which getservbyname() and friends read
# Timers that would start apt or disk jobs during a test, and a wait for a network that never comes.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "e2scrub_all.timer",
                "e2scrub_reap.service", "fstrim.timer", "systemd-networkd-wait-online.service")
TOOLS = (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
         ("systemctl", "systemd"), ("ssh", "openssh-client"), ("ssh-keygen", "openssh-client"))
BOOT_TIMEOUT = 120.0
STOP_TIMEOUT = 10.0


def unavailable_reason() -> str | None:
    """None if a lab can be built here, else why not (a skip reason)."""
    reason = netns.unavailable_reason()  # Linux, root, `ip netns add` works
    if reason:
        return reason
    for tool, package in TOOLS:
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install {package})"
    return None


# -- the host image ---------------------------------------------------------------------------


def ensure_rootfs(path: Path = ROOTFS) -> Path:
    """The host image at `path`, made by debootstrap unless it is there already.

    Built in a temp dir beside it and renamed into place when complete, so an
    existing `path` is always a whole image; a lock keeps two runs from
    building it twice.
    """
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{path.name}.build-lock"):
        if path.is_dir():  # another run built it while we waited
            return path
        for stale in path.parent.glob(f"{path.name}.building-*"):  # from a build that was killed
            _remove_tree(stale)
        building = Path(tempfile.mkdtemp(prefix=f"{path.name}.building-", dir=path.parent))
        try:
            _debootstrap(building)
            _prepare_image(building)
            building.rename(path)
        except BaseException:
            _remove_tree(building)
            raise
    return path


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _debootstrap(root: Path) -> None:
    done = subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", "bookworm",
                           str(root), MIRROR], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"debootstrap failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")


def _prepare_image(root: Path) -> None:
    """sshd on with root login by key, and nothing at boot that waits for a network or starts jobs."""
    root.chmod(0o755)  # mkdtemp made it 0700; it becomes the containers' /
    etc = root / "etc"
    (etc / "ssh/sshd_config.d/fleet-lab.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n")
    (root / "root/.ssh").mkdir(mode=0o700, exist_ok=True)  # each lab binds its authorized_keys in here
    _systemctl(root, "enable", "ssh.service")
    _systemctl(root, "mask", *MASKED_UNITS)
    # Empty, and dbus's copy a link to it (systemd would take that one): each boot gets a machine id
    # of its own (nspawn's random container UUID), as real hosts have; fleet derives node ids from it.
    (etc / "machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    (root / "var/lib/dbus/machine-id").symlink_to("/etc/machine-id")
    (etc / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
    (etc / "resolv.conf").write_text("# no DNS in the test lab\n")  # debootstrap copied the builder's
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):  # installed already: 57 MB less
        deb.unlink()


def _systemctl(root: Path, *args: str) -> None:
    # --root edits the image's unit links offline; nothing runs.
    subprocess.run(["systemctl", f"--root={root}", "--quiet", *args], check=True, capture_output=True, timeout=60)


def _cgroup_roots() -> list[Path]:
    """The cgroup hierarchies systemd keeps its tree in (and so nspawn and the containers' systemd):
    the unified one, and name=systemd on hosts with the v1 or hybrid layout."""
    roots = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, mountpoint, fstype, options, *_ = line.split()
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
            roots.append(Path(mountpoint))
    return roots


def _remove_tree(path: Path) -> None:
    """rmtree, after unmounting what a killed debootstrap may have left mounted inside (/proc, /sys)."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "--lazy", mount], capture_output=True, timeout=30)
    shutil.rmtree(path, ignore_errors=True)


# -- the lab ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabHost:
    """A booted container: its hostname (also its inventory name), address and network namespace."""

    name: str
    address: str
    ns: str


class Lab:
    """`hosts` booted containers (fleet-m1, fleet-n1, ...) and a controller namespace on one bridge.

    Use it as a context manager: the teardown runs however the block ends.
    """

    def __init__(self, hosts: int = 3, rootfs: Path | None = None) -> None:
        if hosts < 1:
            raise ValueError("a lab needs at least one host")
        self.rootfs = rootfs
        self.net = netns.Network(hosts=hosts + 1)  # the last namespace is the controller
        *host_nets, self._controller = self.net.hosts
        names = ["fleet-m1"] + [f"fleet-n{i}" for i in range(1, hosts)]
        self.hosts = [LabHost(name, h.address, h.ns) for name, h in zip(names, host_nets)]
        self.controller_ns = self._controller.ns
        self.controller_address = self._controller.address
        self.workdir = Path(tempfile.mkdtemp(prefix=f"fleet-lab-{self.net.token}-"))
        self.private_key = self.workdir / "id_ed25519"
        self.ssh_config = self.workdir / "ssh_config"
        self._control_path = f"{self.workdir}/cp-%C"
        self._cgroups = [root / f"fleet-lab-{self.net.token}" for root in _cgroup_roots()]
        self._containers: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> Lab:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        problems = self.close()
        if problems and exc_type is None:  # never hide the exception that ended the block
            raise RuntimeError("lab teardown:\n" + "\n".join(problems))

    # -- set-up ---------------------------------------------------------------------------------

    def _start(self) -> None:
        rootfs = self.rootfs or ensure_rootfs()
        authorized_keys = self._make_keys()
        self._write_ssh_config()
        self.net.create()
        for host in self.hosts:
            self._containers[host.name] = self._boot(rootfs, host, authorized_keys)
        deadline = time.monotonic() + BOOT_TIMEOUT
        for host in self.hosts:
            self._wait_ready(host, deadline)

    def _make_keys(self) -> Path:
        """A fresh key pair for this lab; returns the authorized_keys file the hosts get."""
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"fleet-lab-{self.net.token}",
                        "-f", str(self.private_key)], check=True, capture_output=True, timeout=30)
        authorized_keys = self.workdir / "authorized_keys"
        shutil.copyfile(self.private_key.with_suffix(".pub"), authorized_keys)
        authorized_keys.chmod(0o600)  # sshd's StrictModes
        return authorized_keys

    def _write_ssh_config(self) -> None:
        """No prompts, no files outside the temp dir; `ssh -F ssh_config fleet-m1` works by name.

        Connections are multiplexed for speed; the masters run in the controller
        namespace, where the teardown kills every process.
        """
        lines = []
        for host in self.hosts:
            lines += [f"Host {host.name}", f"    HostName {host.address}"]
        lines += ["Host *", "    User root", f"    IdentityFile {self.private_key}", "    IdentitiesOnly yes",
                  "    StrictHostKeyChecking no", f"    UserKnownHostsFile {self.workdir / 'known_hosts'}",
                  "    GlobalKnownHostsFile /dev/null", "    BatchMode yes", "    ConnectTimeout 5",
                  "    LogLevel ERROR", "    ControlMaster auto", "    ControlPersist 60s",
                  f"    ControlPath {self._control_path}"]
        self.ssh_config.write_text("\n".join(lines) + "\n")

    def _boot(self, rootfs: Path, host: LabHost, authorized_keys: Path) -> subprocess.Popen:
        # The image's own /etc/hostname would win over --hostname, so bind a per-host file.
        hostname = self.workdir / f"{host.name}.hostname"
        hostname.write_text(f"{host.name}\n")
        # With --keep-unit the container's cgroup tree goes below the cgroup nspawn starts in. Without
        # a cgroup of its own each, every container on the machine would share one tree, and their
        # systemds would remove and kill each other's unit cgroups ("Failed to attach to cgroup").
        cgroups = [top / host.name for top in self._cgroups]
        for cgroup in cgroups:
            cgroup.mkdir(parents=True)
        enter_cgroups = "".join(f"echo $$ > {shlex.quote(str(cg / 'cgroup.procs'))} && " for cg in cgroups)
        nspawn = ["systemd-nspawn", "-D", str(rootfs), "-b", "--register=no", "--keep-unit", "--volatile=overlay",
                  "--console=passive", f"--machine={host.name}", f"--network-namespace-path=/run/netns/{host.ns}",
                  "--resolv-conf=off",  # the image's (no DNS), not a copy of this machine's
                  f"--bind-ro={hostname}:/etc/hostname", f"--bind-ro={authorized_keys}:/root/.ssh/authorized_keys"]
        with open(self._console(host), "wb") as console:
            return subprocess.Popen(["sh", "-c", enter_cgroups + 'exec "$@"', "sh", *nspawn], stdin=subprocess.DEVNULL,
                                    stdout=console, stderr=subprocess.STDOUT, start_new_session=True)

    def _console(self, host: LabHost) -> Path:
        return self.workdir / f"{host.name}.console"

    def _wait_ready(self, host: LabHost, deadline: float) -> None:
        """Until `systemctl is-system-running --wait` says running or degraded over ssh."""
        while True:
            try:
                answer = self.ssh(host, "systemctl is-system-running --wait", check=False,
                                  timeout=max(deadline - time.monotonic(), 1.0))
                state = f"{answer.stdout.strip()} {answer.stderr.strip()}".strip()
            except subprocess.TimeoutExpired:
                state = "no answer"
            if state in ("running", "degraded"):
                return
            container = self._containers[host.name]
            if container.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {container.returncode}" if container.poll() is not None
                       else f"not ready after {BOOT_TIMEOUT:.0f} s")
                console = self._console(host).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{host.name} {why}; last answer: {state!r}\nconsole:\n{console}")
            time.sleep(0.2)

    # -- use ------------------------------------------------------------------------------------

    def controller_run(self, cmd: list[str], env: dict[str, str] | None = None, timeout: float = 300.0,
                       cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run cmd in the controller's namespace and wait; output captured as text.

        `env` adds to (and overrides) this process's environment.
        """
        return subprocess.run(["ip", "netns", "exec", self.controller_ns, *cmd], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout, cwd=cwd,
                              env=None if env is None else {**os.environ, **env})

    def controller_call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) in a thread inside the controller's namespace: sockets it opens are there."""
        return self._controller.call(fn, *args, **kwargs)

    def ssh(self, host: LabHost, cmd: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell command line on host as root, from the controller; raise on failure if check."""
        done = self.controller_run(["ssh", "-F", str(self.ssh_config), host.address, cmd], timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"ssh {host.name} {cmd!r}: exit {done.returncode}\n{done.stdout[-2000:]}"
                               f"{done.stderr[-2000:]}")
        return done

    def write_inventory(self, path: Path, groups: dict[str, list[LabHost]]) -> None:
        """An INI inventory of `groups`; the connection settings are host variables, which beat
        any group_vars a playbook brings."""
        # Repeated on the command line: Ansible adds a ControlPath of its own (in ~/.ansible/cp,
        # the same for every lab's 198.18.0.1) unless it sees one there.
        common_args = f"-F {self.ssh_config} -o ControlPath={self._control_path}"
        connection = (f"ansible_user=root ansible_ssh_private_key_file={self.private_key} "
                      f"ansible_ssh_common_args='{common_args}' ansible_python_interpreter=/usr/bin/python3")
        lines = []
        for group, members in groups.items():
            lines += [f"[{group}]", *(f"{h.name} ansible_host={h.address} {connection}" for h in members), ""]
        path.write_text("\n".join(lines))

    # -- teardown -------------------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop the containers, delete the network (killing whatever still runs in it: ssh
        masters, stragglers), the cgroups and the temp dir. Never raises; returns what went wrong
        or was left."""
        problems: list[str] = []
        try:
            problems += self._stop_containers()
        finally:  # even on a second Ctrl-C: the namespaces, cgroups and the temp dir must go
            try:
                problems += self.net.destroy()
            finally:
                problems += self._remove_cgroups()
                shutil.rmtree(self.workdir, ignore_errors=True)
        return problems + self.leftovers()

    def _stop_containers(self) -> list[str]:
        """SIGTERM to nspawn makes the container's systemd shut down cleanly; SIGKILL after STOP_TIMEOUT."""
        problems = []
        for container in self._containers.values():
            if container.poll() is None:
                container.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        for name, container in self._containers.items():
            try:
                container.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                problems.append(f"{name} still running {STOP_TIMEOUT:.0f} s after SIGTERM; killed")
                container.kill()  # what it leaves in its namespace goes with the network
                container.wait()
        self._containers.clear()
        return problems

    def _remove_cgroups(self) -> list[str]:
        problems = []
        for top in self._cgroups:
            for cgroup, _, _ in os.walk(top, topdown=False):  # a cgroup goes only when it has no children
                try:
                    os.rmdir(cgroup)
                except OSError as error:
                    problems.append(f"rmdir {cgroup}: {error.strerror}")
        return problems

    def leftovers(self) -> list[str]:
        """This lab's namespaces and cgroups still there, and processes (nspawn, ssh) still naming
        its temp dir."""
        left = [f"namespace {ns}" for ns in netns.leftover_namespaces(self.net.token)]
        left += [f"cgroup {top}" for top in self._cgroups if top.exists()]
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # not a process, or gone meanwhile
                continue
            if str(self.workdir) in cmdline:
                left.append(f"process {proc.name}: {cmdline.strip()}")
        return left


# -- self-check: python3 tests/deploy/lab.py [ROOTFS] ---------------------------------------------

_RECEIVER = """
import socket, sys
group, port, iface = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind((group, port))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(iface))
sock.settimeout(10)
print(sock.recvfrom(100)[0].decode(), flush=True)
"""

_SENDER = """
import socket, sys, time
group, port, iface, text = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(iface))
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
for _ in range(50):  # until the receiver (started alongside) has surely joined
    sock.sendto(text.encode(), (group, port))
    time.sleep(0.1)
"""

_CONNECT = """
import socket, sys
for address in sys.argv[1:]:
    socket.create_connection((address, 22), timeout=3).close()
"""


def _python(script: str, *args: str) -> str:
    return " ".join(shlex.quote(part) for part in ("python3", "-c", script, *args))


def _check_hosts(lab: Lab) -> None:
    """Each host: its own name and machine id, booted, no default route (nothing can leave the bridge)."""
    machine_ids = set()
    for host in lab.hosts:
        answer = lab.ssh(host, "hostname; systemctl is-system-running; cat /etc/machine-id; "
                               "ip route show default | wc -l", check=False)
        name, state, machine_id, default_routes = answer.stdout.split()
        failed = lab.ssh(host, "systemctl list-units --failed --plain --no-legend").stdout.splitlines()
        print(f"  {host.name} {host.address} ns={host.ns}: hostname {name}, {state}",
              *[f"failed: {unit.split()[0]}" for unit in failed if unit.strip()])
        assert name == host.name and state in ("running", "degraded") and default_routes == "0", answer.stdout
        machine_ids.add(machine_id)
    assert len(machine_ids) == len(lab.hosts), "the hosts share a machine id"


def _check_reachability(lab: Lab) -> None:
    for host in lab.hosts:
        others = [h.address for h in lab.hosts if h != host]
        lab.ssh(host, _python(_CONNECT, *others))
    print(f"every host reaches every other one's sshd over the bridge ({len(lab.hosts)} hosts)")


def _check_multicast(lab: Lab, receiver: LabHost, sender: LabHost) -> None:
    group = f"239.255.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    port, text = "4242", secrets.token_hex(4)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        heard = pool.submit(lab.ssh, receiver, _python(_RECEIVER, group, port, receiver.address))
        lab.ssh(sender, _python(_SENDER, group, port, sender.address, text))
        got = heard.result().stdout.strip()
    assert got == text, (got, text)
    print(f"multicast {group}:{port} (TTL 1) from {sender.name} reached {receiver.name}")


def _self_check(rootfs_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        sys.exit(f"lab unavailable: {reason}")
    started, cached = time.monotonic(), rootfs_path.is_dir()
    rootfs = ensure_rootfs(rootfs_path)
    print(f"rootfs {rootfs}: {'reused' if cached else 'built'} in {time.monotonic() - started:.1f} s")
    lab = Lab(hosts=3, rootfs=rootfs)
    started = time.monotonic()
    with lab:
        print(f"{len(lab.hosts)} hosts booted and answering ssh in {time.monotonic() - started:.1f} s "
              f"(controller namespace {lab.controller_ns} at {lab.controller_address})")
        _check_hosts(lab)
        _check_reachability(lab)
        _check_multicast(lab, lab.hosts[0], lab.hosts[1])
        stopping = time.monotonic()
    print(f"teardown in {time.monotonic() - stopping:.1f} s; left behind: {lab.leftovers() or 'nothing'}")
    assert not lab.workdir.exists() and not lab.leftovers()


if __name__ == "__main__":
    _self_check(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOTFS)
