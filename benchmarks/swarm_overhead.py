"""Framework overhead: peer-steps per second of an in-process swarm against a plain peft loop.

Side A, the framework: `swarm.run_job` with the "local" scheme (no messages, no trust), 8 peers on
the default experiment. Side B, what a peft user would write for the same work: one model, one named
LoRA adapter per simulated peer, `set_adapter` to switch, AdamW on that adapter's parameters, the
same batches in the same order (round by round, peer by peer, as the swarm's trio tasks run).

run_job always evaluates test perplexity at round 0 and at the last round. That time is measured
where it is spent (a timing wrapper around `evaluate.perplexity`) and subtracted, so both sides count
training only. Setup is not subtracted from the swarm (data split, adapter copies, optimizers: a few
milliseconds); the plain side builds its adapters once, outside the timing. Best-round selection
(training.select_best) is off here for the same reason: it is evaluation on the validation split, work the
plain loop does not do, not overhead; its own cost is measured by trust_cost.py (select / train).

    .venv/bin/python benchmarks/swarm_overhead.py

Target: swarm peer-steps/s >= 0.95 x the plain loop's.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model

from common import default_config, interleaved, median, quiet, setup
from p2pfed import evaluate
from p2pfed.config import ExperimentConfig
from p2pfed.data import PeerData, batches
from p2pfed.model import KNOWN_TARGETS, load_base_model, lm_loss
from p2pfed.seeding import generator
from p2pfed.job import Workspace, job_setup, open_workspace
from p2pfed.swarm import run_job

PEERS = 8
ROUNDS = 3
LOCAL_STEPS = 10
REPEATS = 3
SEED = 0
TARGET = 0.95


def overhead_config() -> ExperimentConfig:
    return default_config(
        f"num_peers={PEERS}", 'schemes=["local"]', f"training.rounds={ROUNDS}",
        f"training.local_steps={LOCAL_STEPS}", "training.eval_every=1000000", "training.select_best=false",
    )


@contextlib.contextmanager
def evaluation_time() -> Iterator[list[float]]:
    """Seconds spent in evaluate.perplexity inside the block (peers call it through the module)."""
    spent = [0.0]
    original = evaluate.perplexity

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    evaluate.perplexity = timed
    try:
        yield spent
    finally:
        evaluate.perplexity = original


def run_swarm(config: ExperimentConfig, workspace: Workspace, evaluations: list[float]) -> None:
    """One run_job; appends the seconds it spent evaluating to `evaluations`, to be subtracted."""
    with evaluation_time() as spent:
        run_job(config, workspace, "local", SEED)
    evaluations.append(spent[0])


class PlainPeftLoop:
    """The simplest multi-peer loop with peft: one model, a named adapter per peer, set_adapter to switch."""

    def __init__(self, config: ExperimentConfig, data: list[PeerData]):
        base = load_base_model(config.model, log=quiet)  # its own copy: the workspace's model is already wrapped
        lora = PeftLoraConfig(
            r=config.lora.rank, lora_alpha=config.lora.alpha, lora_dropout=0.0,
            target_modules=list(KNOWN_TARGETS["gpt2"]), fan_in_fan_out=True, task_type="CAUSAL_LM",
        )
        self.data = data
        self.training = config.training
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes about Conv1D and deprecated HF names
            self.model = get_peft_model(base.model, lora, adapter_name=data[0].name)
            for peer in data[1:]:
                self.model.add_adapter(peer.name, lora)

    def run(self) -> None:
        t = self.training
        optimizers = {}
        for peer in self.data:
            params = [p for name, p in self.model.named_parameters() if f".{peer.name}." in name]
            optimizers[peer.name] = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        # The swarm's peers draw their batches from these very streams.
        streams = {p.name: batches(p.train, t.batch_size, generator(SEED, "batches", p.name)) for p in self.data}
        for _ in range(t.rounds):
            for peer in self.data:
                self.model.set_adapter(peer.name)
                optimizer = optimizers[peer.name]
                for _ in range(t.local_steps):
                    loss = lm_loss(self.model, next(streams[peer.name]))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    loss.item()  # a user logs the loss; the swarm does too


def main() -> dict:
    setup()
    config = overhead_config()
    workspace = open_workspace(config, log=quiet)
    _, data = job_setup(config, workspace, SEED)
    plain = PlainPeftLoop(config, data)
    evaluations: list[float] = []
    times = interleaved({"swarm": lambda: run_swarm(config, workspace, evaluations), "plain": plain.run},
                        REPEATS, warmup=1)
    evaluations = evaluations[1:]  # drop the warm-up run's
    times["swarm"] = [wall - spent for wall, spent in zip(times["swarm"], evaluations)]

    peer_steps = PEERS * ROUNDS * LOCAL_STEPS
    swarm_rate = peer_steps / median(times["swarm"])
    plain_rate = peer_steps / median(times["plain"])
    ratio = swarm_rate / plain_rate
    print(f"swarm overhead: {PEERS} peers x {ROUNDS} rounds x {LOCAL_STEPS} steps, batch "
          f"{config.training.batch_size}, median of {REPEATS} interleaved runs (evaluation time subtracted)")
    print(f"  swarm (run_job, local)  : {swarm_rate:7.1f} peer-steps/s")
    print(f"  plain peft loop         : {plain_rate:7.1f} peer-steps/s")
    print(f"  ratio swarm / plain     : {ratio:7.2f}  (target >= {TARGET})")
    print(f"  subtracted evaluation   : {median(evaluations):7.2f} s per run "
          f"({median(evaluations) / (median(times['swarm']) + median(evaluations)):.0%} of the swarm's wall time)")
    return {"swarm_peer_steps_per_s": swarm_rate, "plain_peer_steps_per_s": plain_rate,
            "ratio_swarm_over_plain": ratio, "target": TARGET,
            "swarm_times_s": times["swarm"], "plain_times_s": times["plain"],
            "evaluation_s": median(evaluations)}


if __name__ == "__main__":
    main()
