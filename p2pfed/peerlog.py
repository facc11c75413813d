"""What a networked peer tells its operator: its neighbours by name and short peer ID in every log line, who it
is still waiting for at start, the round line of `p2pfed peer`, and who it never heard from in a whole run.

The network modules speak peer IDs and the round loop speaks names; only the peer knows both, so it names its
neighbours in their lines through `named_neighbours` (a logging filter) instead of each module learning names.
Everything here is text from plain data: no model, no network.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import trio

from p2pfed.config import NeighbourConfig
from p2pfed.records import RoundRecord

log = logging.getLogger("p2pfed.peer")  # the peer's own lines

# The peer's exit status when some neighbour was never heard from in the whole run (`p2pfed peer`).
SILENT_NEIGHBOUR_EXIT = 3


def short_id(peer_id: str) -> str:
    """`12D3…bR5S`: enough to tell neighbours apart and to find one in a peer file, short enough for any line."""
    return f"{peer_id[:4]}…{peer_id[-4:]}" if len(peer_id) > 12 else peer_id


def label(name: str, peer_id: str) -> str:
    return f"{name} ({short_id(peer_id)})"


# -- neighbours by name in log lines ---------------------------------------------------------------

class NeighbourNames(logging.Filter):
    """Replaces a neighbour's peer ID (a string or a libp2p ID) or name among a log record's arguments by
    `name (short ID)`, and the logging peer's own ID by its name.

    p2pfed's lines about a peer's network start with who logs (`"%s: ..."`: its peer ID in the network
    modules, its name in the round loop); that first argument picks whose names apply, so several peers in one
    process each name their own neighbours. IDs no peer knows (a stranger, a wrong answerer) stay whole.
    """

    LOGGERS = ("p2pfed.net.libp2p_endpoint", "p2pfed.net.inbound", "p2pfed.loop", "p2pfed.peer")

    def __init__(self) -> None:
        super().__init__()
        self.peers: dict[str, tuple[str, dict[str, str]]] = {}  # own ID or name -> (own name, labels)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if self.peers and isinstance(args, tuple) and args:
            found = self.peers.get(_key(args[0]))
            if found is not None:
                own, labels = found
                record.args = (own, *(labels.get(_key(arg), arg) for arg in args[1:]))
        return True


def _key(value) -> str | None:
    if isinstance(value, str):
        return value
    to_base58 = getattr(value, "to_base58", None)
    return to_base58() if callable(to_base58) else None


NAMES = NeighbourNames()


@contextlib.contextmanager
def named_neighbours(name: str, peer_id: str, neighbours: Mapping[str, str]) -> Iterator[None]:
    """Within the block, log lines of peer `name` (`peer_id`) name its `neighbours` (name -> peer ID)."""
    for logger in NeighbourNames.LOGGERS:
        if NAMES not in logging.getLogger(logger).filters:
            logging.getLogger(logger).addFilter(NAMES)
    labels = {key: label(n, pid) for n, pid in neighbours.items() for key in (n, pid)}
    entry = (name, {**labels, peer_id: name})
    NAMES.peers.update({peer_id: entry, name: entry})
    try:
        yield
    finally:
        for key in (peer_id, name):
            if NAMES.peers.get(key) is entry:
                del NAMES.peers[key]


def add_names(peer_id: str, neighbours: Mapping[str, str]) -> None:
    """More neighbours (name -> peer ID) for the log lines of peer `peer_id`, inside its named_neighbours block
    (a swarm member learns its neighbours as members join)."""
    entry = NAMES.peers.get(peer_id)
    if entry is not None:
        entry[1].update({key: label(n, pid) for n, pid in neighbours.items() for key in (n, pid)})


# -- waiting for neighbours, and the end of a run ------------------------------------------------

@dataclass(frozen=True)
class NeighbourStatus:
    """What the peer knows of one neighbour's connection."""

    name: str
    peer_id: str
    addrs: tuple[str, ...]
    connected: bool
    last_error: str = ""  # why the last dial failed
    answered_by: tuple[str, ...] = ()  # peer IDs that answered at its address instead

    @property
    def label(self) -> str:
        return label(self.name, self.peer_id)

    @property
    def where(self) -> str:
        if not self.addrs:
            return "(no address here: it must dial this peer)"
        return f"at {self.addrs[0]}" + (f" (+{len(self.addrs) - 1} more)" if len(self.addrs) > 1 else "")

    @property
    def reason(self) -> str:
        """Why it is not connected yet, in a few words."""
        return self.last_error.removeprefix("cannot connect: ") or ("not dialled in yet" if not self.addrs
                                                                   else "dialling")

    def why(self) -> str:
        """Its state, and what the operator should check."""
        if self.answered_by:
            return (f"a peer with another ID ({', '.join(self.answered_by)}) answered there: the peer ID listed "
                    f"here is wrong, or the address is another peer's")
        if self.connected:
            return "connected, but no update of its arrived"
        if not self.addrs:
            return "it never dialled this peer"
        reason = self.reason
        if "hung up" in reason:  # usually Noise found the right peer there, which then refused this one
            reason += ": it may not list this peer's ID among its neighbours"
        return f"never connected ({reason})"


def neighbour_status(neighbours: Iterable[NeighbourConfig], endpoint) -> list[NeighbourStatus]:
    """Each neighbour's connection as `endpoint` (a Libp2pEndpoint) sees it now."""
    states = endpoint.neighbours
    return [NeighbourStatus(n.name, n.peer_id, tuple(n.addrs), n.peer_id in states and endpoint.connected(n.peer_id),
                            getattr(states.get(n.peer_id), "last_error", ""),
                            tuple(sorted({a for a, _ in getattr(states.get(n.peer_id), "wrong_peers", ())})))
            for n in neighbours]


async def report_waiting(name: str, status: Callable[[], list[NeighbourStatus]], started: float, timeout: float,
                         every_s: float) -> None:
    """Until cancelled: a line for each neighbour that connects, and a status line every `every_s` while some
    are not connected (the first once the first dials have had a second)."""
    pending = {n.name for n in status() if not n.connected}
    shown = None
    while True:
        await trio.sleep(1.0 if shown is None else 0.5)
        now, current = trio.current_time(), status()
        for n in current:
            if n.name in pending and n.connected:
                log.info("%s: %s connected after %.0f s", name, n.label, now - started)
        pending = {n.name for n in current if not n.connected}
        if pending and (shown is None or now - shown >= every_s - 0.25):
            log.info("%s", waiting_line(name, [n for n in current if n.name in pending], len(current),
                                        now - started, timeout))
            shown = now


def waiting_line(name: str, pending: Sequence[NeighbourStatus], total: int, waited_s: float,
                 timeout_s: float) -> str:
    """One status line while the peer waits for its neighbours before round 1."""
    items = "; ".join(f"{n.label} {n.where} ({n.reason})" for n in pending)
    who = items if len(pending) == 1 else f"{len(pending)} of {total} neighbours: {items}"
    them = "it" if len(pending) == 1 else "them"
    return (f"{name}: waiting for {who}, {waited_s:.0f} s so far; round 1 starts without {them} in "
            f"{max(0.0, timeout_s - waited_s):.0f} s")


def round_line(name: str, record: RoundRecord) -> str:
    """`peer0: round 3, test ppl 21.094, trust peer0=0.62 peer1=0.38, missing peer2`."""
    if not record.online:
        return f"{name}: round {record.round}, sat out (not in the swarm this round)"
    ppl = "-" if record.test_ppl is None else f"{record.test_ppl:.3f}"
    trust = " ".join(f"{n}={w:.2f}" for n, w in sorted(record.trust.items(), key=lambda item: _natural(item[0])))
    return (f"{name}: round {record.round}, test ppl {ppl}" + (f", trust {trust}" if trust else "")
            + (f", missing {', '.join(record.missing)}" if record.missing else ""))


def _natural(name: str) -> tuple:
    stem = name.rstrip("0123456789")
    return (stem, int(name[len(stem):]) if name != stem else -1, name)


def silent_neighbours(rounds: Iterable[RoundRecord], arrived: Iterable[str]) -> list[str]:
    """The neighbours awaited in some round (missing there) of which no update ever arrived: none in
    `arrived` (this process's), none aggregated and none on time in any round of the history."""
    rounds = list(rounds)
    awaited = dict.fromkeys(n for r in rounds for n in r.missing)
    heard = set(arrived) | {n for r in rounds for n in r.trust}
    heard |= {n for r in rounds if r.trust for n in r.neighbours if n not in r.missing}
    return [n for n in awaited if n not in heard]


def silent_summary(name: str, silent: Sequence[NeighbourStatus], total: int, rounds: int, state_dir: str) -> str:
    """The block a peer ends with when it never heard from some neighbours in the whole run."""
    lines = [f"{name}: never heard from {len(silent)} of its {total} neighbour(s) in {rounds} round(s); it "
             f"trained without them:"]
    lines += [f"  {n.label} {n.where}: {n.why()}" for n in silent]
    lines += [
        "Likely causes:",
        "  - not started, stopped early, or finished its rounds before this peer started: start it with "
        "`p2pfed peer` on its peer file",
        "  - wrong peer ID: the one listed here must be what `p2pfed id` prints for its peer file",
        "  - unreachable address: not the host and port it listens on, or a firewall in between",
        f"{name}: exit status {SILENT_NEIGHBOUR_EXIT}; the rounds' results are in "
        f"{state_dir + '/result.json' if state_dir else 'no state_dir'}",
    ]
    return "\n".join(lines)
