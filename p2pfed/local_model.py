"""A base model from this machine's disk: a Hugging Face model directory or a GGUF file (nothing is downloaded).

Transformers reads a GGUF file by dequantizing every tensor to float, which takes many seconds for even a
small model; a process may open several workspaces on the same file (a sweep's points, each worker's jobs).
So the dequantized model is kept once per process, keyed by the file's path, size and modification time
(a changed file is read again), and each load takes a copy at its own device and dtype.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from p2pfed.config import ConfigError, ModelConfig


def load_local(config: ModelConfig, dtype: torch.dtype):
    """(model, Hugging Face tokenizer) for a local directory or .gguf file; the model on the CPU in `dtype`."""
    directory, gguf_file = _location(config)
    if gguf_file:
        path = Path(directory) / gguf_file
        if not path.is_file():
            raise ConfigError(f"model.source: {path} does not exist")
        stat = path.stat()
        model, tokenizer = _dequantized_gguf(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        # A copy: the cached model stays float32 and untouched whatever this caller does with its own.
        return copy.deepcopy(model).to(dtype=dtype), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.source: cannot load {config.source}: {error}") from error
    return model, tokenizer


def _location(config: ModelConfig) -> tuple[str, str]:
    path = Path(config.source)
    if path.suffix == ".gguf" and not config.gguf_file:
        directory, gguf_file = str(path.parent), path.name
    else:
        directory, gguf_file = str(path), config.gguf_file
    if not Path(directory).exists():
        raise ConfigError(f"model.source: {config.source} does not exist (use \"tiny\", a local Hugging Face "
                          f"model directory or a .gguf file)")
    return directory, gguf_file


@functools.lru_cache(maxsize=2)
def _dequantized_gguf(path: str, size: int, mtime_ns: int):
    """The GGUF file's model in float32 on the CPU and its tokenizer, read once per (path, size, mtime)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(Path(path).parent), Path(path).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, local_files_only=True,
                                                     dtype=torch.float32)
    except (OSError, ValueError, ImportError) as error:
        raise ConfigError(f"model.source: cannot load {path}: {error}") from error
    model.requires_grad_(False)
    return model, tokenizer
