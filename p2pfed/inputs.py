"""What a script may give a swarm beside its config: its own graph (or a graph per round) and each peer's own text.

    JobInputs(graph=nx.cycle_graph(4))                       # every job of every seed on this graph
    JobInputs(graph=lambda r: graph_of_round(r))             # a graph per round (1, 2, ...)
    JobInputs(texts=(PeerText(text, "news"), ...))           # peer i holds texts[i], cut into its own splits

The config's topology and data sections name the same things for runs from files; these are for what a file
cannot hold. Plain data and picklable, so that worker processes get them too (a per-round function then has to
be a module-level function, not a lambda).
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import torch

from p2pfed.config import ConfigError, DataConfig, ExperimentConfig, peer_index, peer_name
from p2pfed.data import PeerData, read_text_source
from p2pfed.seeding import derive_seed

GraphAt = Callable[[int], nx.Graph]  # the graph in force at a round (1, 2, ...)


@dataclass(frozen=True)
class PeerText:
    """One peer's own text, and the group it belongs to (for the oracle, same-group trust and the plots)."""

    text: str
    group: str


@dataclass(frozen=True)
class JobInputs:
    """A job's graph and per-peer text when they come from a script; None: what the config names."""

    graph: nx.Graph | GraphAt | None = None  # nodes 0..num_peers-1
    texts: tuple[PeerText, ...] | None = None  # peer i's text at index i

    @property
    def given(self) -> bool:
        return self.graph is not None or self.texts is not None

    def graph_at(self, round_index: int) -> nx.Graph | None:
        if self.graph is None or isinstance(self.graph, nx.Graph):
            return self.graph
        return self.graph(round_index)

    def check(self, config: ExperimentConfig) -> None:
        """Nodes, counts and picklability: what can be checked before any model loads."""
        if self.given and config.runtime != "inprocess":
            raise ConfigError("runtime: a graph or texts given from a script run in process only (runtime = "
                              "\"inprocess\")")
        if self.texts is not None and len(self.texts) != config.num_peers:
            raise ConfigError(f"data: texts for {len(self.texts)} peers, but num_peers = {config.num_peers}")
        dynamic = self.graph is not None and not isinstance(self.graph, nx.Graph)
        for r in (range(1, config.training.rounds + 1) if dynamic else [1] if self.graph is not None else []):
            graph = self.graph_at(r)
            where = f"topology (the graph of round {r})" if dynamic else "topology"
            if not isinstance(graph, nx.Graph):
                raise ConfigError(f"{where}: expected a networkx.Graph, got {type(graph).__name__}")
            if set(graph.nodes) != set(range(config.num_peers)):
                raise ConfigError(f"{where}: its nodes must be 0..{config.num_peers - 1} (num_peers = "
                                  f"{config.num_peers}), got {sorted(graph.nodes, key=str)[:8]}")
        if config.workers > 1 and self.given:
            try:
                pickle.dumps(self)
            except Exception as error:
                raise ConfigError(f"topology: with workers > 1 a graph function must be picklable (a module-level "
                                  f"function, not a lambda or a closure): {error}") from None

    def data_for(self, encode: Callable[[str], list[int]], config: DataConfig, seed: int) -> list[PeerData] | None:
        """Each peer's split of its own text for this seed; None when the config's data section is used."""
        if self.texts is None:
            return None
        return own_text_data(self.texts, encode, config, seed)

    def fingerprint(self, rounds: int) -> str | None:
        """A digest of the graph(s) and texts: a run folder made with other inputs is not resumed with these."""
        if not self.given:
            return None
        digest = hashlib.sha256()
        if self.graph is not None:
            for r in range(1, rounds + 1) if not isinstance(self.graph, nx.Graph) else [1]:
                digest.update(repr(sorted(tuple(sorted(e)) for e in self.graph_at(r).edges())).encode())
        for text in self.texts or ():
            digest.update(f"{text.group}\0{len(text.text)}\0{text.text}".encode())
        return digest.hexdigest()


def static_graph(graph: nx.Graph, num_peers: int | None = None) -> nx.Graph:
    """A script's graph with nodes 0..n-1: nodes may be 0..n-1 or peer names (peer0, peer1, ...)."""
    if all(isinstance(n, str) for n in graph.nodes) and graph.number_of_nodes():
        graph = nx.relabel_nodes(graph, {n: peer_index(n) for n in graph.nodes})
    n = graph.number_of_nodes() if num_peers is None else num_peers
    if set(graph.nodes) != set(range(n)):
        raise ConfigError(f"topology: the graph's nodes must be 0..{n - 1} or peer0..peer{n - 1}, got "
                          f"{sorted(graph.nodes, key=str)[:8]}")
    clean = nx.Graph()
    clean.add_nodes_from(range(n))
    clean.add_edges_from(sorted((min(u, v), max(u, v)) for u, v in graph.edges() if u != v))
    return clean


def peer_texts(data: Sequence | Mapping, num_peers: int | None = None) -> tuple[PeerText, ...]:
    """Per-peer texts as a script gives them (Swarm's `texts`), read into PeerTexts.

    `data` is a list (peer i at index i) or a mapping by peer name or index. Each item is a `Path` (a .txt file,
    or a folder of .txt files; its group is the file's or folder's name), a `str` (the text itself; its group is
    the peer's name), a `(group, text or Path)` pair or a PeerText.
    """
    if isinstance(data, Mapping):
        by_index = {peer_index(k) if isinstance(k, str) else int(k): v for k, v in data.items()}
        if set(by_index) != set(range(len(by_index))):
            raise ConfigError(f"data: peers must be peer0..peer{len(by_index) - 1}, got {sorted(by_index)}")
        items = [by_index[i] for i in range(len(by_index))]
    else:
        items = list(data)
    if num_peers is not None and len(items) != num_peers:
        raise ConfigError(f"data: texts for {len(items)} peers, but num_peers = {num_peers}")
    return tuple(_peer_text(i, item) for i, item in enumerate(items))


def _peer_text(index: int, item) -> PeerText:
    if isinstance(item, PeerText):
        return item
    group = None
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
        group, item = item
    if isinstance(item, Path):
        return PeerText(read_text_source(item), group or (item.stem if item.is_file() else item.name))
    if isinstance(item, str):
        if not item.strip():
            raise ConfigError(f"data: {peer_name(index)}'s text is empty")
        return PeerText(item, group or peer_name(index))
    raise ConfigError(f"data: {peer_name(index)}: expected a Path, a str of text or a (group, text) pair, "
                      f"got {type(item).__name__}")


def own_text_data(texts: Sequence[PeerText], encode: Callable[[str], list[int]], config: DataConfig,
                  seed: int) -> list[PeerData]:
    """Peer i's train / validation / test blocks, all from its own text: data.train_blocks, val_blocks and
    test_blocks disjoint blocks of data.block_len tokens, drawn by the seed."""
    groups = list(dict.fromkeys(t.group for t in texts))
    sizes = (config.train_blocks, config.val_blocks, config.test_blocks)
    peers = []
    for i, own in enumerate(texts):
        tokens = torch.tensor(encode(own.text), dtype=torch.int64)
        count = len(tokens) // config.block_len
        if count < sum(sizes):
            raise ConfigError(
                f"data: {peer_name(i)}'s text makes {count} blocks of {config.block_len} tokens, but "
                f"data.train_blocks + val_blocks + test_blocks = {sum(sizes)}: give it more text or lower them")
        blocks = tokens[: count * config.block_len].reshape(count, config.block_len)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(derive_seed(seed, "own", i)))
        cut = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
        train, val, test = (blocks[order[cut[k]:cut[k + 1]]] for k in range(3))
        peers.append(PeerData(name=peer_name(i), train=train, val=val, test=test,
                              mixture={g: 1.0 if g == own.group else 0.0 for g in groups}))
    return peers
