"""p2pfed: decentralized, personalized fine-tuning of language models with LoRA over libp2p.

`from p2pfed import Peer, load_peer` gives the embeddable networked peer; the rest lives in the
submodules. Imported lazily: libp2p and torch take seconds to import.
"""

from __future__ import annotations

__all__ = ["Peer", "PeerConfig", "load_peer", "ExperimentConfig", "load_experiment"]


def __getattr__(name: str):
    if name == "Peer":
        from p2pfed.node import Peer

        return Peer
    if name in ("PeerConfig", "load_peer", "ExperimentConfig", "load_experiment"):
        from p2pfed import config

        return getattr(config, name)
    raise AttributeError(f"module 'p2pfed' has no attribute {name!r}")
