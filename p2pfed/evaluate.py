"""Forward passes a peer runs on its own data: test perplexity and trust scores for neighbours.

Everything here runs in eval mode under inference_mode and sees only the calling peer's blocks.
Logits are reduced at once (to a mean loss or to top-k log-probs), never kept over the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from p2pfed.model import AdapterHost
from p2pfed.trust import predictions_distance


def _chunks(blocks: torch.Tensor, batch_size: int):
    for start in range(0, len(blocks), batch_size):
        yield blocks[start:start + batch_size]


@torch.inference_mode()
def mean_loss(host: AdapterHost, adapter: Mapping[str, torch.Tensor], blocks: torch.Tensor,
              batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over every predicted token of `blocks`."""
    total, count = 0.0, 0
    blocks = blocks.to(host.device)  # data stays on the CPU until a pass needs it
    with host.using(adapter) as model:
        for batch in _chunks(blocks, batch_size):
            logits = model(input_ids=batch).logits[:, :-1].float()  # a bf16 or fp16 base: the loss in float32
            targets = batch[:, 1:]
            total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                 reduction="sum").item()
            count += targets.numel()
    return total / count


def perplexity(host: AdapterHost, adapter: Mapping[str, torch.Tensor], blocks: torch.Tensor,
               batch_size: int = 32) -> float:
    return math.exp(mean_loss(host, adapter, blocks, batch_size))


def score_window(blocks: torch.Tensor, count: int, round_index: int) -> torch.Tensor:
    """`count` of `blocks` for round `round_index`: a window that moves by `count` each round and wraps, so every
    block is scored in turn (0, or at least as many as there are: all of them). Deterministic, no RNG."""
    if count <= 0 or count >= len(blocks):
        return blocks
    start = (round_index * count) % len(blocks)
    return blocks[[(start + i) % len(blocks) for i in range(count)]]


def score_tokens(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` tokens of every block (0, or at least a block's length: whole blocks). Scoring on a
    prefix of every block keeps the peer's whole validation mixture at a fraction of the cost, where a window
    of a few whole blocks may hold mostly one of its groups."""
    if count <= 0 or count >= blocks.shape[1]:
        return blocks
    return blocks[:, :max(2, count)]


def validation_scores(host: AdapterHost, candidates: Mapping[str, Mapping[str, torch.Tensor]],
                      blocks: torch.Tensor) -> dict[str, float]:
    """S_ij = - mean loss of candidate j's adapter on this peer's validation blocks."""
    return {name: -mean_loss(host, adapter, blocks) for name, adapter in candidates.items()}


@torch.inference_mode()
def _log_probs(host: AdapterHost, adapter: Mapping[str, torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
    with host.using(adapter) as model:
        logits = model(input_ids=blocks.to(host.device)).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])


def predictions_scores(host: AdapterHost, self_name: str, candidates: Mapping[str, Mapping[str, torch.Tensor]],
                       blocks: torch.Tensor, top_k: int, kind: str, batch_size: int = 32) -> dict[str, float]:
    """S_ij = - distance between j's and i's next-token distributions on i's validation inputs.

    Chunked over blocks: full-vocabulary log-probs exist for one chunk at a time (a 50k vocabulary would
    otherwise need hundreds of MB per neighbour). The distance is a mean over positions, so the chunks'
    distances are averaged weighted by their number of positions.
    """
    totals = {name: 0.0 for name in candidates if name != self_name}
    positions = 0
    for chunk in _chunks(blocks, batch_size):
        own = _log_probs(host, candidates[self_name], chunk)
        own_top, own_index = own.topk(min(top_k, own.shape[-1]), dim=-1)
        del own
        for name in totals:
            distance = predictions_distance(own_top, own_index, _log_probs(host, candidates[name], chunk), kind)
            totals[name] += float(distance) * own_top.shape[0]
        positions += own_top.shape[0]
    return {self_name: 0.0, **{name: -total / positions for name, total in totals.items()}}
