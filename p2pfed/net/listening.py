"""Listen addresses that cannot be listened on fail loudly: py-libp2p 0.8.1 skips them with a debug line.

`Swarm.listen` catches a bind's OSError, logs it at debug level and goes on, and `host.run()` ignores
the result: a host whose only address is taken "runs" and listens on nothing. Its listeners also set
SO_REUSEPORT, so on Linux a second host binds a port another SO_REUSEPORT socket (another p2pfed peer,
say) already listens on, without an error, and the kernel then splits incoming connections between them.
"""

from __future__ import annotations

import errno
import socket

from libp2p.abc import INetworkService
from multiaddr import Multiaddr


class ListenError(OSError):
    """A listen address cannot be listened on (in use, or not an address of this machine); names the address."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        self.address = address
        self.reason = reason


_REASONS = {errno.EADDRINUSE: "the port is in use", errno.EADDRNOTAVAIL: "not an address of this machine"}


def check_bindable(addr: Multiaddr) -> None:
    """Raise ListenError if `addr` (an IP address and a fixed TCP port) cannot be bound. Binds only:
    nothing listens and nothing is sent.

    The probe sets SO_REUSEADDR but not SO_REUSEPORT, so a listener already on the port, SO_REUSEPORT or
    not, makes its bind fail, and so does an address not on this machine; a socket in TIME_WAIT from a
    restart does not. Not caught: a listener that appears between this check and libp2p's own bind.
    """
    protocols = [protocol.name for protocol in addr.protocols()]
    if protocols[:2] not in (["ip4", "tcp"], ["ip6", "tcp"]) or int(addr.value_for_protocol("tcp")) == 0:
        return  # port 0 gets a free port; other transports are left to check_listening
    family = socket.AF_INET if protocols[0] == "ip4" else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((addr.value_for_protocol(protocols[0]), int(addr.value_for_protocol("tcp"))))
        except OSError as error:
            raise ListenError(str(addr), _REASONS.get(error.errno, str(error))) from error


def check_listening(network: INetworkService, listen_addrs: list[Multiaddr]) -> None:
    """Raise ListenError for a requested address the started host does not listen on."""
    for addr in listen_addrs:
        listener = network.listeners.get(str(addr))  # libp2p drops a listener whose bind failed
        if listener is None or not listener.get_addrs():
            raise ListenError(str(addr), "libp2p could not listen on it (its debug log says why)")
