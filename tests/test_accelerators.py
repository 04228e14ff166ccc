"""One accelerator table, one matching rule: names from users, Ray and torch resolve to the right
GPU (an A100 is never an A10, an L40S never an L4), and an unknown gpu_type is a validation error."""

import pytest
from conftest import REPO

from ftcluster.config.spec import load_spec
from ftcluster.core.accelerators import find_accelerator, known_names
from ftcluster.planning.capacity import ClusterView, capacity_problems


@pytest.mark.parametrize(("name", "expected", "memory"), [
    ("A100", "A100", 80), ("A10", "A10", 24), ("A10G", "A10G", 24),
    ("L40S", "L40S", 48), ("L4", "L4", 24), ("NVIDIA L40S", "L40S", 48), ("NVIDIA L4", "L4", 24),
    ("A100-40G", "A100-40G", 40), ("A100-80G", "A100-80G", 80),
    ("NVIDIA A100-SXM4-40GB", "A100-40G", 40), ("NVIDIA A100-SXM4-80GB", "A100-80G", 80),
    ("NVIDIA H100 80GB HBM3", "H100", 80), ("NVIDIA H100 PCIe", "H100-PCIE", 80), ("h200", "H200", 141),
    ("Tesla V100-SXM2-16GB", "V100-16G", 16),
])
def test_names_resolve_exactly_or_by_longest_prefix(name, expected, memory):
    accelerator = find_accelerator(name)
    assert accelerator is not None and accelerator.name == expected and accelerator.memory_gb == memory


@pytest.mark.parametrize("name", ["NoSuchGPU", "A1000", "L400", "H1", ""])
def test_unknown_names_are_not_guessed(name):
    assert find_accelerator(name) is None


def _gpu_nodes(kind: str, count: int = 1) -> ClusterView:
    return ClusterView([{"CPU": 96.0, "GPU": 8.0, f"accelerator_type:{kind}": 8.0, "memory": 1500e9}] * count)


def test_capacity_tells_a100_from_a10_and_l40s_from_l4():
    # About 34 GB per GPU: fits 80 GB A100s and 48 GB L40S, not 24 GB A10s or L4s.
    spec = load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml", ["training.batch_size=2", "training.gradient_checkpointing=false"])
    assert capacity_problems(spec, _gpu_nodes("A100")) == []
    assert capacity_problems(spec, _gpu_nodes("L40S")) == []
    for small in ("A10", "L4"):
        problems = capacity_problems(spec, _gpu_nodes(small))
        assert len(problems) == 1 and f"the cluster's {small} GPUs have 24 GB" in problems[0], problems


def test_capacity_tells_a100_40g_from_a100_80g():
    spec = load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml", ["training.batch_size=4", "training.gradient_checkpointing=false"])  # ~52 GB per GPU
    assert capacity_problems(spec, _gpu_nodes("A100-80G")) == []
    assert "have 40 GB" in capacity_problems(spec, _gpu_nodes("A100-40G"))[0]


def test_unknown_gpu_type_is_a_validation_error_naming_the_known_ones(cli):
    result = cli("validate", REPO / "jobs" / "quickstart.yaml", "scaling.gpu_type=NoSuchGPU")
    assert result.code == 2 and "Traceback" not in result.err
    assert "scaling.gpu_type" in result.err and "unknown GPU type 'NoSuchGPU'" in result.err
    assert all(name in result.err for name in known_names())


def test_plan_prices_and_peaks_come_from_the_table():
    from ftcluster.planning.plan import GB, plan_job
    from ftcluster.track.cost import hourly_price
    from ftcluster.track.flops import peak_flops_of

    plan = plan_job(load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml", ["scaling.gpu_type=A100-40G"]))
    assert plan.gpu_capacity == 40 * GB
    spec = load_spec(REPO / "jobs" / "llama-7b-lora-ddp.yaml", ["cost.gpu_hour_usd={A100-40G: 0.5}"])
    assert hourly_price("NVIDIA A100-SXM4-40GB", spec.cost) == 0.5  # the user's price, found by the same rule
    assert hourly_price("A100-80G", spec.cost) == 1.79 and peak_flops_of("NVIDIA L4") == 121e12
