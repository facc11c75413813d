"""model.device and model.dtype as torch objects, and whether the asked device exists on this machine.

ModelConfig.validate checks the names; whether CUDA or MPS is there is known only on the machine that loads
the model, so it is checked here, when the model loads, in one line naming the key.
"""

from __future__ import annotations

import torch

from p2pfed.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """"auto": the first CUDA device when torch sees one, else the CPU; any other name must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError('model.device: "mps" is not available here (no Apple GPU torch can use); '
                              'use "cpu" or "auto"')
        return torch.device("mps")
    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise ConfigError(f'model.device: {name!r} is not available here ({why}); use "cpu" or "auto"')
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"model.device: {name!r} is not available here (torch sees "
                          f"{torch.cuda.device_count()} CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a model's weights are (the device its inputs must be on)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
