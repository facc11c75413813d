"""How a peer weighs its neighbours and merges their adapters: registries of trust rules and aggregators.

A trust rule turns what a peer knows (its own adapter, its neighbours' updates, its validation data) into
a probability vector over itself and its neighbours; an aggregator merges the shared tensors with it. Each
is one registered function, as a Flower strategy is one class:

    @trust_rule("my-rule", temperature="validation", runs_model=True)
    def my_rule(inputs: TrustInputs) -> dict[str, float]:
        return {name: -loss for name, loss in ...}      # scores; softmaxed with trust.temperature.validation

A scheme (one row of an experiment) names the pieces: `<trust rule>` (plain LoRA, weighted average),
`<aggregator>[:<trust rule>]` or `<expert layout>[:<trust rule>]`; a missing trust rule means fedavg.
docs/extending.md shows how to add one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from p2pfed import aggregate, robust, trust
from p2pfed.config import ConfigError, ExperimentConfig, TemperatureConfig, TrustConfig
from p2pfed.experts import generalists_only, is_shared
from p2pfed.plugins import import_plugins

if TYPE_CHECKING:
    from p2pfed.model import AdapterHost
    from p2pfed.net.wire import UpdateMessage

Weights = dict[str, float]
Tensors = Mapping[str, Tensor]


# -- trust rules ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrustInputs:
    """Everything a trust rule may use: this peer's own view, never a global one."""

    peer: str
    own: Tensors  # the peer's whole adapter: shared tensors and local ones (specialists, routers)
    initial: Tensors  # the seeded adapter every peer of the swarm started from
    received: Mapping[str, UpdateMessage]  # each neighbour's usable update, by name
    degree: int  # how many neighbours the peer has (some may not have sent)
    train_tokens: int
    settings: TrustConfig
    host: AdapterHost  # runs forward passes for rules that score on validation data
    val: Tensor  # the peer's validation blocks
    mixed_ranks: bool  # neighbours may hold other LoRA ranks
    oracle_mixtures: Mapping[str, Mapping[str, float]] | None = None
    round: int = 0  # the round being aggregated (rules that score on a moving window of validation blocks)
    # The shared tensors the scheme's aggregator makes of the peer's own and the received ones under a row of
    # weights: for rules that judge a row by its aggregate. None where nobody provides it (then such rules
    # fall back to judging the candidates one by one).
    merge: Callable[[Weights], dict[str, Tensor]] | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.received)

    def shared_own(self) -> dict[str, Tensor]:
        return {name: t for name, t in self.own.items() if is_shared(name)}

    def candidates(self) -> dict[str, dict[str, Tensor]]:
        """Each neighbour's model on this peer's data: its shared tensors (at its own rank) over this
        peer's local ones, expert layers running their generalists alone (experts.generalists_only).
        The peer itself is a candidate too."""
        own = generalists_only(self.own)
        return {self.peer: own, **{n: {**own, **self.received[n].tensors} for n in self.names}}


@dataclass(frozen=True)
class TrustRule:
    name: str
    compute: Callable[[TrustInputs], Weights]
    # The field of trust.temperature whose value softmaxes this rule's scores; None: `compute` returns
    # weights already (a probability vector over the peer and its neighbours).
    temperature: str | None = None
    # Scores need forward passes: the networked peer then runs the rule holding the model; other rules run
    # beside the app's own use of the model.
    runs_model: bool = False


TRUST_RULES: dict[str, TrustRule] = {}


def trust_rule(name: str, *, temperature: str | None = None, runs_model: bool = False):
    """Register `compute` as the trust rule `name`."""
    def register(compute: Callable[[TrustInputs], Weights]) -> Callable[[TrustInputs], Weights]:
        if name in TRUST_RULES or ":" in name:
            raise ValueError(f"trust rule {name!r} is registered already, or has a colon in its name")
        known = [f.name for f in dataclasses.fields(TemperatureConfig)]
        if temperature is not None and temperature not in known:
            raise ValueError(f"trust rule {name!r}: temperature {temperature!r} is not a field of trust.temperature "
                             f"({', '.join(known)})")
        TRUST_RULES[name] = TrustRule(name, compute, temperature, runs_model)
        return compute
    return register


def trust_weights(rule: TrustRule, inputs: TrustInputs) -> Weights:
    """The peer's trust row under `rule`: finite, non-negative, summing to 1, whatever the rule returns."""
    if not inputs.received:
        return {inputs.peer: 1.0}
    values = rule.compute(inputs)
    settings = inputs.settings
    if rule.temperature is not None:
        tau = getattr(settings.temperature, rule.temperature)
        return trust.softmax_weights(values, inputs.peer, tau, settings.top_k, settings.threshold)
    return trust.sanitized_weights(values, inputs.peer)


@trust_rule("local")
def _local(inputs: TrustInputs) -> Weights:
    return trust.local_weights(inputs.peer, inputs.names)


@trust_rule("fedavg")
def _fedavg(inputs: TrustInputs) -> Weights:
    names, how = inputs.names, inputs.settings.fedavg_weights
    if how == "metropolis_hastings":
        # A degree is self-reported: at least 1 (the sender has us as a neighbour).
        return trust.metropolis_hastings_weights(
            inputs.peer, max(inputs.degree, len(names)), {n: max(1, inputs.received[n].degree) for n in names})
    if how == "data_size":
        return trust.data_size_weights(inputs.peer, inputs.train_tokens,
                                       {n: inputs.received[n].num_samples for n in names})
    return trust.uniform_weights(inputs.peer, names)


@trust_rule("oracle")
def _oracle(inputs: TrustInputs) -> Weights:
    mixtures = inputs.oracle_mixtures or {}
    return trust.oracle_weights(inputs.peer, {n: mixtures[n] for n in [inputs.peer, *inputs.names]})


def _self_as_closest(scores: Weights, peer: str) -> Weights:
    """A similarity to the peer's own adapter or predictions is trivially highest for the peer itself (cosine 1,
    distance 0), which would keep it local; it counts instead as much as its closest neighbour."""
    others = [v for n, v in scores.items() if n != peer and math.isfinite(v)]
    return {**scores, peer: max(others)} if others else scores


@trust_rule("weights", temperature="weights")
def _weights(inputs: TrustInputs) -> Weights:
    return _self_as_closest(_weight_similarities(inputs), inputs.peer)


def _weight_similarities(inputs: TrustInputs) -> Weights:
    shared = inputs.shared_own()
    received = {n: inputs.received[n].tensors for n in inputs.names}
    if inputs.mixed_ranks:
        # Factors of different ranks live in different bases: compare the full updates s B A.
        scale = inputs.host.scale
        return trust.product_cosine_scores(aggregate.lora_pairs(shared, scale),
                                           {n: aggregate.lora_pairs(t, scale) for n, t in received.items()},
                                           inputs.peer)
    reference = None
    if inputs.settings.weights_compare == "update":
        reference = {n: t for n, t in inputs.initial.items() if n in shared}
    return trust.cosine_scores(shared, received, inputs.peer, reference)


@trust_rule("validation", temperature="validation", runs_model=True)
def _validation(inputs: TrustInputs) -> Weights:
    from p2pfed import evaluate

    return evaluate.validation_scores(inputs.host, inputs.candidates(), inputs.val)


@trust_rule("predictions", temperature="predictions", runs_model=True)
def _predictions(inputs: TrustInputs) -> Weights:
    from p2pfed import evaluate

    settings = inputs.settings
    scores = evaluate.predictions_scores(inputs.host, inputs.peer, inputs.candidates(), inputs.val,
                                         settings.predictions_top_k, settings.predictions_distance)
    return _self_as_closest(scores, inputs.peer)


@trust_rule("spread", runs_model=True)
def _spread(inputs: TrustInputs) -> Weights:
    """The default. Validation scores on the first trust.score_tokens tokens of every validation block (the
    whole mixture of the peer's data at a fraction of the cost), weighed by a Gaussian kernel on their gap to
    the best score whose width follows their spread (trust.spread_weights; docs/algorithms.md)."""
    from p2pfed import evaluate

    settings = inputs.settings
    blocks = evaluate.score_tokens(inputs.val, settings.score_tokens)
    scores = evaluate.validation_scores(inputs.host, inputs.candidates(), blocks)
    return trust.spread_weights(scores, inputs.peer, settings.spread_width, settings.spread_floor,
                                settings.spread_ceiling, settings.top_k, settings.threshold)


@trust_rule("adaptive", runs_model=True)
def _adaptive(inputs: TrustInputs) -> Weights:
    """Validation scores on a moving window of blocks, softmaxed at each of trust.adaptive_temperatures and
    uniformly; the row whose aggregate scores best on the same blocks wins. The temperature thus adapts to the
    setting (sharp where groups differ, flat where averaging helps), judged on the model actually kept."""
    from p2pfed import evaluate

    settings, host = inputs.settings, inputs.host
    blocks = evaluate.score_window(inputs.val, settings.score_blocks, inputs.round)
    candidates = inputs.candidates()
    scores = evaluate.validation_scores(host, candidates, blocks)
    rows = [trust.softmax_weights(scores, inputs.peer, tau, settings.top_k, settings.threshold)
            for tau in sorted(settings.adaptive_temperatures)]
    rows.append(trust.uniform_weights(inputs.peer, inputs.names))
    if inputs.merge is None:
        return rows[0]
    own = candidates[inputs.peer]
    # Ties keep the sharpest row (the earliest): it trusts only what the scores single out.
    losses = [evaluate.mean_loss(host, {**own, **inputs.merge(row)}, blocks) for row in rows]
    best = min(range(len(rows)), key=lambda i: (losses[i] if math.isfinite(losses[i]) else math.inf, i))
    return rows[best]


# -- aggregators ----------------------------------------------------------------------------

@dataclass(frozen=True)
class AggregationInputs:
    peer: str
    states: Mapping[str, Tensors]  # shared tensors: the peer's own and each usable neighbour's
    weights: Mapping[str, float]  # the trust row over the same names
    scale: Callable[[int], float]  # the LoRA scale of a rank
    settings: TrustConfig


@dataclass(frozen=True)
class Aggregator:
    name: str
    merge: Callable[[AggregationInputs], dict[str, Tensor]]
    mixed_ranks: bool = False  # neighbours may hold other ranks (their factors are projected, not averaged)
    uses_trust: bool = True  # False: the robust baselines, which take every update whatever the trust


AGGREGATORS: dict[str, Aggregator] = {}


def aggregator(name: str, *, mixed_ranks: bool = False, uses_trust: bool = True):
    """Register `merge` as the aggregator `name` (also a scheme's family: `name[:trust rule]`)."""
    def register(merge: Callable[[AggregationInputs], dict[str, Tensor]]):
        if name in AGGREGATORS or ":" in name:
            raise ValueError(f"aggregator {name!r} is registered already, or has a colon in its name")
        AGGREGATORS[name] = Aggregator(name, merge, mixed_ranks, uses_trust)
        return merge
    return register


def _weighted(inputs: AggregationInputs) -> tuple[dict[str, Tensors], dict[str, float]]:
    """The states and weights of the peers with positive weight (the peer itself always included)."""
    states = {n: s for n, s in inputs.states.items() if n == inputs.peer or inputs.weights.get(n, 0.0) > 0}
    return states, {n: w for n, w in inputs.weights.items() if n in states}


@aggregator("average")
def _average(inputs: AggregationInputs) -> dict[str, Tensor]:
    return aggregate.weighted_average(*_weighted(inputs))


@aggregator("flexlora", mixed_ranks=True)
def _flexlora(inputs: AggregationInputs) -> dict[str, Tensor]:
    states, weights = _weighted(inputs)
    return aggregate.project_adapter(states, weights, inputs.peer, inputs.scale, "flexlora")


@aggregator("zero-padded", mixed_ranks=True)
def _zero_padded(inputs: AggregationInputs) -> dict[str, Tensor]:
    states, weights = _weighted(inputs)
    return aggregate.project_adapter(states, weights, inputs.peer, inputs.scale, "zero_padded")


# Byzantine-robust baselines: they ignore trust and take every usable update, the peer's own among them.

@aggregator("median", uses_trust=False)
def _median(inputs: AggregationInputs) -> dict[str, Tensor]:
    return robust.coordinate_median(inputs.states)


@aggregator("trimmed-mean", uses_trust=False)
def _trimmed_mean(inputs: AggregationInputs) -> dict[str, Tensor]:
    return robust.trimmed_mean(inputs.states, inputs.settings.trim_fraction)


@aggregator("krum", uses_trust=False)
def _krum(inputs: AggregationInputs) -> dict[str, Tensor]:
    # Multi-Krum: the mean of the n - f updates that sit closest to their neighbours.
    byzantine = inputs.settings.krum_byzantine
    return robust.multi_krum(inputs.states, byzantine, keep=max(1, len(inputs.states) - byzantine))


# -- schemes --------------------------------------------------------------------------------

# Expert layouts of the CoMiGS schemes: (generalists, specialists) per expert layer.
EXPERT_LAYOUTS: dict[str, tuple[int, int]] = {"comigs-1g1s": (1, 1), "comigs-2g": (2, 0), "comigs-2s": (0, 2)}


@dataclass(frozen=True)
class Scheme:
    """One row of an experiment: how peers adapt, weigh their neighbours and aggregate."""

    name: str
    trust: str  # a key of TRUST_RULES
    aggregator: str = "average"  # a key of AGGREGATORS
    generalists: int = 0  # experts per adapted layer; 0 and 0: plain LoRA
    specialists: int = 0

    @property
    def has_experts(self) -> bool:
        return self.generalists + self.specialists > 0

    @property
    def shares_anything(self) -> bool:
        return self.trust != "local" and (not self.has_experts or self.generalists > 0)

    @property
    def mixed_ranks(self) -> bool:
        return AGGREGATORS[self.aggregator].mixed_ranks


def parse_scheme(name: str) -> Scheme:
    """"fedavg", "flexlora", "flexlora:predictions", "zero-padded", "comigs-1g1s:validation", ..."""
    family, sep, rule = name.partition(":")
    if family in TRUST_RULES and not sep:
        return Scheme(name=name, trust=family)
    rule = rule if sep else "fedavg"
    families = [a for a in AGGREGATORS if a != "average"] + list(EXPERT_LAYOUTS)
    if rule not in TRUST_RULES or rule == "local" or family not in families:
        known = [*TRUST_RULES, *families]
        raise ConfigError(f"schemes: unknown scheme {name!r} (known: {', '.join(known)}; a family may take a "
                          f"trust rule after a colon, e.g. 'flexlora:predictions')")
    if sep and family in AGGREGATORS and not AGGREGATORS[family].uses_trust:
        raise ConfigError(f"schemes: {family!r} ignores trust, so {name!r} would compute a trust rule for nothing: "
                          f"write {family!r}")
    if family in EXPERT_LAYOUTS:
        generalists, specialists = EXPERT_LAYOUTS[family]
        return Scheme(name=name, trust=rule, generalists=generalists, specialists=specialists)
    return Scheme(name=name, trust=rule, aggregator=family)


def check_schemes(config: ExperimentConfig) -> tuple[Scheme, ...]:
    """Every scheme of `config`, parsed and checked against the peers' ranks (its plugins imported first)."""
    import_plugins(config.plugins)  # the user's rules and aggregators, registered once per process
    schemes = tuple(parse_scheme(name) for name in config.schemes)
    ranks = sorted({config.rank_of(i) for i in range(config.num_peers)})
    if len(ranks) == 1:
        return schemes
    for scheme in schemes:
        if scheme.has_experts:
            raise ConfigError(
                f"schemes: {scheme.name!r} needs one rank on every peer (a layer's experts run as one batched "
                f"product), but the profiles give ranks {ranks}; mixed-rank expert layers are not supported")
        if not scheme.mixed_ranks and scheme.shares_anything:
            flex = "flexlora" if scheme.trust == "fedavg" else f"flexlora:{scheme.trust}"
            raise ConfigError(
                f"schemes: {scheme.name!r} averages A and B, which needs one LoRA rank, but the profiles give "
                f"ranks {ranks}: use {flex!r} (or 'zero-padded', the naive baseline)")
    return schemes
