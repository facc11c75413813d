"""py-libp2p 0.8.1's inbound connection slots, given back when a connection closes instead of never.

The bug (libp2p/network/swarm.py): `Swarm._handle_inbound_connection` takes a slot of `_inbound_limiter`
(a trio.CapacityLimiter of max_connections - min_connections = 250 tokens) with `acquire_nowait()` and
gives it back in a `finally` around `_do_handle_inbound_connection`. But after a successful upgrade that
method parks in `await self.manager.wait_finished()` ("keep handler alive"), which returns only when the
whole swarm stops, not when the connection closes. So every inbound connection that got as far as
`add_conn` keeps its slot (and its handler task, with the raw connection it holds) for the host's life:
after 250 of them in a host's life the host refuses every inbound connection, neighbours' included.
Failed upgrades are not affected: their handler returns and the `finally` runs.

The repair, on one swarm instance (no change to libp2p's code or classes): each inbound handler runs in
a cancel scope; `add_conn` (awaited in the handler's own task) ties that scope to the connection it
registers, and `remove_conn` (called when a connection closes) cancels it. The handler leaves its wait,
libp2p's own `finally` gives the slot back, and the task and what it holds are freed. The slot count
then means what libp2p meant: inbound connections open or upgrading.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.network.swarm import Swarm

# libp2p's names this relies on (checked at install, so a libp2p upgrade fails loudly, not silently).
_HOOKED = ("_do_handle_inbound_connection", "add_conn", "remove_conn", "_inbound_limiter")


@dataclass(eq=False)
class InboundSlots:
    """Ends each inbound connection's libp2p handler when the connection closes. Use `install(swarm)`."""

    swarm: Swarm
    _by_task: dict[trio.lowlevel.Task, trio.CancelScope] = field(default_factory=dict, repr=False)
    _by_conn: dict[Any, trio.CancelScope] = field(default_factory=dict, repr=False)  # SwarmConn: by identity

    @classmethod
    def install(cls, swarm: Swarm) -> InboundSlots:
        missing = [name for name in _HOOKED if not hasattr(swarm, name)]
        if missing:
            raise RuntimeError(f"py-libp2p's Swarm has no {', '.join(missing)}: p2pfed needs libp2p==0.8.1")
        slots = cls(swarm)
        # Instance attributes shadow the class's methods for this swarm only; libp2p calls them as self.X.
        swarm._do_handle_inbound_connection = slots._wrap_handler(swarm._do_handle_inbound_connection)
        swarm.add_conn = slots._wrap_add_conn(swarm.add_conn)
        swarm.remove_conn = slots._wrap_remove_conn(swarm.remove_conn)
        return slots

    @property
    def borrowed(self) -> int:
        """Inbound slots taken now: connections open or being upgraded."""
        return int(self.swarm._inbound_limiter.borrowed_tokens)

    @property
    def total(self) -> int:
        return int(self.swarm._inbound_limiter.total_tokens)

    def _wrap_handler(self, handle: Callable[..., Any]) -> Callable[..., Any]:
        async def handle_until_closed(*args: Any, **kwargs: Any) -> None:
            task = trio.lowlevel.current_task()
            with trio.CancelScope() as scope:
                self._by_task[task] = scope
                try:
                    await handle(*args, **kwargs)
                finally:
                    self._by_task.pop(task, None)

        return handle_until_closed

    def _wrap_add_conn(self, add_conn: Callable[..., Any]) -> Callable[..., Any]:
        async def add_conn_and_watch(muxed_conn: Any, direction: str = "unknown") -> Any:
            swarm_conn = await add_conn(muxed_conn, direction=direction)
            scope = self._by_task.get(trio.lowlevel.current_task())  # only inbound handlers have one
            if scope is not None:
                if swarm_conn.is_closed:  # closed while it was being registered: remove_conn came first
                    scope.cancel()
                else:
                    self._by_conn[swarm_conn] = scope
            return swarm_conn

        return add_conn_and_watch

    def _wrap_remove_conn(self, remove_conn: Callable[[Any], None]) -> Callable[[Any], None]:
        def remove_conn_and_release(swarm_conn: Any) -> None:
            remove_conn(swarm_conn)
            scope = self._by_conn.pop(swarm_conn, None)
            if scope is not None:
                scope.cancel()  # the handler leaves wait_finished(); libp2p's finally releases its slot

        return remove_conn_and_release
