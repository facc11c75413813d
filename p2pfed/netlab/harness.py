"""A swarm of `p2pfed peer` processes, one per network namespace, from the files `p2pfed init` writes.

    run = run_swarm(4, Path("lab"), link=Link(latency_s=0.02), overrides=["training.rounds=2"])
    run.results["peer0"].rounds        # what each peer wrote to its state folder
    run.mean_round_s()                  # wall time per round, from when each round's line appeared

The peer files come from `p2pfed init N --out DIR --listen-host IP ...` (one address per namespace), and with
`swarm="NAME"` from `p2pfed init ... --swarm NAME` (membership mode: one bootstrap address, the topology derived
from the members) instead of neighbour lists. With a `link` the namespaces reach each other only through a relay
in the hub (p2pfed.netlab.relay) that delays and loses on every route, the peers keeping their real addresses;
or, with `emulate="netem"` where the kernel has it, netem on every host's link.
Every process is bounded by `timeout_s` and killed at the end; every namespace is deleted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from p2pfed.netlab.lab import NetLab
from p2pfed.netlab.relay import Link
from p2pfed.records import PeerResult

INIT_TIMEOUT_S = 120.0
RELAY_READY_S = 30.0
ROUND_LINE = re.compile(r"^(peer\d+): round (\d+), ")


class LabRunError(RuntimeError):
    """A peer failed or ran out of time; the message carries the tail of each failing peer's log."""


@dataclass
class Output:
    """A process's output lines, read by a thread as they come: written to a log file and kept with the time
    each arrived, so that a caller can wait for a line instead of sleeping."""

    process: subprocess.Popen
    log_path: Path
    lines: list[tuple[float, str]] = field(default_factory=list)
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _thread: threading.Thread | None = None
    _ended: bool = False

    def start(self) -> "Output":
        self._thread = threading.Thread(target=self._read, daemon=True, name=f"output {self.log_path.name}")
        self._thread.start()
        return self

    def _read(self) -> None:
        with self.process.stdout as stream, open(self.log_path, "w", encoding="utf-8") as log:
            for line in stream:
                log.write(line)
                log.flush()
                with self._changed:
                    self.lines.append((time.monotonic(), line.rstrip("\n")))
                    self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> bool:
        """Whether a line matching `pattern` arrived within `timeout` (False as soon as the output ended)."""
        regex = re.compile(pattern)

        def seen() -> bool:
            return any(regex.search(line) for _, line in self.lines)

        with self._changed:
            self._changed.wait_for(lambda: seen() or self._ended, timeout)
            return seen()

    def join(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def tail(self, chars: int = 2000) -> str:
        return "\n".join(line for _, line in self.lines)[-chars:]


@dataclass
class LabRun:
    folder: Path
    paths: list[Path]  # the peer files, peer0.toml ...
    exit_codes: dict[str, int]
    results: dict[str, PeerResult]
    round_times: dict[str, dict[int, float]]  # peer -> round -> time.monotonic() when its round line appeared
    relay_counts: str | None  # the relay's count line; None without a relay
    seconds: float  # from the first peer's start to the last one's exit

    def mean_round_s(self, first: int = 1) -> float:
        """Mean wall time of a round after round `first`, over peers: (t(last) - t(first)) / rounds between.
        Start-up, imports and waiting for neighbours fall before round 1 ends, so they do not count."""
        spans = []
        for times in self.round_times.values():
            last = max(times)
            if last > first and first in times:
                spans.append((times[last] - times[first]) / (last - first))
        if not spans:
            raise ValueError(f"no peer printed a round after round {first}")
        return sum(spans) / len(spans)


def init_peer_files(out: Path, hosts: Sequence[str], overrides: Sequence[str] = (), swarm: str | None = None,
                    experiment: str | None = None, python: str = sys.executable) -> list[Path]:
    """`p2pfed init len(hosts) --out OUT --listen-host H ...`: peer K listens on hosts[K]; the peer files."""
    command = [python, "-m", "p2pfed", "init", str(len(hosts)), "--out", str(out)]
    command += [a for host in hosts for a in ("--listen-host", host)]
    command += [a for o in overrides for a in ("--set", o)]
    if swarm:
        command += ["--swarm", swarm]  # membership mode: a bootstrap address instead of neighbour lists
    if experiment:
        command.append(experiment)
    done = subprocess.run(command, capture_output=True, text=True, timeout=INIT_TIMEOUT_S)
    if done.returncode != 0:
        raise LabRunError(f"p2pfed init failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
    return [out / f"peer{k}.toml" for k in range(len(hosts))]


def listen_of(path: Path) -> tuple[str, int]:
    """The IPv4 address and TCP port a peer file listens on."""
    from p2pfed.load import load_peer

    listen = load_peer(path).listen[0]
    match = re.fullmatch(r"/ip4/([\d.]+)/tcp/(\d+)", listen)
    if match is None:
        raise LabRunError(f"{path}: listen address {listen!r} is not /ip4/A.B.C.D/tcp/PORT")
    return match.group(1), int(match.group(2))


def run_swarm(num_peers: int, out: Path, *, link: Link | None = None, overrides: Sequence[str] = (),
              emulate: str = "relay", swarm: str | None = None, experiment: str | None = None,
              timeout_s: float = 300.0,
              peer_args: Sequence[str] = (), python: str = sys.executable,
              on_line: Callable[[str], None] | None = None) -> LabRun:
    """Run a swarm of `num_peers` peer processes in their own namespaces to the end (see the module's doc).

    `emulate` says what gives a `link` its latency and loss: "relay" (p2pfed.netlab.relay, works anywhere) or
    "netem" (the kernel's, where netem_missing() is None). `out` gets the peer files, keys, state folders (results) and a log per process. Raise LabRunError as soon as
    a peer exits with a status other than 0, or when the swarm is not done within `timeout_s`.
    """
    from p2pfed.load import load_peer

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if emulate not in ("relay", "netem"):
        raise ValueError(f"emulate: 'relay' or 'netem', got {emulate!r}")
    relayed = link is not None and emulate == "relay"
    netem = (link.latency_s, link.loss) if link is not None and emulate == "netem" else None
    with NetLab(num_peers, intercept=relayed, netem=netem) as lab:
        paths = init_peer_files(out, [h.ip for h in lab.hosts], overrides, swarm, experiment, python)
        relay = _start_relay(lab, out, [listen_of(p) for p in paths], link, python, env) if relayed else None
        started = time.monotonic()
        outputs = {}
        for host, path in zip(lab.hosts, paths):
            command = [python, "-m", "p2pfed", "peer", str(path), *peer_args]
            process = lab.popen(host, command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=out)
            outputs[path.stem] = Output(process, out / f"{path.stem}.log").start()
        codes = _wait_all(outputs, started + timeout_s, on_line)
        seconds = time.monotonic() - started
        relay_counts = _stop_relay(relay) if relay else None
    results = {path.stem: _result(load_peer(path).state_dir) for path in paths}
    times = {name: {int(m.group(2)): t for t, line in o.lines if (m := ROUND_LINE.match(line))}
             for name, o in outputs.items()}
    return LabRun(out, paths, codes, results, times, relay_counts, seconds)


def _start_relay(lab: NetLab, out: Path, listens: list[tuple[str, int]], link: Link, python: str,
                 env: dict) -> Output:
    routes = [f"{ip}:{port}={ip}:{port}" for ip, port in listens]  # transparent: the real address, both sides
    command = [python, "-m", "p2pfed.netlab.relay", "--transparent", "--latency-ms", str(link.latency_s * 1000),
               "--loss", str(link.loss), "--seed", str(link.seed), *routes]
    process = lab.popen(lab.hub, command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    relay = Output(process, out / "relay.log").start()
    if not relay.wait_for(r"^ready$", RELAY_READY_S):
        raise LabRunError(f"the relay did not start within {RELAY_READY_S:.0f} s:\n{relay.tail()}")
    return relay


def _stop_relay(relay: Output) -> str | None:
    relay.process.terminate()
    try:
        relay.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        relay.process.kill()
    relay.join()
    return next((line for _, line in reversed(relay.lines) if line.startswith("relay: ")), None)


def _wait_all(outputs: dict[str, Output], deadline: float, on_line: Callable[[str], None] | None) -> dict[str, int]:
    """Every peer's exit status; raise at the first that fails (the others would wait for it in vain) or at the
    deadline. Waits on a process, never sleeps; every second it hands new round lines to `on_line`."""
    codes: dict[str, int] = {}
    shown = {name: 0 for name in outputs}
    while len(codes) < len(outputs):
        first = next(name for name in outputs if name not in codes)
        try:
            outputs[first].process.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pass
        codes.update({name: code for name, output in outputs.items()
                      if name not in codes and (code := output.process.poll()) is not None})
        if on_line is not None:
            _show(outputs, shown, on_line)
        failed = {name: code for name, code in codes.items() if code != 0}
        if failed:
            for name in failed:
                outputs[name].join()
            raise LabRunError("; ".join(f"{name} exited with {code}:\n{outputs[name].tail()}"
                                        for name, code in failed.items()))
        if len(codes) < len(outputs) and time.monotonic() >= deadline:
            raise LabRunError("the swarm did not finish in time; last lines:\n" + "\n".join(
                f"{n}: {o.lines[-1][1] if o.lines else '(nothing yet)'}" for n, o in outputs.items()))
    for output in outputs.values():
        output.join()
    return codes


def _show(outputs: dict[str, Output], shown: dict[str, int], on_line: Callable[[str], None]) -> None:
    for name, output in outputs.items():
        for _, line in output.lines[shown[name]:]:
            if ROUND_LINE.match(line):
                on_line(line)
        shown[name] = len(output.lines)


def _result(state_dir: str) -> PeerResult:
    import json

    from p2pfed.peer import RESULT_FILE

    path = Path(state_dir) / RESULT_FILE
    if not path.is_file():
        raise LabRunError(f"{path}: no result written")
    return PeerResult.from_json(json.loads(path.read_text(encoding="utf-8")))
