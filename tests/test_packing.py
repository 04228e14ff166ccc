"""Packed training: attention kernels, the run-time isolation check, and the spec's refusals."""

import contextlib

import pytest
import torch
from conftest import train_losses

from ftcluster.config.spec import load_spec
from ftcluster.core.errors import FtError, ModelError
from ftcluster.models.load import check_attention, load_pretrained, resolve_model
from ftcluster.runs.paths import RunPaths
from ftcluster.training.packing import check_packing_isolation


def test_isolation_check_passes_a_llama_and_refuses_a_recurrent_model(tiny_model):
    from transformers import AutoModelForCausalLM, MambaConfig, MambaForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    check_packing_isolation(llama, torch.device("cpu"), contextlib.nullcontext)
    assert llama.training  # the check leaves the model in the mode it found it

    mamba = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=4))
    with pytest.raises(FtError, match=r"data.packing: this model \(mamba\) lets packed examples see each other"):
        check_packing_isolation(mamba, torch.device("cpu"), contextlib.nullcontext)


def test_attention_choice_reaches_the_model(tiny_model):
    model = load_pretrained(resolve_model(str(tiny_model)), "causal_lm", dtype=torch.float32,
                            attention="flex_attention")
    assert model.config._attn_implementation == "flex_attention"
    with pytest.raises(ModelError, match="flash_attention_2 needs a CUDA GPU"):
        check_attention("flash_attention_2", "cpu")
    check_attention("flex_attention", "cuda")


def test_packed_runs_train_the_same_with_sdpa_and_eager_attention(make_job, cli):
    losses = {}
    for attention in ("sdpa", "eager"):
        job = make_job(f"packed-{attention}", model={"attention": attention},
                       data={"packing": True, "max_length": 128}, training={"max_steps": 6, "batch_size": 2})
        result = cli("train", job, "--no-ray")
        assert result.code == 0, result
        losses[attention] = train_losses(RunPaths.of(load_spec(job)).local)
    assert len(losses["sdpa"]) == 6 and losses["sdpa"][-1] < losses["sdpa"][0]
    assert losses["eager"] == pytest.approx(losses["sdpa"], rel=1e-4)


@pytest.mark.parametrize("sections, message", [
    ({"method": {"name": "prefix"}, "data": {"packing": True}}, "data.packing does not work with method prefix"),
    ({"model": {"attention": "flash_attention_2"}}, "flash_attention_2 needs a CUDA GPU"),
    ({"model": {"attention": "flex_attention"}}, "flex_attention cannot train on CPU"),
])
def test_packing_and_attention_refusals_are_one_line(make_job, cli, sections, message):
    result = cli("train", make_job("refused", **sections), "--no-ray")
    assert result.code != 0
    assert message in result.err and "Traceback" not in result.err
