"""The cost of one round's trust scoring against that round's local training.

One peer of the default experiment, 7 neighbours (a complete graph of 8): the candidates are its own
adapter and 7 neighbour adapters, each trained a few steps on that neighbour's data (realistic values,
plain tensors as the wire delivers them). Timed side by side, interleaved:

- train: one round of local training, `training.local_steps` steps at the default batch size, through
  the peer loop's own training step (model.train_steps);
- validation: `evaluate.validation_scores` on the peer's validation blocks (data.val_blocks);
- predictions: `evaluate.predictions_scores` with the default top-k and distance;
- spread: the default trust rule through `strategies.trust_weights`, as the loop calls it: every candidate
  scored on the first trust.score_tokens tokens of every validation block, then the kernel row;
- adaptive: the `adaptive` rule the same way: every candidate scored on a window of trust.score_blocks
  validation blocks, then the aggregate of each candidate row (trust.adaptive_temperatures and the uniform
  row) on the same window;
- select: training.select_best's pass over all the validation blocks with the peer's own adapter (every
  scheme pays it, baselines too);
- whole / chunks8: validation scoring with each candidate's blocks in one batch, or in batches of 8;
- vmap: all candidates in one call, `torch.func.functional_call` vmapped over stacked adapters.

    .venv/bin/python benchmarks/trust_cost.py

Reported: validation / train, predictions / train, spread / train and adaptive / train (how much a trust round
adds to a training round; the target for the default, spread, is at most 0.3), select / train, chunks8 / whole, and looped / vmap (above 1: vmap is faster), with vmap's largest loss
difference to the looped scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call, vmap

from common import default_config, interleaved, median, quiet, setup
from p2pfed import aggregate, evaluate
from p2pfed.experts import is_shared
from p2pfed.net import wire
from p2pfed.strategies import TRUST_RULES, TrustInputs, trust_weights
from p2pfed.data import batches
from p2pfed.model import Adapter, AdapterHost, train_steps, trainable_copy
from p2pfed.seeding import derive_seed, generator
from p2pfed.job import job_setup, open_workspace, peer_specs

SEED = 0
NEIGHBOUR_STEPS = 3  # enough to move the neighbours' adapters away from the shared init
REPEATS = 9


def trained_neighbour(host: AdapterHost, initial: Adapter, train: torch.Tensor, batch_size: int, lr: float,
                      name: str) -> Adapter:
    adapter = trainable_copy(initial)
    optimizer = torch.optim.AdamW(adapter.values(), lr=lr)
    stream = batches(train, batch_size, generator(SEED, "batches", name))
    train_steps(host, adapter, optimizer, stream, NEIGHBOUR_STEPS)
    return {key: p.detach().clone() for key, p in adapter.items()}


class StackedScorer:
    """Mean validation loss of many adapters in one vmapped forward over their stacked tensors."""

    def __init__(self, host: AdapterHost):
        self.host = host
        # functional_call names parameters by module path; the slots know the modules, not the paths.
        paths = {id(module): path for path, module in host.model.named_modules()}
        self.keys = {slot.name: paths[id(slot.module)] + ".weight" for slot in host.slots}

    def _loss(self, params: Mapping[str, torch.Tensor], blocks: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.host.model, dict(params), (), {"input_ids": blocks}).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1))

    @torch.inference_mode()
    def scores(self, candidates: Mapping[str, Adapter], blocks: torch.Tensor) -> dict[str, float]:
        stacked = {key: torch.stack([c[name] for c in candidates.values()]) for name, key in self.keys.items()}
        with warnings.catch_warnings():
            # torch has no vmap rule for CPU flash attention and loops it per adapter: part of the cost measured.
            warnings.simplefilter("ignore", UserWarning)
            losses = vmap(self._loss, in_dims=(0, None))(stacked, blocks)
        return {name: -loss for name, loss in zip(candidates, losses.tolist())}


def looped_scores(host: AdapterHost, candidates: Mapping[str, Adapter], blocks: torch.Tensor,
                  batch_size: int) -> dict[str, float]:
    return {name: -evaluate.mean_loss(host, adapter, blocks, batch_size) for name, adapter in candidates.items()}


def main() -> dict:
    setup()
    config = default_config("num_peers=8")
    workspace = open_workspace(config, log=quiet)
    host, t, trust = workspace.host, config.training, config.trust
    graph, data = job_setup(config, workspace, SEED)
    spec = peer_specs(config, graph, data, "validation", SEED)[0]
    own = data[0]
    initial = host.initial_adapter(derive_seed(SEED, "shared-init"))

    # The real training step: model.train_steps, which the peer loop calls, on the peer's own batches.
    adapter = trainable_copy(initial)
    optimizer = torch.optim.AdamW(adapter.values(), lr=t.lr, weight_decay=t.weight_decay)
    stream = batches(own.train, t.batch_size, generator(SEED, "batches", own.name))

    by_name = {d.name: d for d in data}
    candidates: dict[str, Adapter] = {spec.name: {k: p.detach() for k, p in adapter.items()}}
    for name in spec.neighbours:
        candidates[name] = trained_neighbour(host, initial, by_name[name].train, t.batch_size, t.lr, name)
    val = own.val
    stacked = StackedScorer(host)

    def rule_inputs() -> TrustInputs:
        # What the loop hands the rule: the neighbours' shared tensors as received, and a merge by the aggregator.
        own_now = {k: p.detach() for k, p in adapter.items()}
        received = {n: wire.UpdateMessage(sender=n, round=1, tensors={k: v for k, v in c.items() if is_shared(k)})
                    for n, c in candidates.items() if n != spec.name}
        states = {spec.name: {k: v for k, v in own_now.items() if is_shared(k)},
                  **{n: m.tensors for n, m in received.items()}}
        return TrustInputs(peer=spec.name, own=own_now, initial=initial, received=received,
                           degree=len(received), train_tokens=int(own.train.numel()), settings=trust, host=host,
                           val=val, mixed_ranks=False, round=1,
                           merge=lambda row: aggregate.weighted_average(states, row))

    sides = {
        "train": lambda: train_steps(host, adapter, optimizer, stream, t.local_steps),
        "validation": lambda: evaluate.validation_scores(host, candidates, val),
        "predictions": lambda: evaluate.predictions_scores(host, spec.name, candidates, val,
                                                           trust.predictions_top_k, trust.predictions_distance),
        "spread": lambda: trust_weights(TRUST_RULES["spread"], rule_inputs()),
        "adaptive": lambda: trust_weights(TRUST_RULES["adaptive"], rule_inputs()),
        "select": lambda: evaluate.mean_loss(host, adapter, val),
        "whole": lambda: looped_scores(host, candidates, val, len(val)),
        "chunks8": lambda: looped_scores(host, candidates, val, 8),
        "vmap": lambda: stacked.scores(candidates, val),
    }
    times = {name: median(values) for name, values in interleaved(sides, REPEATS).items()}
    looped, batched = looped_scores(host, candidates, val, len(val)), stacked.scores(candidates, val)
    vmap_error = max(abs(looped[name] - batched[name]) for name in candidates)

    ratios = {
        "validation_over_train": times["validation"] / times["train"],
        "predictions_over_train": times["predictions"] / times["train"],
        "spread_over_train": times["spread"] / times["train"],
        "adaptive_over_train": times["adaptive"] / times["train"],
        "select_over_train": times["select"] / times["train"],
        "chunks8_over_whole": times["chunks8"] / times["whole"],
        "looped_over_vmap": times["whole"] / times["vmap"],
    }
    print(f"trust cost: {len(candidates)} candidates (self + {len(spec.neighbours)} neighbours) on {len(val)} x "
          f"{val.shape[1]} validation tokens vs a round of {t.local_steps} steps at batch {t.batch_size}, "
          f"median of {REPEATS} interleaved")
    for name, seconds in times.items():
        print(f"  {name:12s}: {seconds * 1e3:7.1f} ms")
    print(f"  validation / train : {ratios['validation_over_train']:5.2f}")
    print(f"  predictions / train: {ratios['predictions_over_train']:5.2f}")
    print(f"  spread / train     : {ratios['spread_over_train']:5.2f}  (the default; {trust.score_tokens} tokens of "
          f"every block; target <= 0.3)")
    print(f"  adaptive / train   : {ratios['adaptive_over_train']:5.2f}  ({trust.score_blocks} blocks, "
          f"{len(trust.adaptive_temperatures) + 1} candidate rows)")
    print(f"  select / train     : {ratios['select_over_train']:5.2f}  (best-round selection, every scheme)")
    print(f"  chunks of 8 / whole: {ratios['chunks8_over_whole']:5.2f}")
    print(f"  looped / vmap      : {ratios['looped_over_vmap']:5.2f}  (vmap works; largest loss difference "
          f"{vmap_error:.1e})")
    return {"times_s": times, **ratios, "vmap_max_abs_loss_difference": vmap_error}


if __name__ == "__main__":
    main()
