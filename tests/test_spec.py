"""The job spec: strict validation, every problem at once, dotted overrides, shipped jobs."""


import pytest
from conftest import REPO

from ftcluster.config.spec import JobSpec, apply_overrides, load_spec
from ftcluster.core.errors import SpecError

JOBS = sorted((REPO / "jobs").glob("*.yaml"))


def test_jobs_folder_is_not_empty():
    assert len(JOBS) >= 2


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_every_shipped_job_validates(job, cli):
    spec = load_spec(job)
    assert isinstance(spec, JobSpec)
    result = cli("validate", job)
    assert result.code == 0, result


def test_every_problem_is_reported_at_once_with_its_path(tmp_path, cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nmodel: {path: minilm-l6}\n"
        "data: {train: d.jsonl, formt: text}\n"
        "training: {lr: -1, batch_size: many}\n"
    )
    result = cli("validate", bad)
    assert result.code == 2
    lines = [line for line in result.err.splitlines() if line.strip()]
    joined = "\n".join(lines)
    assert "data.formt: unknown key (valid keys:" in joined
    assert "training.lr: Input should be greater than 0" in joined
    assert "training.batch_size: Input should be a valid integer" in joined
    assert len(lines) == 3
    assert "Traceback" not in result.err + result.out


def test_missing_required_sections(tmp_path, cli):
    bad = tmp_path / "empty.yaml"
    bad.write_text("name: x\n")
    result = cli("validate", bad)
    assert result.code == 2
    assert f"{bad}: model: missing required key" in result.err
    assert f"{bad}: data: missing required key" in result.err


def test_malformed_yaml_is_one_line(tmp_path, cli):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    result = cli("validate", bad)
    assert result.code == 2
    assert "invalid YAML" in result.err and str(bad) in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_missing_spec_file(cli, tmp_path):
    result = cli("validate", tmp_path / "nope.yaml")
    assert result.code == 2 and "file not found" in result.err


def test_missing_data_file_and_model(tmp_path, cli):
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nmodel: {path: ./no/such/model}\ndata: {train: no-such.jsonl}\n")
    result = cli("validate", job)
    assert result.code == 2
    assert "data.train: file not found: no-such.jsonl" in result.err
    assert "model.path: not found: ./no/such/model" in result.err


def test_overrides_are_parsed_as_yaml_and_validated(make_job, cli):
    job = make_job()
    spec = load_spec(job, ["training.lr=3e-4", "method.lora.target_modules=[q_proj, v_proj]", "eval.every=5"])
    assert spec.training.lr == 3e-4
    assert spec.method.lora.target_modules == ["q_proj", "v_proj"]
    assert spec.eval.every == 5
    result = cli("validate", job, "training.lr=zero", "training.nope=1")
    assert result.code == 2
    assert "training.lr: Input should be a valid number" in result.err
    assert "training.nope: unknown key" in result.err


def test_override_needs_key_and_value():
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        apply_overrides({}, ["training.lr"])


def test_cross_field_rules(make_job):
    with pytest.raises(SpecError, match="unfreeze schedules apply to full and freeze"):
        load_spec(make_job(), ["method.unfreeze={every: 2}"])
    with pytest.raises(SpecError, match=r"needs data\.format: classification"):
        load_spec(make_job(), ["model.task=classification"])
    with pytest.raises(SpecError, match=r"gradient_checkpointing_every needs training\.gradient_checkpointing: true"):
        load_spec(make_job(), ["training.gradient_checkpointing_every=2"])
    with pytest.raises(SpecError, match=r"data\.packing applies to model\.task causal_lm only"):
        load_spec(make_job(), ["model.task=classification", "data.format=classification", "data.packing=true"])


def test_every_field_is_documented():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            annotation = field.annotation
            nested = [a for a in getattr(annotation, "__args__", ()) or (annotation,) if isinstance(a, type) and hasattr(a, "model_fields")]
            if not nested:
                assert field.description, f"{prefix}{name} has no description"
            for sub in nested:
                walk(sub, f"{prefix}{name}.")

    walk(JobSpec)


# Parameter counts published for these architectures (LLaMA paper / Llama 2 model cards).
PUBLISHED_PARAMS = {"llama-7b": 6_738_415_616, "llama-65b": 65_285_660_672}


@pytest.mark.parametrize("job", ["llama-7b-lora-ddp.yaml", "llama-65b-qlora-zero3.yaml"])
def test_big_model_jobs_name_known_shapes(job):
    """The multi-GPU jobs validate, and the model they name has the shape we plan with
    (built on the meta device: real shapes, no memory)."""
    from ftcluster.models.shapes import known_shape, meta_model

    spec = load_spec(REPO / "jobs" / job)
    shape = known_shape(spec.model.path)
    assert shape in PUBLISHED_PARAMS
    model = meta_model(shape)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[shape]
    assert spec.scaling.use_gpu and spec.scaling.num_workers >= 8
    if spec.distributed.backend == "deepspeed":
        assert spec.distributed.zero_stage == 3 and spec.method.name == "qlora"


def test_fields_command_lists_every_key_with_its_meaning(cli):
    result = cli("fields", "method.lora")
    assert result.code == 0
    text = " ".join(result.out.split())
    assert "method.lora.target_modules" in result.out and "q_proj" in text and "all-linear" in text
    assert cli("fields", "nope").code == 2


def test_cross_field_problems_are_all_reported_at_once(make_job):
    """Rules spanning sections come from the registry, and every broken one is its own line."""
    with pytest.raises(SpecError) as caught:
        load_spec(make_job(), ["method.name=prefix", "model.task=classification", "data.packing=true",
                               "distributed.backend=deepspeed", "training.max_failures=1"])
    lines = str(caught.value).splitlines()
    for needle in ("model.task classification needs data.format: classification",
                   "method prefix supports causal_lm only", "data.packing does not work with method prefix",
                   "data.packing applies to model.task causal_lm only", "method prefix is not supported with backend deepspeed",
                   "training.max_failures needs training.checkpoint_every"):
        assert sum(needle in line for line in lines) == 1, (needle, lines)
    assert len(lines) == 6 and all(line.startswith(str(make_job().parent)) or ".yaml" in line for line in lines)


def test_custom_worker_resources_and_preemption_retries_reach_ray_train(make_job, cli):
    """scaling.resources_per_worker pins workers to nodes that advertise them; CPU/GPU belong elsewhere;
    training.max_preemption_failures is Ray Train's own count of preemption restarts."""
    from ftcluster.config.spec import load_spec
    from ftcluster.launch.launcher import failure_config
    from ftcluster.planning.capacity import worker_resources

    job = make_job("pinned", scaling={"resources_per_worker": {"a100_node": 1}},
                   training={"max_preemption_failures": 3})
    spec = load_spec(job)
    assert worker_resources(spec) == {"CPU": 1, "a100_node": 1}
    assert failure_config(spec).max_preemption_failures == 3
    bad = cli("validate", job, "scaling.resources_per_worker={GPU: 2}")
    assert bad.code == 2 and "scaling.resources_per_worker" in bad.err and "gpus_per_worker" in bad.err
    bad = cli("validate", job, "method.grpo.rollout.resources_per_worker={CPU: 1}")  # rollout actors: likewise
    assert bad.code == 2 and "method.grpo.rollout.resources_per_worker" in bad.err and "cpus_per_worker" in bad.err
    assert len(bad.err.strip().splitlines()) == 1
