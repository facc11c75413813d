"""Bring your own model: any local Hugging Face causal LM directory (here a tiny Llama saved to disk)."""

import pytest
import torch

from p2pfed.config import ConfigError, LoraConfig, ModelConfig
from p2pfed.evaluate import perplexity
from p2pfed.model import attach_lora, load_base_model


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<unk>": 0, **{chr(c): i + 1 for i, c in enumerate(range(ord("a"), ord("z") + 1))}, " ": 27}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>").save_pretrained(directory)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
        LlamaForCausalLM(config).save_pretrained(directory)
    return directory


def test_a_local_directory_loads_with_its_tokenizer_and_takes_lora(llama_dir):
    base = load_base_model(ModelConfig(source=str(llama_dir)))
    assert base.family == "llama" and base.context == 64
    ids = base.tokenizer.encode("hello world")
    assert len(ids) == 11 and 0 not in ids
    assert base.tokenizer.decode(ids).replace(" ", "") == "helloworld"
    host = attach_lora(base, LoraConfig(rank=4))
    targeted = {name.split(".")[-2] for name in host.shapes()}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    blocks = torch.tensor([base.tokenizer.encode("the quick brown fox jumps")[:16]])
    assert perplexity(host, host.initial_adapter(0), blocks) > 1.0
    assert all(not p.requires_grad for name, p in base.model.named_parameters() if "lora_" not in name)


def test_chosen_target_modules_and_bad_ones(llama_dir):
    host = attach_lora(load_base_model(ModelConfig(source=str(llama_dir))), LoraConfig(rank=2, target_modules=("q_proj",)))
    assert {name.split(".")[-2] for name in host.shapes()} == {"q_proj"}
    with pytest.raises(ConfigError, match="target_modules"):
        attach_lora(load_base_model(ModelConfig(source=str(llama_dir))), LoraConfig(target_modules=("nope",)))


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_base_model(ModelConfig(source=str(tmp_path / "absent")))
