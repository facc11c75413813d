"""p2pfed: decentralized, personalized fine-tuning of language models with LoRA over libp2p.

`from p2pfed import Peer, load_peer` gives the embeddable networked peer (and its events), `from p2pfed import
Swarm` experiments from a script (p2pfed.api); the rest lives in the submodules. Imported lazily: libp2p and
torch take seconds to import.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "Peer": "p2pfed.peer",
    "UpdateReceived": "p2pfed.peer",
    "TrustChanged": "p2pfed.peer",
    "RoundFinished": "p2pfed.peer",
    "PeerEvent": "p2pfed.peer",
    "PeerConfig": "p2pfed.config",
    "ExperimentConfig": "p2pfed.config",
    "load_peer": "p2pfed.load",
    "load_experiment": "p2pfed.load",
    "start_peer": "p2pfed.embed",
    "BackgroundPeer": "p2pfed.embed",
    "EventStream": "p2pfed.embed",
    "PeerStopped": "p2pfed.embed",
    "Swarm": "p2pfed.api",
    "SwarmEvent": "p2pfed.api",
    "RunningSwarm": "p2pfed.api",
    "SwarmResult": "p2pfed.results",
    "SchemeResult": "p2pfed.results",
    "PeerText": "p2pfed.inputs",
    "RunStopped": "p2pfed.experiment",
    "run_sweep": "p2pfed.sweep",
    "plan_sweep": "p2pfed.sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pfed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
