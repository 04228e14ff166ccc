"""The chunked loss equals the standard one (value and gradients), through PEFT and in a run."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import train_losses

from ftcluster.config.spec import DataSpec, MethodSpec
from ftcluster.data import build_data
from ftcluster.data.batches import collate
from ftcluster.evaluation.metrics import loss_sum
from ftcluster.models.chunked_loss import chunked_loss_sum, output_head
from ftcluster.models.load import load_pretrained, load_tokenizer, resolve_model
from ftcluster.models.methods import apply_method


@pytest.mark.parametrize("method", ["full", "lora"])
def test_chunked_loss_and_gradients_equal_standard(method, tiny_model, tiny_data):
    resolved = resolve_model(str(tiny_model))
    tokenizer = load_tokenizer(resolved)
    bundle = build_data(DataSpec(train=str(tiny_data["train"]), format="instruction", max_length=64), tokenizer)
    batch = collate(bundle.train[:6], tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = load_pretrained(resolved, "causal_lm", dtype=torch.float32)
    if method == "lora":
        model = apply_method(model, MethodSpec(name="lora", lora={"rank": 4, "alpha": 8, "dropout": 0.0}), "causal_lm")
    twin = copy.deepcopy(model)
    head = output_head(model)
    assert head is not None and head is not output_head(twin)
    standard = loss_sum(twin, batch)
    chunked = chunked_loss_sum(model, batch, head, chunk_tokens=7)  # several chunks, a ragged last one
    assert chunked.item() == pytest.approx(standard.item(), rel=1e-5)
    standard.backward()
    chunked.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for name, parameter in twin.named_parameters():
        if parameter.requires_grad:
            torch.testing.assert_close(grads[name], parameter.grad, rtol=1e-4, atol=1e-6)
    assert "lm_head.weight" in dict(model.named_parameters()) or method == "lora"
    assert "forward" not in vars(head)  # the head is itself again after the pass


def test_chunked_run_matches_standard_run(make_job, cli, tmp_path):
    chunked = make_job("chunked", training={"loss_impl": "chunked", "loss_chunk_tokens": 64})
    standard = make_job("standard", training={"loss_impl": "standard"})
    assert cli("train", chunked, "--no-ray").code == 0
    assert cli("train", standard, "--no-ray").code == 0
    assert train_losses(tmp_path / "runs" / "chunked") == pytest.approx(train_losses(tmp_path / "runs" / "standard"), rel=1e-5)


def test_which_loss_each_setup_gets(make_job):
    from ftcluster.config.spec import load_spec
    from ftcluster.objectives.sft import use_chunked_loss

    def spec(**sections):
        return load_spec(make_job("which", **sections))

    assert use_chunked_loss(spec(training={"loss_impl": "auto"}))
    assert not use_chunked_loss(spec(training={"loss_impl": "standard"}))
    assert use_chunked_loss(spec(training={"loss_impl": "chunked"}))
    assert not use_chunked_loss(spec(training={"loss_impl": "chunked"}, method={"name": "prefix"}))
    assert not use_chunked_loss(spec(training={"loss_impl": "auto", "compile": True}))
    zero3 = spec(training={"loss_impl": "chunked"}, distributed={"backend": "deepspeed", "zero_stage": 3})
    assert not use_chunked_loss(zero3)


@pytest.mark.slow
@pytest.mark.integration  # starts Ray with two workers
def test_chunked_full_finetune_under_ddp_matches_one_worker(make_job, cli, tmp_path):
    # The head's gradient comes from outside the DDP forward: it must still be averaged across workers.
    one = make_job("one", method={"name": "full"}, training={"batch_size": 8, "loss_impl": "standard"})
    two = make_job("two", method={"name": "full"}, scaling={"num_workers": 2},
                   training={"batch_size": 4, "loss_impl": "chunked", "loss_chunk_tokens": 64})
    assert cli("train", one, "--no-ray").code == 0
    result = cli("train", two)
    assert result.code == 0, result
    assert train_losses(tmp_path / "runs" / "two") == pytest.approx(train_losses(tmp_path / "runs" / "one"), rel=1e-4)


def test_linear_cross_entropy_matches_autograd_with_bias_and_scaling():
    from ftcluster.models.chunked_loss import LinearCrossEntropy

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=generator, requires_grad=True)
    weight = torch.randn(30, 8, generator=generator, requires_grad=True)
    bias = torch.randn(30, generator=generator, requires_grad=True)
    targets = torch.randint(0, 30, (11,), generator=generator)
    ours = LinearCrossEntropy.apply(hidden, weight, bias, targets, 4, torch.float32, True) / 3
    ours.backward()
    mine = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    reference = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, targets, reduction="sum") / 3
    reference.backward()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, tensor in zip(mine, (hidden, weight, bias)):
        torch.testing.assert_close(got, tensor.grad, rtol=1e-5, atol=1e-6)


def test_linear_cross_entropy_under_bf16_autocast_follows_autocast_dtypes():
    generator = torch.Generator().manual_seed(1)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(2, 9, 16, generator=generator, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9), generator=generator)

    class Body(torch.nn.Module):  # a "model" whose logits are the head applied to given hidden states
        def __init__(self):
            super().__init__()
            self.lm_head = head

        def get_output_embeddings(self):
            return self.lm_head

        def forward(self, input_ids, use_cache=False):
            return type("Out", (), {"logits": self.lm_head(hidden)})()

    batch = {"input_ids": labels, "labels": labels}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_loss_sum(Body(), batch, head, chunk_tokens=5)
        reference = torch.nn.functional.cross_entropy(
            head(hidden)[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), reduction="sum")
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(reference.item(), rel=2e-2)
    ours.backward()
    mine = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad = head.weight.grad = None
    reference.backward()
    assert mine[0].dtype == torch.float32 and mine[1].dtype == torch.float32  # the leaves' own dtypes
    torch.testing.assert_close(mine[0], hidden.grad, rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(mine[1], head.weight.grad, rtol=5e-2, atol=5e-3)
