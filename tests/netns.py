"""Separate hosts simulated on one machine: a Linux network namespace per host, all on one bridge.

Each host is a network namespace with one interface (eth0, 10.77.0.x/24) whose veth peer is a port
of a bridge living in a namespace of its own: nothing is added to the machine's own network, and two
runs at once do not see each other. A host's processes also get a hostname and a /dev/shm of their
own (UTS and mount namespaces, as a separate machine has), so nothing reaches them but through their
address. Needs root (CI runs as root) and iproute2; remove() kills every process in the namespaces
and deletes them (their interfaces go with them).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

SUBNET = "10.77.0"
# a host's own hostname and /dev/shm, then the command (hostname, then argv)
HOST_SHELL = 'hostname "$0" && mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$@"'


def missing_requirements() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "simulating hosts with network namespaces needs root (CI runs the suite as root)"
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            return f"simulating hosts needs `{tool}` (iproute2, util-linux)"
    return None


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def _ip(*args: str) -> None:
    _run(["ip", *args])


class Hosts:
    """Named hosts, each with its address; create() them, start processes on them, remove() them."""

    def __init__(self, names: list[str]):
        tag = uuid.uuid4().hex[:6]
        self.names = list(names)
        self.switch = f"tba-{tag}-switch"
        self.netns = {name: f"tba-{tag}-{name}" for name in names}
        self.address = {name: f"{SUBNET}.{i + 2}" for i, name in enumerate(names)}
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Hosts:
        try:
            self.create()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i, name in enumerate(self.names):
            ns = self.netns[name]
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"port{i}", "netns", self.switch)
            _ip("-n", self.switch, "link", "set", f"port{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{self.address[name]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def command(self, host: str, argv: list[str]) -> list[str]:
        """argv as run on host: in its network namespace, with its own hostname and /dev/shm."""
        wrap = ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", HOST_SHELL, host]
        return ["ip", "netns", "exec", self.netns[host], *wrap, *argv]

    def popen(self, host: str, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        """Start argv on host with exactly env (nothing is inherited), output appended to log."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(host, argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        self.processes.append(proc)
        return proc

    def run(self, host: str, argv: list[str], env: dict[str, str], timeout_s: float) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(host, argv), env=env, capture_output=True, text=True, timeout=timeout_s)

    def pids(self, host: str) -> list[int]:
        """Every process in host's network namespace (whatever started it)."""
        done = subprocess.run(["ip", "netns", "pids", self.netns[host]], capture_output=True, text=True)
        return [int(p) for p in done.stdout.split()]

    def kill(self, host: str) -> list[int]:
        """kill -9 every process of host, as a machine that loses power; returns their pids."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.pids(host) and time.monotonic() < deadline:
            for proc in self.processes:
                proc.poll()  # reap our own children
            time.sleep(0.05)
        return pids

    # Network faults, each undone by its pair. A cut is a pulled cable: the host's port on the bridge goes
    # down, the host keeps its address and its connections, and TCP retransmits into the void until healed.
    def cut(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", f"port{self.names.index(host)}", "down")

    def heal(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", f"port{self.names.index(host)}", "up")

    def blackhole(self, host: str, peer: str) -> None:
        """host's packets to peer vanish (peer still reaches host, and everyone else)."""
        _ip("-n", self.netns[host], "route", "add", "blackhole", f"{self.address[peer]}/32")

    def unblackhole(self, host: str, peer: str) -> None:
        _ip("-n", self.netns[host], "route", "del", "blackhole", f"{self.address[peer]}/32")

    def throttle(self, host: str, rate: str = "1mbit", burst: str = "32kbit", latency: str = "400ms") -> None:
        """Everything host sends goes through a token bucket of rate (tbf: this kernel has no netem)."""
        tbf = ["qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        _run(["ip", "netns", "exec", self.netns[host], "tc", *tbf])

    def unthrottle(self, host: str) -> None:
        _run(["ip", "netns", "exec", self.netns[host], "tc", "qdisc", "del", "dev", "eth0", "root"])

    def remove(self) -> None:
        """Kill whatever still runs on the hosts and delete every namespace (idempotent)."""
        existing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for host in self.names:
            if self.netns[host] in existing:
                self.kill(host)
        for proc in self.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in [*self.netns.values(), self.switch]:
            if ns in existing:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True)
