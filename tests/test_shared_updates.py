"""Received updates are read-only: every receiver of an in-process payload views the same bytes.

decode_update returns float32 tensors that view the payload (p2pfed.net.tensor_codec), and the in-process
network hands one payload object to all of a sender's neighbours. A trust rule, aggregator or expert layer
that wrote into a received tensor would change what the other receivers see (and a bytes object that must
not change): these jobs fail if any byte of any payload differs after the round from when it was sent.
"""

from __future__ import annotations

import hashlib

import numpy
import pytest

from p2pfed.net import wire
from p2pfed.net.memory import InMemoryNetwork
from p2pfed.strategies import AGGREGATORS, EXPERT_LAYOUTS, TRUST_RULES
from p2pfed.swarm import run_job
from tests.conftest import small_config

MIXED_RANKS = "profiles=[{rank=2}, {rank=8}]"
# Every trust rule that sends (with the plain average), every other aggregator, a CoMiGS scheme.
SCHEMES = [
    *((rule, ()) for rule in TRUST_RULES if rule != "local"),
    *((name, ()) for name in ("median", "trimmed-mean", "krum")),
    ("flexlora:predictions", (MIXED_RANKS,)),
    ("zero-padded", (MIXED_RANKS,)),
    ("comigs-1g1s:validation", ()),
]


def test_the_schemes_cover_every_trust_rule_and_aggregator():
    families = {name.partition(":")[0] for name, _ in SCHEMES}
    rules = {name.partition(":")[2] or ("fedavg" if name in AGGREGATORS else name) for name, _ in SCHEMES}
    assert set(TRUST_RULES) - {"local"} <= rules
    assert set(AGGREGATORS) - {"average"} <= families
    assert families & set(EXPERT_LAYOUTS)


@pytest.fixture
def sent_payloads(monkeypatch):
    """Every payload handed to the in-memory network, with the digest of its bytes when it was sent."""
    sent = []
    deliver = InMemoryNetwork.deliver

    async def spy(self, sender, to, number, payload):
        sent.append((payload, hashlib.sha256(payload).digest()))
        await deliver(self, sender, to, number, payload)

    monkeypatch.setattr(InMemoryNetwork, "deliver", spy)
    return sent


@pytest.mark.parametrize("scheme, overrides", SCHEMES, ids=[name for name, _ in SCHEMES])
def test_no_scheme_writes_into_a_received_update(workspace, sent_payloads, scheme, overrides):
    config = small_config("training.rounds=2", "training.local_steps=1", "training.select_best=false",
                          "data.val_blocks=2", "data.test_blocks=2", f'schemes=["{scheme}"]', *overrides)
    result = run_job(config, workspace, scheme, seed=0)
    assert len(sent_payloads) == 4 * 3 * 2  # a complete graph of 4, two rounds: every update was sent
    assert all(hashlib.sha256(payload).digest() == digest for payload, digest in sent_payloads)
    # Received tensors view their payload, so the check above saw whatever the schemes did to them.
    payload = sent_payloads[0][0]
    start = numpy.frombuffer(payload, dtype=numpy.uint8).ctypes.data
    assert all(start <= t.data_ptr() < start + len(payload) for t in wire.decode_update(payload).tensors.values())
    assert all(not any(r.missing for r in p.rounds) for p in result.peers.values())
