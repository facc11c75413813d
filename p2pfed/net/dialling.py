"""What p2pfed's dials tell the operator: one short reason per failed dial, and libp2p's own lines kept quiet.

py-libp2p 0.8.1 logs every failed attempt of a dial as an error, straight to stderr: a refused TCP connect
four times per dial (it retries), a failed security upgrade, a broken multistream handshake. A peer waiting
for a neighbour that is not up yet dials it several times a second, so those lines would flood the operator's
terminal, and they name no neighbour. The endpoint reports each neighbour itself (while waiting, and for each
failed send), so inside `quiet_dials()` libp2p's records go down to debug level: gone from the terminal, still
in libp2p's own debug log (LIBP2P_DEBUG). Records of anything else libp2p does at the time are untouched:
the mark is a context variable, which only the dialling task and the tasks it starts see. libp2p also redials
the peers it knows of (our neighbours) by itself, from its AutoConnector task about every 30 s: the records of
those dials go to debug level too. So does the listener's error line for a connection whose dialler hung up
right after the handshake: the dialler found the wrong peer ID there (or this peer is not its neighbour), and
it retries a few times a second; the dialler's side reports it, and this side's dials fail with a reset.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator

import trio

from libp2p.io.exceptions import IncompleteReadError

from p2pfed.net.fastpath import WrongPeer

# The py-libp2p modules that log per attempt while dialling.
DIAL_LOGGERS = ("libp2p.transport.tcp.tcp", "libp2p.network.swarm", "libp2p.protocol_muxer.multiselect_client")
_HUNG_UP_AFTER_HANDSHAKE = "fail to upgrade mux for peer %s"  # libp2p.network.swarm, on an inbound connection

HUNG_UP = "it hung up during the handshake"  # dial_failure's reason when the dialled peer closed the connection

_dialling: contextvars.ContextVar[bool] = contextvars.ContextVar("p2pfed_dialling", default=False)


class _DialRecordsToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and (record.msg == _HUNG_UP_AFTER_HANDSHAKE or _dialling.get()
                                               or _in_libp2p_redial()):
            # After the logger's own level check: handlers at INFO and above (and Python's last-resort
            # handler, which prints libp2p's records since it configures none) now pass it over.
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


def _in_libp2p_redial() -> bool:
    """Whether this runs in a task of libp2p's AutoConnector (or one it started)."""
    try:
        task = trio.lowlevel.current_task()
    except RuntimeError:  # not in a trio task
        return False
    while task is not None:
        if "AutoConnector" in task.name:
            return True
        task = task.parent_nursery.parent_task if task.parent_nursery is not None else None
    return False


_FILTER = _DialRecordsToDebug()
for _name in DIAL_LOGGERS:
    logging.getLogger(_name).addFilter(_FILTER)


@contextlib.contextmanager
def quiet_dials() -> Iterator[None]:
    """libp2p's records logged within the block (by this task and tasks it starts) at debug level."""
    token = _dialling.set(True)
    try:
        yield
    finally:
        _dialling.reset(token)


def dial_failure(error: BaseException) -> str:
    """Why a dial failed, in a few words: the root cause under libp2p's layers of wrapping errors."""
    root = _root(error)
    if isinstance(root, WrongPeer):
        return "a peer with another ID answered"
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, (ConnectionResetError, IncompleteReadError)):
        return HUNG_UP  # Noise had authenticated it as the peer dialled: it does not take us for a neighbour
    if isinstance(root, TimeoutError):
        return "timed out"
    if isinstance(root, OSError) and root.strerror:
        return root.strerror[:1].lower() + root.strerror[1:]
    text = f"{type(root).__name__}: {root}".rstrip(": ")
    return text if len(text) <= 160 else text[:157] + "..."


def _root(error: BaseException) -> BaseException:
    """The innermost cause: through __cause__ and __context__, and the first error of a group (libp2p's
    MultiError keeps them in `errors`, an ExceptionGroup in `exceptions`)."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = (getattr(error, "exceptions", None) or getattr(error, "errors", None) or
                 [error.__cause__ or error.__context__])
        if not inner or not isinstance(inner[0], BaseException):
            break
        error = inner[0]
    return error
