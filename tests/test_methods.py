"""Each method trains exactly the parameters it should; schedules and layer-wise rates."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from ftcluster.config.spec import MethodSpec
from ftcluster.models.methods import (
    UnfreezeSchedule,
    apply_method,
    count_params,
    quantization_config,
)
from ftcluster.training.optim import lr_lambda, param_groups


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model)


def test_full_trains_everything(model):
    model = apply_method(model, MethodSpec(name="full"), "causal_lm")
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_freeze_trains_top_blocks_and_head(model):
    model = apply_method(model, MethodSpec(name="freeze", freeze={"top_blocks": 1}), "causal_lm")
    names = trainable(model)
    assert names and all(n.startswith(("model.layers.1.", "model.norm.", "lm_head.")) for n in names)
    assert "lm_head.weight" in names and "model.norm.weight" in names
    assert not any(n.startswith("model.layers.0.") for n in names)


def test_freeze_head_only_and_by_pattern(model):
    model = apply_method(model, MethodSpec(name="freeze", freeze={"modules": [r".*embed_tokens.*"]}), "causal_lm")
    assert trainable(model) == {"lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"}


@pytest.mark.parametrize("name, marker", [("lora", "lora_"), ("dora", "lora_"), ("prefix", "prompt_encoder")])
def test_peft_methods_train_only_adapters(model, name, marker):
    model = apply_method(model, MethodSpec(name=name), "causal_lm")
    names = trainable(model)
    assert names and all(marker in n for n in names)
    if name == "dora":
        assert any("lora_magnitude_vector" in n for n in names)


def test_lora_target_modules(model):
    spec = MethodSpec(name="lora", lora={"rank": 2, "target_modules": ["q_proj", "v_proj"]})
    model = apply_method(model, spec, "causal_lm")
    names = trainable(model)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}
    # rank 2: A is 2 x 64 and B is out x 2 for each of q (64 out) and v (32 out) in 2 layers.
    assert count_params(model).trainable == 2 * (2 * 64 + 64 * 2 + 2 * 64 + 32 * 2)


def test_qlora_quantizes_base_to_4bit_and_trains_lora(tiny_model):
    spec = MethodSpec(name="qlora")
    base = AutoModelForCausalLM.from_pretrained(tiny_model, quantization_config=quantization_config(spec, torch.float32))
    model = apply_method(base, spec, "causal_lm")
    kinds = {type(p).__name__ for n, p in model.named_parameters() if "q_proj.base_layer" in n}
    assert kinds == {"Params4bit"}
    assert all("lora_" in n for n in trainable(model))
    assert count_params(model).total == count_params(apply_method(AutoModelForCausalLM.from_pretrained(tiny_model), MethodSpec(name="lora"), "causal_lm")).total


def test_unfreeze_schedule_goes_top_down(model):
    spec = MethodSpec(name="full", unfreeze={"every": 2, "unit": "steps"})
    model = apply_method(model, spec, "causal_lm")
    schedule = UnfreezeSchedule(model, spec, steps_per_epoch=10, base_trainable=trainable(model))
    schedule.apply(0)
    assert trainable(model) == {"lm_head.weight", "model.norm.weight"}
    schedule.apply(2)
    assert any(n.startswith("model.layers.1.") for n in trainable(model))
    assert not any(n.startswith("model.layers.0.") for n in trainable(model))
    schedule.apply(4)
    assert any(n.startswith("model.layers.0.") for n in trainable(model))
    assert "model.embed_tokens.weight" not in trainable(model)
    schedule.apply(6)
    assert trainable(model) == {n for n, _ in model.named_parameters()}


def test_layerwise_learning_rates_decay_from_the_top(model):
    groups = param_groups(model, lr=1.0, weight_decay=0.1, layerwise_decay=0.5, include=lambda n, p: True)
    rate = {name: g["lr"] for g in groups for name in g["names"]}
    assert rate["lm_head.weight"] == 1.0
    assert rate["model.layers.1.self_attn.q_proj.weight"] == 0.5
    assert rate["model.layers.0.self_attn.q_proj.weight"] == 0.25
    assert rate["model.embed_tokens.weight"] == 0.125
    decay = {name: g["weight_decay"] for g in groups for name in g["names"]}
    assert decay["model.layers.0.input_layernorm.weight"] == 0.0  # norms are not decayed
    assert decay["model.layers.0.mlp.up_proj.weight"] == 0.1


def test_schedules_warm_up_then_decay():
    cosine = lr_lambda("cosine", warmup_steps=2, total_steps=10)
    assert [round(cosine(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    linear = lr_lambda("linear", warmup_steps=0, total_steps=4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert lr_lambda("constant", 0, 5)(3) == 1.0


def test_selective_checkpointing_same_gradients_less_recompute(tmp_path):
    from test_plan import _planner_memory_bench

    from ftcluster.models.blocks import checkpoint_every_nth_block
    from ftcluster.models.tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "four-layers", layers=4)
    ids = torch.randint(0, 200, (4, 96), generator=torch.Generator().manual_seed(0))
    results = {}
    for every in (0, 1, 2):  # 0: no checkpointing
        model = AutoModelForCausalLM.from_pretrained(folder).train()
        if every:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert checkpoint_every_nth_block(model, every) == 4 // every
            assert [layer.gradient_checkpointing for layer in model.model.layers] == [i % every == 0 for i in range(4)]
        tracker = _planner_memory_bench().LivePeak([*model.parameters(), *model.buffers(), ids])
        with tracker:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        gradients = torch.cat([p.grad.flatten() for p in model.parameters()])
        results[every] = (tracker.peak, gradients)
    torch.testing.assert_close(results[1][1], results[0][1])
    torch.testing.assert_close(results[2][1], results[0][1])
    assert results[1][0] < results[2][0] < results[0][0]  # memory: all blocks < every 2nd < none
