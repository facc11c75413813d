"""Many hosts on one machine: Linux network namespaces joined by veth pairs to a bridge in a hub namespace.

    with NetLab(4) as lab:                       # p2pf-<pid>-<token>-hub, ...-h0 .. -h3
        lab.hosts[0].ip                          # "10.77.0.1"
        lab.popen(lab.hosts[0], ["python", "-m", "p2pfed", "peer", "peer0.toml"])
    # every process it started is killed and every namespace deleted, also on Ctrl-C or an exception

Host k gets 10.77.0.(k+1) on its `eth0`; the hub's bridge holds 10.77.0.254. Nothing is added to the root
namespace: each veth pair is created inside the hub with its other end moved straight into its host, so test
traffic stays inside namespaces the lab created (and as the subnets live in separate stacks, parallel labs
never collide). Names carry the creating process's pid, so `remove_stale_namespaces` can delete what a killed
run left behind without touching a live run's.

With `netem=(latency_s, loss)` the kernel delays and drops on every host's link (where it has sch_netem).
With `intercept=True` the hosts reach each other only through the hub, where a transparent relay
(p2pfed.netlab.relay) can sit: each host keeps its address as a /32 and routes the subnet via the hub, and the
hub treats every subnet address arriving on the bridge as local (a `local` route in its own table, selected by
`iif br0`), so a relay socket with IP_TRANSPARENT bound to 10.77.0.2:4001 accepts what host 0 sends to host 1's
real address and port. The relay's own connections leave the hub by the main table and reach the real host.
No NAT, no iptables: the peers dial, advertise and learn the addresses they listen on, and still pass the relay.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "p2pf-"
SUBNET = "10.77.0"  # a /24: hosts .1 .. .N, the hub .254
HUB_HOST = 254
INTERCEPT_TABLE = 100
IP_TIMEOUT_S = 10.0
KILL_WAIT_S = 5.0


class NetLabError(RuntimeError):
    """A namespace, link or address could not be made; the message names the `ip` command and its error."""


@dataclass(frozen=True)
class Host:
    namespace: str
    ip: str


def can_create_namespaces() -> str | None:
    """None when this process can build a lab here; otherwise why not, in one line (for pytest.skip)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
    except NetLabError as error:
        return f"cannot create a network namespace: {error}"
    try:
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _ip("-n", probe, "link", "add", "b0", "type", "bridge")
    except NetLabError as error:
        return f"cannot create veth pairs or bridges: {error}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def netem_missing() -> str | None:
    """None when `tc ... netem` works here (kernel module sch_netem); otherwise why not, in one line."""
    if shutil.which("tc") is None:
        return "the `tc` command (iproute2) is not installed"
    probe = f"{PREFIX}{os.getpid()}-netem{secrets.token_hex(2)}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "set", "lo", "up")
        _tc(probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
    except NetLabError as error:
        return f"no netem: {error}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def remove_stale_namespaces() -> list[str]:
    """Delete the namespaces of labs whose process is gone (a run killed with SIGKILL); their names."""
    removed = []
    for name in _namespaces():
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _kill_inside(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    return removed


@dataclass
class NetLab:
    """`num_hosts` namespaces on one bridge; a context manager that always tears down what it made."""

    num_hosts: int
    intercept: bool = False
    # (latency_s, loss): netem on every host's egress, so each direction of a path is delayed once, by the
    # kernel; only where netem_missing() is None. Otherwise the relay (p2pfed.netlab.relay) does it.
    netem: tuple[float, float] | None = None
    subnet: str = SUBNET
    prefix: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}-")
    hosts: list[Host] = field(default_factory=list, init=False)
    hub: Host | None = field(default=None, init=False)
    _processes: list[subprocess.Popen] = field(default_factory=list, init=False, repr=False)
    _made: list[str] = field(default_factory=list, init=False, repr=False)

    def __enter__(self) -> "NetLab":
        if not 1 <= self.num_hosts <= HUB_HOST - 1:
            raise ValueError(f"num_hosts: 1 .. {HUB_HOST - 1}, got {self.num_hosts}")
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _build(self) -> None:
        hub = self._namespace("hub")
        self.hub = Host(hub, f"{self.subnet}.{HUB_HOST}")
        _ip("-n", hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", hub, "addr", "add", f"{self.hub.ip}/24", "dev", "br0")
        _ip("-n", hub, "link", "set", "br0", "up")
        for k in range(self.num_hosts):
            host = Host(self._namespace(f"h{k}"), f"{self.subnet}.{k + 1}")
            # Made inside the hub, the far end moved at once into the host: the root namespace never sees it.
            _ip("-n", hub, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", host.namespace)
            _ip("-n", hub, "link", "set", f"v{k}", "master", "br0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.ip}/{32 if self.intercept else 24}", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            if self.intercept:
                _ip("-n", host.namespace, "route", "add", f"{self.hub.ip}/32", "dev", "eth0", "scope", "link")
                _ip("-n", host.namespace, "route", "add", f"{self.subnet}.0/24", "via", self.hub.ip, "dev", "eth0")
            if self.netem is not None:
                latency_s, loss = self.netem
                _tc(host.namespace, "qdisc", "add", "dev", "eth0", "root", "netem", "delay",
                    f"{latency_s * 1000:g}ms", "loss", f"{loss * 100:g}%")
            self.hosts.append(host)
        if self.intercept:
            _ip("-n", hub, "rule", "add", "iif", "br0", "to", f"{self.subnet}.0/24", "lookup",
                str(INTERCEPT_TABLE), "pref", "100")
            _ip("-n", hub, "route", "add", "local", f"{self.subnet}.0/24", "dev", "lo", "table", str(INTERCEPT_TABLE))

    def _namespace(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        _ip("netns", "add", name)
        self._made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def command(self, host: Host, argv: Sequence[str]) -> list[str]:
        """`argv` run inside `host`'s namespace (`ip netns exec` execs it: the process is the command itself)."""
        return ["ip", "netns", "exec", host.namespace, *argv]

    def popen(self, host: Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start `argv` in `host`'s namespace in its own process group; the lab kills it at the end if it still
        runs."""
        process = subprocess.Popen(self.command(host, argv), start_new_session=True, **kwargs)
        self._processes.append(process)
        return process

    def run(self, host: Host, argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run `argv` in `host`'s namespace to the end (bounded by `timeout`), output captured as text."""
        return subprocess.run(self.command(host, argv), capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        """Kill what the lab started, then delete its namespaces (their veths and the bridge go with them)."""
        for process in self._processes:
            _kill_group(process)
        self._processes.clear()
        for name in reversed(self._made):
            _kill_inside(name)  # anything else started inside (by hand, or a child that left its group)
            _ip("netns", "del", name, check=False)
        self._made.clear()


def _kill_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        pass
    # Its output pipes are left to whoever reads them: closing one under a reading thread would break that read.


def _kill_inside(namespace: str) -> None:
    pids = _ip("netns", "pids", namespace, check=False).split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _namespaces() -> list[str]:
    listed = _ip("netns", "list", check=False)
    return [line.split()[0] for line in listed.splitlines() if line.startswith(PREFIX)]


def _ip(*args: str, check: bool = True) -> str:
    return _run(["ip", *args], check)


def _tc(namespace: str, *args: str) -> str:
    return _run(["tc", "-n", namespace, *args], check=True)


def _run(command: list[str], check: bool) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        if check:
            raise NetLabError(f"{' '.join(command)}: {error}") from error
        return ""
    if check and done.returncode != 0:
        raise NetLabError(f"{' '.join(command)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout
