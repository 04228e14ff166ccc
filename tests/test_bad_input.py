"""Bad input through the real CLI: one line per problem, exit code 2, no traceback, nothing damaged."""

import hashlib

import pytest
from conftest import write_jsonl


def snapshot(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def finished_run(make_job, cli, tmp_path):
    job = make_job("done")
    assert cli("train", job, "--no-ray").code == 0
    out = tmp_path / "runs" / "done"
    return out, snapshot(out)


def expect_one_line_error(result, *needles):
    assert result.code == 2, result
    assert "Traceback" not in result.err + result.out
    for needle in needles:
        assert needle in result.err, (needle, result.err)


def test_bad_inputs_leave_earlier_outputs_untouched(finished_run, make_job, cli, tmp_path):
    out, before = finished_run
    same_dir = {"output": {"dir": str(out), "overwrite": True}}
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("name: [\n")
    expect_one_line_error(cli("train", bad_yaml, "--no-ray"), "invalid YAML")
    expect_one_line_error(cli("train", make_job("a", **same_dir), "--no-ray", "training.bogus=1"), "training.bogus: unknown key")
    expect_one_line_error(cli("train", make_job("b", **same_dir), "--no-ray", "training.batch_size=big"), "training.batch_size")
    expect_one_line_error(cli("train", make_job("c", **same_dir), "--no-ray", "data.train=/no/such.jsonl"), "data.train: file not found")
    expect_one_line_error(cli("train", make_job("d", **same_dir), "--no-ray", "model.path=/no/such/model"), "model.path: not found")
    assert snapshot(out) == before


def test_bad_rows_fail_with_their_line(make_job, cli, tmp_path):
    rows = [{"instruction": "a", "output": "b"}] * 20 + [{"instruction": "missing output"}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    job = make_job("rows", data={"train": str(data), "validation": None, "on_bad_row": "fail"})
    expect_one_line_error(cli("train", job, "--no-ray"), f"bad row {data}:21: missing field 'output'")


def test_bad_rows_are_skipped_and_reported(make_job, cli, tmp_path):
    rows = [{"instruction": "a", "output": "b"}] * 20 + [{"instruction": 3, "output": "x"}]
    data = write_jsonl(tmp_path / "some-bad.jsonl", rows)
    result = cli("train", make_job("skip", data={"train": str(data), "validation": None}), "--no-ray")
    assert result.code == 0, result
    assert "21 rows read, 1 bad" in result.out
    assert f"bad row {data}:21: field 'instruction' must be text, got int" in result.out


def test_too_little_data_for_one_step(make_job, cli, tmp_path):
    data = write_jsonl(tmp_path / "two.jsonl", [{"instruction": "a", "output": "b"}] * 2)
    job = make_job("small", data={"train": str(data), "validation": None, "val_fraction": 0})
    expect_one_line_error(cli("train", job, "--no-ray"), "cannot fill one step of 4")


def test_unknown_eval_metric(make_job, cli):
    job = make_job("metric", eval={"every": 2, "metric": "bleu"})
    expect_one_line_error(cli("train", job, "--no-ray"), "eval.metric: 'bleu' is not computed")


def test_resume_without_checkpoint(make_job, cli):
    expect_one_line_error(cli("train", make_job("nockpt"), "--no-ray", "--resume"), "no complete checkpoint")
