"""The membership protocol's streams: one length-prefixed message each way, bounded in size and time, and
libp2p's noisy error records about members going away turned down to debug level."""

from __future__ import annotations

import contextvars
import logging
import struct

import trio
from libp2p.custom_types import TProtocol

from p2pfed.net.dialling import dial_failure
from p2pfed.net.framing import read_upto
from p2pfed.net.member_records import MAX_MESSAGE_BYTES, MembershipError

MEMBERS_PROTOCOL = TProtocol("/p2pfed/members/1")
LENGTH = struct.Struct(">I")
EXCHANGE_TIMEOUT_S = 5.0  # one exchange: dial, send, answer

# libp2p logs a failed stream open to a member that is going away at error level, many lines long: within an
# exchange (whose failure is kept as one short reason) those records go to debug level.
exchanging: contextvars.ContextVar[bool] = contextvars.ContextVar("p2pfed_membership_exchange", default=False)


class _ExchangeRecordsToDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # Members gossip with a member that is shutting down; its libp2p then logs each connection it can no
        # longer take (a LifecycleError) with a traceback: harmless, so at debug level too.
        closing = str(record.msg).startswith("[ADDCONN_FAIL]") and "LifecycleError" in str(record.args)[:300]
        if record.levelno > logging.DEBUG and (exchanging.get() or closing):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


for _logger in ("libp2p.host.basic_host", "libp2p.network.swarm"):
    logging.getLogger(_logger).addFilter(_ExchangeRecordsToDebug())


async def write_message(stream, payload: bytes) -> None:
    # Small, and shielded like every write on a shared connection: a write cut off half-way can wedge Noise.
    with trio.CancelScope(shield=True, deadline=trio.current_time() + EXCHANGE_TIMEOUT_S):
        await stream.write(LENGTH.pack(len(payload)) + payload)


async def read_message(stream, max_bytes: int = MAX_MESSAGE_BYTES) -> bytes:
    head = await read_upto(stream, LENGTH.size)
    if len(head) < LENGTH.size:
        raise MembershipError("the stream ended before a message")
    (length,) = LENGTH.unpack(head)
    if length > max_bytes:
        raise MembershipError(f"a membership message of {length} bytes is over {max_bytes}")
    body = await read_upto(stream, length)
    if len(body) < length:
        raise MembershipError("the stream ended inside a message")
    return body


def reason(error: BaseException) -> str:
    """One short line for why an exchange failed."""
    if isinstance(error, trio.TooSlowError):
        return f"no answer within {EXCHANGE_TIMEOUT_S:g} s"
    if isinstance(error, MembershipError):
        return str(error)
    return dial_failure(error)
