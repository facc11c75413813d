"""model.device and model.dtype reach every tensor (checked on the CPU: bf16, explicit cpu, an absent CUDA), and a
GGUF base is dequantized once per process."""

import math
import os

import pytest
import torch

from p2pfed import local_model
from p2pfed.config import ConfigError, ModelConfig
from p2pfed.device import resolve_device
from p2pfed.job import open_workspace
from p2pfed.load import load_experiment
from p2pfed.model import load_base_model
from p2pfed.swarm import run_job


def tiny_job(*overrides: str):
    return load_experiment(None, [
        "num_peers=2", 'data.groups=["english", "italian"]', "data.train_blocks=4", "data.val_blocks=2",
        "data.test_blocks=2", "training.rounds=1", "training.local_steps=2", *overrides])


def adapters_seen(monkeypatch):
    """Every adapter tensor the peers' training steps run with, recorded by a wrapper around train_steps."""
    from p2pfed import training

    seen = []
    original = training.train_steps

    def recording(host, adapter, *args):
        seen.extend(adapter.values())
        return original(host, adapter, *args)

    monkeypatch.setattr(training, "train_steps", recording)
    return seen


def test_a_bf16_base_holds_every_frozen_weight_in_bf16_and_trains_float32_adapters(monkeypatch):
    config = tiny_job('model.dtype="bf16"', 'model.device="cpu"', 'schemes=["validation"]')
    workspace = open_workspace(config, log=lambda *_: None)
    base = dict(workspace.base.model.named_parameters())
    assert base and all(p.dtype == torch.bfloat16 for p in base.values())
    seen = adapters_seen(monkeypatch)
    result = run_job(config, workspace, "validation", 0)
    assert seen and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in seen)
    # The host's own frozen weights are the base's bf16 tensors (a structure copy, not a float copy).
    frozen = [p for n, p in workspace.host.model.named_parameters() if "lora_" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    for peer in result.peers.values():
        assert all(math.isfinite(r.test_ppl) for r in peer.rounds if r.test_ppl is not None)


def test_expert_layers_run_on_a_bf16_base():
    config = tiny_job('model.dtype="bf16"', 'schemes=["comigs-1g1s"]')
    workspace = open_workspace(config, log=lambda *_: None)
    result = run_job(config, workspace, "comigs-1g1s", 0)
    assert all(math.isfinite(p.rounds[-1].test_ppl) for p in result.peers.values())


def test_an_explicit_cpu_puts_the_base_and_adapters_on_the_cpu():
    base = load_base_model(ModelConfig(device="cpu"), log=lambda *_: None)
    assert {p.device.type for p in base.model.parameters()} == {"cpu"}
    assert {p.dtype for p in base.model.parameters()} == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_one_line_naming_the_key():
    assert resolve_device("auto") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError) as error:
            load_base_model(ModelConfig(device=name), log=lambda *_: None)
        message = str(error.value)
        assert message.startswith("model.device:") and name in message and "\n" not in message


def test_a_device_or_dtype_that_is_no_such_thing_is_refused_at_load():
    with pytest.raises(ConfigError, match="model.device"):
        load_experiment(None, ['model.device="gpu"'])
    with pytest.raises(ConfigError, match="model.dtype"):
        load_experiment(None, ['model.dtype="int8"'])


def test_a_gguf_file_is_dequantized_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """transformers' GGUF reading is replaced by a tiny GPT-2 that counts its loads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    loads = []

    def fake_model(directory, gguf_file=None, **kwargs):
        loads.append(gguf_file)
        return GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=8, n_layer=1, n_head=2))

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_model)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: object())
    local_model._dequantized_gguf.cache_clear()
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    first = load_base_model(ModelConfig(source=str(path)))
    second = load_base_model(ModelConfig(source=str(path), dtype="bf16"))
    assert loads == ["model.gguf"]
    assert next(first.model.parameters()).dtype == torch.float32  # the other load's dtype did not reach it
    assert next(second.model.parameters()).dtype == torch.bfloat16
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    load_base_model(ModelConfig(source=str(path)))
    assert loads == ["model.gguf", "model.gguf"]
    local_model._dequantized_gguf.cache_clear()
