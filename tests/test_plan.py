"""The planner: model states agree with DeepSpeed's own estimators; shipped big jobs fit."""

import sys

import pytest
from conftest import REPO
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from ftcluster.config.spec import load_spec
from ftcluster.planning.plan import Setup, host_bytes, model_state_bytes, plan_job

# Llama 65B: parameters and the largest tensor (the 32000 x 8192 embedding), as counted on the
# meta device (DeepSpeed's *_all_live helpers miscount meta tensors, so its cold estimators get these).
LLAMA_65B = (65_285_660_672, 262_144_000)
LLAMA_7B = (6_738_415_616, 131_072_000)


def slow(case: str):
    """A case left to `make test-slow` (each measures a real model for a minute)."""
    return pytest.param(case, marks=pytest.mark.slow)


def full(stage, offload_optimizer=False, offload_params=False, nodes=1, gpus=8):
    return Setup("full", "deepspeed", stage, offload_optimizer, offload_params, nodes, gpus)


@pytest.mark.parametrize("params", [LLAMA_7B, LLAMA_65B], ids=["7b", "65b"])
@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_gpu_model_states_match_deepspeed(params, nodes, offload):
    total, largest = params
    ours = sum(model_state_bytes(full(2, offload, nodes=nodes), total, total, largest, "bf16").values())
    _, theirs = estimate_zero2_model_states_mem_needs(total, 8, nodes, cpu_offload=offload)
    assert ours == pytest.approx(theirs, rel=0.05)


@pytest.mark.parametrize("params", [LLAMA_7B, LLAMA_65B], ids=["7b", "65b"])
@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("offload", [(False, False), (True, False), (True, True)], ids=["none", "opt", "opt+params"])
def test_zero3_model_states_match_deepspeed(params, nodes, offload):
    total, largest = params
    setup = full(3, *offload, nodes=nodes)
    ours_gpu = sum(model_state_bytes(setup, total, total, largest, "bf16").values())
    theirs_cpu, theirs_gpu, _ = estimate_zero3_model_states_mem_needs(
        total, largest, 8, nodes, cpu_offload=offload[0], cpu_offload_params=offload[1], zero_init=True
    )
    assert ours_gpu == pytest.approx(theirs_gpu, rel=0.05)
    if offload[0]:  # what offload keeps in host RAM per node
        assert host_bytes(setup, total, total, largest, "bf16")["offloaded states"] == pytest.approx(theirs_cpu, rel=0.05)


def test_the_65b_qlora_job_fits_its_cluster():
    plan = plan_job(load_spec(REPO / "jobs" / "llama-65b-qlora-zero3.yaml"))
    assert plan.fits, (plan.gpu_bytes, plan.host_bytes_per_node)
    assert plan.total_params > 65e9 and plan.setup.world == 32 and plan.setup.nodes == 4


def test_a_65b_full_fine_tune_on_ddp_does_not_fit():
    spec = load_spec(REPO / "jobs" / "llama-65b-qlora-zero3.yaml",
                     ["method.name=full", "distributed.backend=ddp", "distributed.offload_optimizer=none"])
    plan = plan_job(spec)
    assert not plan.fits and plan.gpu_total > 5 * plan.gpu_capacity  # 65B x 8 bytes on each GPU


def test_host_ram_is_flagged_when_offload_needs_more_than_a_node_has():
    spec = load_spec(REPO / "jobs" / "llama-65b-qlora-zero3.yaml",
                     ["method.name=full", "scaling.node_ram_gb=256", "distributed.offload_params=cpu"])
    plan = plan_job(spec)
    assert plan.gpu_total < plan.gpu_capacity and plan.host_total > plan.host_capacity and not plan.fits


def test_cli_plan_and_suggest(cli):
    result = cli("plan", REPO / "jobs" / "llama-7b-lora-ddp.yaml", "--suggest", "--top", "3")
    assert result.code == 0, result
    assert "fits" in result.out and "Feasible setups, cheapest first" in result.out
    dry = cli("train", REPO / "jobs" / "llama-65b-qlora-zero3.yaml", "--dry-run")
    assert dry.code == 0 and "Host RAM per node" in dry.out


def test_suggestions_are_feasible_and_sorted():
    from ftcluster.planning.plan import suggest

    plans = suggest(load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml"), max_nodes=2)
    assert plans and all(p.fits for p in plans)
    costs = [p.cost_per_epoch for p in plans]
    assert costs == sorted(costs)
    assert {p.setup.method for p in plans} == {"lora", "qlora"}


def _planner_memory_bench():
    import importlib.util

    location = REPO / "bench" / "planner_memory.py"
    spec = importlib.util.spec_from_file_location("planner_memory", location)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_live_tensor_peak_agrees_with_pytorchs_memtracker(tiny_model):
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import AutoModelForCausalLM

    bench = _planner_memory_bench()
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    optimizer = torch.optim.AdamW(model.parameters())
    ids = torch.randint(0, 200, (8, 128))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    reference = MemTracker()
    reference.track_external(model, optimizer)
    with reference:
        step()
    states = [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    ours = bench.LivePeak([*model.parameters(), *states, ids])
    with ours:
        step()
    expected = reference.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    assert ours.peak == pytest.approx(expected, rel=0.02)


@pytest.mark.integration
@pytest.mark.parametrize("case", [slow("full:8"), "lora+gc2:8", slow("lora+gc+chunk:8"), slow("qlora+gc:8")])
def test_planner_total_within_15_percent_of_measured_peak(case):
    rows = _planner_memory_bench().run_cases("smollm2-135m-instruct", case, 128)
    assert 0.85 <= rows[0]["ratio"] <= 1.15, rows[0]


def _gpu_node(kind: str, ram_gb: float) -> dict:
    return {"CPU": 96.0, "GPU": 8.0, f"accelerator_type:{kind}": 8.0, "memory": ram_gb * 1e9}  # Ray counts bytes


def test_cluster_capacity_check_uses_the_planner_against_the_cluster():
    from ftcluster.planning.capacity import ClusterView, capacity_problems

    spec = load_spec(REPO / "jobs" / "llama-65b-qlora-zero3.yaml")
    fits = ClusterView([_gpu_node("H100", 1500)] * 4)
    assert capacity_problems(spec, fits) == []
    lora_7b = load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml")  # DDP: every GPU holds the 13 GB base
    assert capacity_problems(lora_7b, ClusterView([_gpu_node("A100", 1500)])) == []
    problems = capacity_problems(lora_7b, ClusterView([_gpu_node("T4", 1500)]))  # 16 GB GPUs
    assert len(problems) == 1 and "GB per GPU needed, the cluster's T4 GPUs have 16 GB" in problems[0]
    small_ram = ClusterView([_gpu_node("H100", 16)] * 4)  # the plan needs ~31 GB per node
    assert any("GB of host RAM per node needed, the smallest GPU node offers 16.0 GB" in p
               for p in capacity_problems(spec, small_ram))
    too_few = ClusterView([_gpu_node("H100", 1500)] * 2)
    assert "scaling: the job needs 32 GPU (32 workers), the Ray cluster has 16" in capacity_problems(spec, too_few)
    thin_nodes = ClusterView([{"CPU": 4.0, "GPU": 8.0, "memory": 2**40}] * 4)  # 10 CPUs per worker fit nowhere
    assert any("CPU" in p for p in capacity_problems(spec, thin_nodes))


def test_planner_charges_one_chunk_of_logits_when_the_loss_is_chunked():
    def logits(*overrides):
        return plan_job(load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml", list(overrides))).gpu_bytes["logits"]

    standard = logits("training.loss_impl=standard")
    assert logits("training.loss_impl=auto") == pytest.approx(standard * 2048 / (4 * 2048))  # one chunk of 4 x 2048
    assert logits("training.loss_impl=auto", "training.compile=true") == standard  # compiled: not chunked


def test_qlora_quantizes_block_linears_only():
    from ftcluster.config.spec import build_spec
    from ftcluster.planning.plan import FOUR_BIT_BYTES, model_facts

    data = REPO / "jobs" / "data" / "quickstart-train.jsonl"
    spec = build_spec({"name": "q", "model": {"path": "llama-3.2-1b"}, "method": {"name": "qlora"},
                       "data": {"train": str(data), "max_length": 512}, "scaling": {"use_gpu": True}})
    facts = model_facts(spec, "qlora")
    config = facts.config
    hidden, inner, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    per_block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inner  # q, o; k, v; gate, up, down
    assert facts.quantized == config.num_hidden_layers * per_block
    plan = plan_job(spec)
    sixteen_bit = facts.total - facts.quantized  # embeddings, head, norms and the adapters
    assert plan.gpu_bytes["weights"] == pytest.approx(facts.quantized * FOUR_BIT_BYTES[True] + sixteen_bit * 2)
