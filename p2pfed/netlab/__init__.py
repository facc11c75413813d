"""Many hosts on one machine: peers in Linux network namespaces (netlab.lab), links with latency and loss
through a TCP relay (netlab.relay, also `python -m p2pfed.netlab.relay`), and a swarm of `p2pfed peer`
processes started from `p2pfed init` files (netlab.harness).

Needs root and iproute2; `can_create_namespaces()` says why not where they are missing. The relay is not
imported here, so that `python -m p2pfed.netlab.relay` runs it as its only copy.
"""

from p2pfed.netlab.lab import (Host, NetLab, NetLabError, can_create_namespaces, netem_missing,
                              remove_stale_namespaces)

__all__ = ["Host", "NetLab", "NetLabError", "can_create_namespaces", "netem_missing", "remove_stale_namespaces"]
