import pytest
import torch

from p2pfed.model import lm_loss, matching_paths


def test_initial_adapter_is_seeded_and_b_starts_at_zero(workspace):
    host = workspace.host
    first, again, other = host.initial_adapter(7), host.initial_adapter(7), host.initial_adapter(8)
    assert all(torch.equal(first[n], again[n]) for n in first)
    a_names = [n for n in first if n.endswith("lora_A")]
    assert a_names and any(not torch.equal(first[n], other[n]) for n in a_names)
    assert all(not first[n].any() for n in first if n.endswith("lora_B"))
    assert host.shapes() == {n: tuple(t.shape) for n, t in first.items()}


def test_a_plain_host_has_no_expert_layers(workspace):
    host = workspace.host
    assert not host.expert_layers
    assert {slot.kind for slot in host.slots} == {"lora_A", "lora_B"}
    with pytest.raises(ValueError):
        host.layout(8, generalists=1, specialists=1)


def test_targets_are_dotted_suffixes_of_module_paths(workspace):
    # One matcher for LoRA and expert targets: a suffix counts only at a dot.
    model = workspace.host.model
    layers = range(len(model.transformer.h))
    assert matching_paths(model, ["mlp.c_proj"]) == [f"transformer.h.{i}.mlp.c_proj" for i in layers]
    assert matching_paths(model, ["c_proj"]) == [f"transformer.h.{i}.{part}.c_proj" for i in layers
                                                 for part in ("attn", "mlp")]
    assert matching_paths(model, ["proj", "h.0.mlp.c"]) == []
    assert matching_paths(model, ["transformer.h.0.mlp.c_fc"]) == ["transformer.h.0.mlp.c_fc"]


def test_using_points_the_model_at_the_adapter_and_restores_it(workspace):
    host = workspace.host
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    zero = host.initial_adapter(0)
    moved = {n: (t + 0.05 if n.endswith("lora_B") else t.clone()) for n, t in zero.items()}
    placeholders = [slot.module.weight for slot in host.slots]
    with torch.no_grad():
        with host.using(zero) as model:
            base_logits = model(input_ids=batch).logits
        with host.using(moved) as model:
            moved_logits = model(input_ids=batch).logits
        with host.using(moved) as model:
            again = model(input_ids=batch).logits
    assert not torch.allclose(base_logits, moved_logits)
    assert torch.equal(moved_logits, again)
    assert [slot.module.weight for slot in host.slots] == placeholders
    with pytest.raises(RuntimeError):
        with host.using(moved):
            raise RuntimeError("boom")
    assert [slot.module.weight for slot in host.slots] == placeholders


def test_a_zero_b_adapter_leaves_the_frozen_model_unchanged(workspace):
    # B = 0 means Delta W = 0 whatever A is: two different A inits give identical outputs.
    host = workspace.host
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with host.using(host.initial_adapter(1)) as model:
            one = model(input_ids=batch).logits
        with host.using(host.initial_adapter(2)) as model:
            two = model(input_ids=batch).logits
    assert torch.allclose(one, two, atol=1e-6)


def test_only_the_bound_adapter_gets_gradients(workspace):
    host = workspace.host
    adapter = {n: torch.nn.Parameter(t.clone()) for n, t in host.initial_adapter(3).items()}
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with host.using(adapter) as model:
        lm_loss(model, batch).backward()
    assert all(p.grad is not None for n, p in adapter.items() if n.endswith("lora_B"))
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_pretrained_base_beats_uniform_guessing(workspace):
    # The default base is pretrained on other languages: it must already know something about text.
    from p2pfed.evaluate import perplexity
    from p2pfed.data import make_peer_data
    from tests.conftest import small_config

    data = make_peer_data(workspace.tokens, 4, small_config().data, seed=0)
    ppl = perplexity(workspace.host, workspace.host.initial_adapter(0), data[0].test)
    assert ppl < 0.25 * 256


def test_pretraining_is_deterministic_and_leaves_global_state_alone():
    from p2pfed.config import ModelConfig
    from p2pfed.model import pretrain_tiny

    config = ModelConfig(n_layer=1, n_embd=16, n_head=2, context=16, pretrain_steps=3, pretrain_batch_size=2)
    tokens = list(range(256)) * 2
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    one = pretrain_tiny(config, tokens, 256).state_dict()
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG was not consumed
    assert torch.get_num_threads() == threads
    two = pretrain_tiny(config, tokens, 256).state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
