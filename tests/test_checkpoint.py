import json
import math
import os
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from p2pfed import checkpoint as ckpt
from p2pfed.checkpoint import (
    CheckpointError,
    PeerCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from p2pfed.data import BatchStream

DIM = 5


# ---------------------------------------------------------------------------
# A tiny trainer: two parameters, AdamW with two parameter groups, batches from a BatchStream.

def make_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(23, DIM + 1, generator=g)  # features, then a regression target


class Trainer:
    def __init__(self, init_seed: int, stream_seed: int):
        g = torch.Generator().manual_seed(init_seed)
        self.params = {"w": nn.Parameter(torch.randn(DIM, generator=g)), "b": nn.Parameter(torch.zeros(()))}
        self.optimizer = torch.optim.AdamW([
            {"params": [self.params["w"]]},
            {"params": [self.params["b"]], "lr": 0.05, "betas": (0.8, 0.99)},
        ], lr=0.01, weight_decay=0.1)
        self.stream = BatchStream(make_data(), 4, torch.Generator().manual_seed(stream_seed))
        self.steps = 0

    def train(self, steps: int) -> None:
        for _ in range(steps):
            batch = next(self.stream)
            loss = ((batch[:, :DIM] @ self.params["w"] + self.params["b"] - batch[:, DIM]) ** 2).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps += 1

    def checkpoint(self, round_index: int) -> PeerCheckpoint:
        return PeerCheckpoint(round=round_index, steps=self.steps,
                              tensors={k: p.detach() for k, p in self.params.items()},
                              optimizers={"adapter": self.optimizer.state_dict()},
                              streams={"train": self.stream.state()})

    def restore(self, checkpoint: PeerCheckpoint) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(checkpoint.tensors[name])
        self.optimizer.load_state_dict(checkpoint.optimizers["adapter"])
        self.stream.restore(checkpoint.streams["train"])
        self.steps = checkpoint.steps


def test_resumed_training_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight = Trainer(init_seed=1, stream_seed=2)
    straight.train(13)  # more than one epoch of 6 batches, so the resume crosses an epoch boundary

    first = Trainer(init_seed=1, stream_seed=2)
    first.train(5)
    save_checkpoint(tmp_path, first.checkpoint(round_index=1))
    del first  # the process dies

    # A restarted process builds everything afresh (other seeds: only the checkpoint can make it match).
    resumed = Trainer(init_seed=7, stream_seed=8)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 1 and loaded.steps == 5
    resumed.restore(loaded)
    resumed.train(8)

    assert resumed.steps == straight.steps
    for name in straight.params:
        assert torch.equal(resumed.params[name], straight.params[name]), name
    a, b = resumed.optimizer.state_dict(), straight.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index in b["state"]:
        for key, value in b["state"][index].items():
            assert torch.equal(a["state"][index][key], value), (index, key)


def test_optimizer_state_round_trips_exactly(tmp_path):
    trainer = Trainer(0, 0)
    trainer.train(3)
    original = trainer.optimizer.state_dict()
    save_checkpoint(tmp_path, trainer.checkpoint(0))
    loaded = load_checkpoint(tmp_path).optimizers["adapter"]
    assert loaded["param_groups"] == original["param_groups"]  # tuples (betas) and None values included
    assert isinstance(loaded["param_groups"][1]["betas"], tuple)
    assert set(loaded["state"]) == {0, 1}  # parameter indices come back as ints, as torch keys them
    step = loaded["state"][0]["step"]
    assert step.dtype == original["state"][0]["step"].dtype and step.dim() == 0 and step.item() == 3


# ---------------------------------------------------------------------------
# Atomicity and damage.

def small(round_index: int, **fields) -> PeerCheckpoint:
    return PeerCheckpoint(round=round_index, steps=10 * round_index,
                          tensors={"lora_A": torch.full((2, 3), float(round_index))}, **fields)


def generations(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("ckpt-"))


def test_no_checkpoint_yet(tmp_path):
    assert load_checkpoint(tmp_path / "missing") is None
    assert load_checkpoint(tmp_path) is None
    (tmp_path / "ckpt-000001-abc").mkdir()  # a first save that crashed before its commit
    assert load_checkpoint(tmp_path) is None


def test_saving_again_replaces_the_checkpoint_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "identity.key").write_text("other state in the same folder")
    first = save_checkpoint(tmp_path, small(1))
    second = save_checkpoint(tmp_path, small(2))
    assert not first.exists() and second.parent == tmp_path
    assert generations(tmp_path) == [second.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CURRENT", second.name, "identity.key"]
    assert load_checkpoint(tmp_path).tensors["lora_A"].eq(2.0).all()
    assert sorted(p.name for p in second.iterdir()) == ["state.json", "tensors.safetensors"]


@pytest.mark.parametrize("crash_at", ["tensors.safetensors", "state.json", "CURRENT.tmp", "commit"])
def test_a_crash_during_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, crash_at):
    save_checkpoint(tmp_path, small(1))
    real_write, real_replace = ckpt._write, os.replace

    def write(path, data):
        if path.name == crash_at:
            path.write_bytes(data[: len(data) // 2])  # half-written, then the process dies
            raise KeyboardInterrupt
        real_write(path, data)

    def replace(src, dst):
        if crash_at == "commit":
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(ckpt, "_write", write)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, small(2))
    monkeypatch.undo()

    assert len(generations(tmp_path)) == 2  # the leftover is there ...
    assert load_checkpoint(tmp_path).round == 1  # ... and ignored
    latest = save_checkpoint(tmp_path, small(3))
    assert generations(tmp_path) == [latest.name]  # the next save removes it
    assert load_checkpoint(tmp_path).round == 3


def test_a_save_that_cannot_encode_its_state_changes_nothing(tmp_path):
    save_checkpoint(tmp_path, small(1))
    with pytest.raises(TypeError, match="meta/when.*set"):
        save_checkpoint(tmp_path, small(2, meta={"when": {1, 2}}))
    assert load_checkpoint(tmp_path).round == 1 and len(generations(tmp_path)) == 1


# A committed checkpoint that is damaged afterwards (disk, hand edits) is an error, not a silent fallback to
# an older state or to a fresh start: the peer would lose or repeat work without anyone noticing.

def damage(folder, name, edit):
    path = folder / name
    path.write_bytes(edit(path.read_bytes()))


def test_truncated_tensors_are_reported(tmp_path):
    folder = save_checkpoint(tmp_path, small(1))
    damage(folder, "tensors.safetensors", lambda b: b[:-7])
    with pytest.raises(CheckpointError, match="tensors.safetensors.*truncated or corrupted"):
        load_checkpoint(tmp_path)


def test_wrong_format_version_is_reported(tmp_path):
    folder = save_checkpoint(tmp_path, small(1))
    damage(folder, "state.json", lambda b: json.dumps({**json.loads(b), "format": 99}).encode())
    with pytest.raises(CheckpointError, match="format version 99.*reads version 1"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda b: b[: len(b) // 2], "missing or unreadable"),
    (lambda b: b"[]", "not a p2pfed peer checkpoint"),
    (lambda b: json.dumps({**json.loads(b), "round": "one"}).encode(), "round and steps must be integers"),
    (lambda b: b.replace(b'"tensors/lora_A"', b'"tensors/lora_B"'), "damaged checkpoint.*lora_B"),
])
def test_damaged_state_json_is_reported(tmp_path, edit, message):
    folder = save_checkpoint(tmp_path, small(1))
    damage(folder, "state.json", edit)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path)


def test_missing_files_or_folder_are_reported(tmp_path):
    folder = save_checkpoint(tmp_path, small(1))
    (folder / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing or unreadable"):
        load_checkpoint(tmp_path)
    (tmp_path / "CURRENT").write_text("../elsewhere")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        load_checkpoint(tmp_path)
    assert issubclass(CheckpointError, ValueError)


def test_a_bad_stream_state_is_reported_on_load(tmp_path):
    stream = BatchStream(torch.arange(4).unsqueeze(1), 3, torch.Generator())
    next(stream)
    folder = save_checkpoint(tmp_path, small(1, streams={"train": stream.state()}))
    damage(folder, "state.json", lambda b: b.replace(b'"position": 3', b'"position": 9'))
    with pytest.raises(CheckpointError, match="position 9"):
        load_checkpoint(tmp_path)


# ---------------------------------------------------------------------------
# The JSON side.

def test_trust_history_meta_and_streams_round_trip(tmp_path):
    history = [{"round": 0, "steps": 0, "train_loss": None, "test_ppl": 41.5, "trust": {}, "missing": (),
                "online": True},
               {"round": 1, "steps": 8, "train_loss": float("nan"), "test_ppl": float("inf"),
                "trust": {"peer0": 0.75, "peer1": 0.25}, "missing": ("peer2",), "online": True}]
    meta = {"peer": "peer0", "config_sha256": "ab" * 32, "$odd": [1, 2.5, "x"], 7: "int key"}
    streams = {"train": BatchStream(torch.arange(5).unsqueeze(1), 2, torch.Generator().manual_seed(1)).state()}
    save_checkpoint(tmp_path, small(1, trust={"peer0": 0.75, "peer1": 0.25}, history=history, meta=meta,
                                    streams=streams))
    loaded = load_checkpoint(tmp_path)
    assert loaded.trust == {"peer0": 0.75, "peer1": 0.25}
    assert loaded.meta == meta
    assert loaded.history[0] == history[0] and loaded.history[1]["missing"] == ("peer2",)
    assert math.isnan(loaded.history[1]["train_loss"]) and loaded.history[1]["test_ppl"] == math.inf
    state = loaded.streams["train"]
    assert state.permutation is None and torch.equal(state.generator, streams["train"].generator)
    assert (tmp_path / "CURRENT").read_text() in {p.name for p in tmp_path.iterdir()}
    document = json.loads(next(tmp_path.glob("ckpt-*/state.json")).read_text())
    assert document["format"] == ckpt.FORMAT_VERSION and document["meta"]["$dict"][0] == ["peer", "peer0"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (st.lists(inner, max_size=4) | st.tuples(inner, inner)
                   | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=80, deadline=None)
@given(history=st.lists(st.dictionaries(st.text(max_size=5), json_values, max_size=4), max_size=3),
       meta=st.dictionaries(st.text(max_size=5) | st.integers(), json_values, max_size=4))
def test_any_json_like_history_and_meta_round_trip(history, meta):
    # Tuples, int keys and keys that look like the format's own markers ("$tuple") must all come back as given.
    with tempfile.TemporaryDirectory() as directory:
        save_checkpoint(directory, PeerCheckpoint(round=0, steps=0, history=history, meta=meta))
        loaded = load_checkpoint(directory)
    assert loaded.history == history and loaded.meta == meta
