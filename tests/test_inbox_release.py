"""The update inbox forgets what no later round can use as soon as a round has aggregated."""

import torch

from p2pfed.loop import UpdateInbox
from p2pfed.net import wire


def update(sender, round_index):
    return wire.UpdateMessage(sender=sender, round=round_index, tensors={"x": torch.zeros(2)})


def test_release_before_keeps_only_what_the_next_rounds_may_use():
    inbox = UpdateInbox(max_ahead=2)
    for message in (update("a", 2), update("a", 3), update("a", 4), update("b", 2)):
        assert inbox.put(message, current_round=3)
    assert {n: m.round for n, m in inbox.for_round(3).items()} == {"a": 3, "b": 2}  # b's stale one stands in
    inbox.release_before(3)
    assert {n: m.round for n, m in inbox.for_round(3).items()} == {"a": 3}  # b's round-2 update is gone
    assert inbox.has_reached("a", 4) and not inbox.has_reached("b", 2)
    assert {n: m.round for n, m in inbox.for_round(4).items()} == {"a": 4}


def test_a_neighbour_sending_every_round_number_never_holds_more_than_max_ahead_plus_two():
    inbox = UpdateInbox(max_ahead=2)
    for current in range(1, 12):
        for round_index in range(0, 30):  # stale, current, far ahead: only r-1 .. r+2 are kept
            inbox.put(update("a", round_index), current_round=current)
        assert inbox.held() == 4
        assert set(inbox.for_round(current)) == {"a"}
        inbox.release_before(current)
        assert inbox.held() == 3
