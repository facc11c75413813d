import dataclasses
import itertools

import pytest
import torch

from p2pfed.config import ConfigError, DataConfig
from p2pfed.data import (
    ByteTokenizer,
    PeerData,
    batches,
    builtin_corpus_dir,
    load_group_texts,
    load_pretrain_text,
    make_peer_data,
    peer_groups,
    tokenize_groups,
)

BUILTIN_GROUPS = ("english", "italian", "spanish", "portuguese")
SMALL = DataConfig(groups=("a", "b", "c"), block_len=4, train_blocks=8, val_blocks=4, test_blocks=4)


def unique_tokens(blocks_per_group: int, block_len: int = 4, groups=("a", "b", "c")) -> dict[str, torch.Tensor]:
    """Streams in which every token is unique across groups, so a block's first token names it."""
    n = blocks_per_group * block_len
    return {g: torch.arange(i * 10**6, i * 10**6 + n + block_len // 2) for i, g in enumerate(groups)}


def block_ids(blocks: torch.Tensor) -> list[int]:
    return blocks[:, 0].tolist()


def group_of(block_id: int) -> int:
    return block_id // 10**6


# ---------------------------------------------------------------------------
# Tokenizer and text sources.

def test_byte_tokenizer_round_trip_with_non_ascii():
    tok = ByteTokenizer()
    text = "Perché no? ¿Qué tal? Ação — naïve 日本 🙂\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8")) > len(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(ids[:-3]).endswith("\ufffd")  # a cut multi-byte character is replaced, not an error


def test_builtin_groups_load_and_are_non_trivial():
    texts = load_group_texts("builtin", BUILTIN_GROUPS)
    assert list(texts) == list(BUILTIN_GROUPS)
    for group, text in texts.items():
        assert len(text.encode("utf-8")) > 20_000, group
        assert "\n\n" in text and "conversations:" not in text and "- - " not in text
    tokens = tokenize_groups(texts, ByteTokenizer().encode)
    assert all(t.dtype == torch.int64 and t.dim() == 1 for t in tokens.values())
    # The default config must fit the built-in corpus.
    peers = make_peer_data(tokens, 8, DataConfig(), seed=0)
    assert [p.group for p in peers] == ["english"] * 4 + ["italian"] * 4


def test_unknown_builtin_group_lists_the_available_ones():
    with pytest.raises(ConfigError, match="klingon.*english.*italian"):
        load_group_texts("builtin", ["english", "klingon"])
    assert "pretrain" not in str(pytest.raises(ConfigError, load_group_texts, "builtin", ["x"]).value)


def test_pretrain_text_does_not_leak_group_lines():
    pretrain = {line for line in load_pretrain_text().splitlines() if len(line) >= 40}
    assert len(load_pretrain_text()) > 20_000
    for group in BUILTIN_GROUPS:
        lines = (builtin_corpus_dir() / f"{group}.txt").read_text(encoding="utf-8").splitlines()
        assert not pretrain & {line for line in lines if len(line) >= 40}, group


def test_folder_source_with_sub_folders_and_files(tmp_path):
    (tmp_path / "north").mkdir()
    (tmp_path / "north" / "b.txt").write_text("second\n", encoding="utf-8")
    (tmp_path / "north" / "a.txt").write_text("first\n\n", encoding="utf-8")
    (tmp_path / "north" / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "south.txt").write_text("città del sud\n", encoding="utf-8")
    texts = load_group_texts(str(tmp_path), ["north", "south"])
    assert texts == {"north": "first\n\nsecond\n", "south": "città del sud\n"}


def test_folder_source_missing_group_names_it_and_lists_available(tmp_path):
    (tmp_path / "north").mkdir()
    (tmp_path / "north" / "a.txt").write_text("x", encoding="utf-8")
    (tmp_path / "south.txt").write_text("y", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"'east'.*available: north, south"):
        load_group_texts(str(tmp_path), ["north", "east"])
    with pytest.raises(ConfigError, match="data.source"):
        load_group_texts(str(tmp_path / "nowhere"), ["north"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no .txt files"):
        load_group_texts(str(tmp_path), ["empty"])


# ---------------------------------------------------------------------------
# Splitting.

def test_peer_groups_is_contiguous():
    assert peer_groups(8, ["en", "it"]) == ["en"] * 4 + ["it"] * 4
    assert peer_groups(3, ["a", "b", "c"]) == ["a", "b", "c"]
    assert peer_groups(5, ["a", "b"]) == ["a", "a", "a", "b", "b"]


@pytest.mark.parametrize("split", ["specific", "mixed", "dirichlet"])
def test_splits_are_disjoint_within_and_across_peers(split):
    config = dataclasses.replace(SMALL, split=split)
    peers = make_peer_data(unique_tokens(80), 6, config, seed=3)
    assert [p.name for p in peers] == [f"peer{i}" for i in range(6)]
    seen = []
    for peer in peers:
        assert peer.train.shape == (8, 4) and peer.val.shape == (4, 4) and peer.test.shape == (4, 4)
        assert peer.train.dtype == torch.int64
        for blocks in (peer.train, peer.val, peer.test):
            # Whole blocks of the source stream: consecutive tokens starting at a multiple of block_len.
            assert torch.equal(blocks - blocks[:, :1], torch.arange(4).expand_as(blocks))
            assert all(i % 10**6 % 4 == 0 for i in block_ids(blocks))
            seen += block_ids(blocks)
    assert len(seen) == len(set(seen)) == 6 * 16


def test_same_seed_same_tensors_other_seed_other_tensors():
    config = dataclasses.replace(SMALL, split="dirichlet")
    tokens = unique_tokens(80)
    a, b = make_peer_data(tokens, 4, config, seed=7), make_peer_data(tokens, 4, config, seed=7)
    c = make_peer_data(tokens, 4, config, seed=8)
    for x, y in zip(a, b):
        assert x.mixture == y.mixture
        assert all(torch.equal(getattr(x, s), getattr(y, s)) for s in ("train", "val", "test"))
    assert any(not torch.equal(x.train, z.train) for x, z in zip(a, c))
    assert [x.mixture for x in a] != [z.mixture for z in c]


def test_does_not_touch_global_rng():
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    make_peer_data(unique_tokens(80), 4, dataclasses.replace(SMALL, split="dirichlet"), seed=1)
    assert torch.equal(torch.rand(3), before)


def test_specific_mixture_draws_from_the_own_group_only():
    peers = make_peer_data(unique_tokens(80), 6, SMALL, seed=0)
    for peer, own in zip(peers, peer_groups(6, SMALL.groups)):
        assert peer.mixture == {g: (1.0 if g == own else 0.0) for g in SMALL.groups}
        assert peer.group == own
        ids = block_ids(torch.cat([peer.train, peer.val, peer.test]))
        assert {group_of(i) for i in ids} == {SMALL.groups.index(own)}


def test_mixed_mixture_is_three_quarters_own_rest_next_group():
    config = dataclasses.replace(SMALL, split="mixed", train_blocks=16, val_blocks=8, test_blocks=4)
    peers = make_peer_data(unique_tokens(120), 3, config, seed=0)
    for i, peer in enumerate(peers):
        own, nxt = i, (i + 1) % 3
        assert peer.mixture[SMALL.groups[own]] == 0.75 and peer.mixture[SMALL.groups[nxt]] == 0.25
        assert peer.group == SMALL.groups[own]
        for blocks, n in ((peer.train, 16), (peer.val, 8), (peer.test, 4)):
            groups = [group_of(b) for b in block_ids(blocks)]
            assert groups.count(own) == n * 3 // 4 and groups.count(nxt) == n // 4


def test_mixed_with_a_single_group_is_all_own():
    config = DataConfig(groups=("a",), split="mixed", block_len=4, train_blocks=4, val_blocks=2, test_blocks=2)
    peers = make_peer_data(unique_tokens(40, groups=("a",)), 2, config, seed=0)
    assert all(p.mixture == {"a": 1.0} for p in peers)


def test_dirichlet_mixtures_sum_to_one_and_blocks_follow_them():
    config = dataclasses.replace(SMALL, split="dirichlet", dirichlet_alpha=0.5, train_blocks=20)
    peers = make_peer_data(unique_tokens(400), 8, config, seed=0)
    for peer in peers:
        assert list(peer.mixture) == list(SMALL.groups)
        assert sum(peer.mixture.values()) == pytest.approx(1.0)
        assert all(p >= 0 for p in peer.mixture.values())
        groups = [group_of(b) for b in block_ids(peer.train)]
        for k, g in enumerate(SMALL.groups):  # largest remainder: within one block of the exact share
            assert abs(groups.count(k) - 20 * peer.mixture[g]) < 1.0
    assert len({p.group for p in peers}) > 1  # not every peer draws the same mixture


def test_group_ties_go_to_the_first_listed():
    peer = PeerData("peer0", torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), {"b": 0.5, "a": 0.5})
    assert peer.group == "b"


def test_exhausted_group_raises_a_helpful_error():
    # 3 peers of group "a" need 3 * 16 = 48 blocks; "a" has 40.
    with pytest.raises(ConfigError) as info:
        make_peer_data(unique_tokens(40), 9, SMALL, seed=0)
    message = str(info.value)
    assert "'a'" in message and "40 available, 48 needed" in message
    assert "data.train_blocks" in message and "data.val_blocks" in message and "data.test_blocks" in message


def test_missing_group_tokens_raise():
    with pytest.raises(ConfigError, match="'?c'?"):
        make_peer_data(unique_tokens(40, groups=("a", "b")), 2, SMALL, seed=0)


# ---------------------------------------------------------------------------
# Mini-batches.

def test_batches_visit_each_block_once_per_epoch_and_reshuffle():
    blocks = torch.arange(10).unsqueeze(1).repeat(1, 3)
    stream = batches(blocks, 4, torch.Generator().manual_seed(0))
    epochs = []
    for _ in range(3):
        epoch = list(itertools.islice(stream, 3))  # 4 + 4 + 2
        assert [len(b) for b in epoch] == [4, 4, 2]
        ids = torch.cat(epoch)[:, 0].tolist()
        assert sorted(ids) == list(range(10))
        epochs.append(ids)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    again = batches(blocks, 4, torch.Generator().manual_seed(0))
    assert torch.cat(list(itertools.islice(again, 3)))[:, 0].tolist() == epochs[0]


# ---------------------------------------------------------------------------
# Resumable mini-batch streams.

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pfed.data import BatchStream, BatchStreamState


def old_batches(blocks, batch_size, generator):
    """The generator function BatchStream replaced, kept verbatim: the batch sequence must not change."""
    while True:
        perm = torch.randperm(len(blocks), generator=generator).to(blocks.device)
        for start in range(0, len(blocks), batch_size):
            yield blocks[perm[start:start + batch_size]]


def ids_of(stream, count):
    return [b[:, 0].tolist() for b in itertools.islice(stream, count)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 13), st.integers(1, 6), st.integers(0, 2**32), st.integers(0, 40))
def test_batch_stream_matches_the_old_generator(num_blocks, batch_size, seed, count):
    blocks = torch.arange(num_blocks).unsqueeze(1).repeat(1, 2)
    stream = batches(blocks, batch_size, torch.Generator().manual_seed(seed))
    assert isinstance(stream, BatchStream) and iter(stream) is stream
    assert ids_of(stream, count) == ids_of(old_batches(blocks, batch_size, torch.Generator().manual_seed(seed)), count)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 13), st.integers(1, 6), st.integers(0, 2**32), st.integers(0, 30), st.integers(1, 30))
def test_batch_stream_resumes_anywhere(num_blocks, batch_size, seed, before, after):
    blocks = torch.arange(num_blocks).unsqueeze(1)
    stream = BatchStream(blocks, batch_size, torch.Generator().manual_seed(seed))
    ids_of(stream, before)
    state = stream.state()
    expected = ids_of(stream, after)
    # A fresh stream, as in a restarted process: another seed, so only the restored state can explain a match.
    fresh = BatchStream(blocks, batch_size, torch.Generator().manual_seed(seed + 1))
    fresh.restore(state)
    assert ids_of(fresh, after) == expected
    stream.restore(state)  # the state is a snapshot: the stream it came from moved on, it did not
    assert ids_of(stream, after) == expected


def test_batch_stream_state_before_the_first_batch_and_at_an_epoch_end():
    blocks = torch.arange(6).unsqueeze(1)
    stream = BatchStream(blocks, 4, torch.Generator().manual_seed(3))
    start = stream.state()
    assert start.permutation is None and start.position == 0 and start.num_blocks == 6
    ids_of(stream, 2)  # 4 + 2: the epoch is used up, the next permutation not yet drawn
    end = stream.state()
    assert end.position == 6 and sorted(end.permutation.tolist()) == list(range(6))
    assert end.generator.dtype == torch.uint8 and end.permutation.dtype == torch.int64


def test_batch_stream_validation():
    blocks = torch.arange(5).unsqueeze(1)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        batches(blocks, 0, torch.Generator())
    with pytest.raises(ValueError, match="at least one block"):
        batches(blocks[:0], 2, torch.Generator())
    state = BatchStream(blocks, 2, torch.Generator()).state()
    with pytest.raises(ValueError, match="over 5 blocks into one over 4 blocks"):
        BatchStream(blocks[:4], 2, torch.Generator()).restore(state)
    good = torch.arange(5)
    for bad in [{"permutation": torch.tensor([0, 1, 2, 3, 3])}, {"permutation": good[:4]},
                {"permutation": good.int()}, {"permutation": good, "position": 6},
                {"permutation": None, "position": 1}, {"generator": state.generator.long()}, {"position": 1.0}]:
        with pytest.raises(ValueError, match="BatchStreamState"):
            dataclasses.replace(state, **{"permutation": good, "position": 1, **bad})
    with pytest.raises(ValueError, match="does not fit"):
        BatchStream(blocks, 2, torch.Generator()).restore(dataclasses.replace(state, generator=state.generator[:10]))


def test_batch_stream_state_is_frozen():
    state = BatchStream(torch.arange(3).unsqueeze(1), 2, torch.Generator()).state()
    assert isinstance(state, BatchStreamState)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.position = 1
