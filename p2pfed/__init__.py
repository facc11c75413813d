"""p2pfed: decentralized, personalized fine-tuning of language models with LoRA over libp2p.

`from p2pfed import Peer, load_peer` gives the embeddable networked peer (and its events); the rest lives
in the submodules. Imported lazily: libp2p and torch take seconds to import.
"""

from __future__ import annotations

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "Peer": "p2pfed.node",
    "UpdateReceived": "p2pfed.node",
    "TrustChanged": "p2pfed.node",
    "RoundFinished": "p2pfed.node",
    "PeerEvent": "p2pfed.node",
    "PeerConfig": "p2pfed.config",
    "ExperimentConfig": "p2pfed.config",
    "load_peer": "p2pfed.config",
    "load_experiment": "p2pfed.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'p2pfed' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
