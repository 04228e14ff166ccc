"""data.preprocess: ray: a Ray Data tokenization writes the very cache entry one process writes (same key,
byte-identical files, same bad-row report), later builds open it, and the launcher builds it before the
workers start. Ray runs on loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import write_jsonl

from ftcluster.data import build_data
from ftcluster.data.prebuild import build_before_workers
from ftcluster.data.ray_tokenize import wanted
from ftcluster.errors import DataError
from ftcluster.models.tiny import byte_tokenizer
from ftcluster.spec import DataSpec, JobSpec

pytestmark = pytest.mark.integration

FILES = ("train.arrow", "val.arrow", "meta.json")


@pytest.fixture(scope="module")
def ray_here():
    import ray

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.shutdown()  # an earlier module's Ray is not this one
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def instruction_shards(folder: Path) -> Path:
    """3,000 rows in 3 jsonl shards, with a broken line, a missing field and an empty reply among them."""
    folder.mkdir(parents=True)
    for shard in range(3):
        rows = [{"instruction": f"question {shard}-{i}: " + "word " * (i % 25), "output": f"answer {i}"}
                for i in range(1000)]
        rows[7 + shard] = {"instruction": "no reply"}
        rows[500] = {"instruction": "empty", "output": ""}
        path = write_jsonl(folder / f"part-{shard}.jsonl", rows)
        if shard == 1:
            lines = path.read_text().splitlines()
            lines[20] = "{not json"
            path.write_text("\n".join(lines) + "\n")
    return folder


def classification_data(folder: Path) -> tuple[Path, Path]:
    """Labels a/b/c in training, a validation file with an unknown label and a bad row."""
    folder.mkdir(parents=True)
    train = write_jsonl(folder / "train.jsonl", [{"text": f"text {i}", "label": "abc"[i % 3]} for i in range(300)])
    val = [{"text": f"held {i}", "label": "abc"[i % 3]} for i in range(30)]
    val[4] = {"text": "odd", "label": "z"}
    val[9] = {"label": "a"}
    return train, write_jsonl(folder / "val.jsonl", val)


def build_both(spec: DataSpec, tokenizer, root: Path):
    """The entry built by one process and by Ray Data, each in its own cache folder."""
    process = build_data(spec.model_copy(update={"preprocess": "process", "cache_dir": str(root / "process")}),
                         tokenizer)
    ray_built = build_data(spec.model_copy(update={"preprocess": "ray", "cache_dir": str(root / "ray")}), tokenizer)
    return process, ray_built


def assert_same_entry(process, ray_built) -> None:
    assert process.cache.name == ray_built.cache.name  # the same key
    assert not process.from_cache and not ray_built.from_cache
    for name in FILES:
        assert (process.cache / name).read_bytes() == (ray_built.cache / name).read_bytes(), name
    assert ray_built.report.lines() == process.report.lines()


def test_ray_data_writes_the_entry_one_process_writes(ray_here, tokenizer, tmp_path):
    spec = DataSpec(train=str(instruction_shards(tmp_path / "rows")), val_fraction=0.05, max_length=128)
    process, ray_built = build_both(spec, tokenizer, tmp_path)
    assert_same_entry(process, ray_built)
    report = ray_built.report
    assert report.bad_count == 7 and 0 < report.dropped_no_target < report.truncated  # 3 missing, 3 empty, 1 not JSON
    assert report.bad_rows[3][0].endswith("rows/part-1.jsonl:21") and "invalid JSON" in report.bad_rows[3][1]
    assert len(ray_built.train) + len(ray_built.val) == 3000 - 7 - report.dropped_no_target
    # A later build (any data.preprocess) opens the Ray-built entry.
    again = build_data(spec.model_copy(update={"cache_dir": str(tmp_path / "ray")}), tokenizer)
    assert again.from_cache and again.cache == ray_built.cache


@pytest.mark.parametrize("settings", [{"packing": True}, {"format": "classification", "balance_classes": True}])
def test_the_same_with_packing_labels_and_a_validation_file(ray_here, tokenizer, tmp_path, settings):
    if settings.get("format") == "classification":
        train, val = classification_data(tmp_path / "rows")
        spec = DataSpec(train=str(train), validation=str(val), columns={"label": "label"}, **settings)
    else:
        spec = DataSpec(train=str(instruction_shards(tmp_path / "rows")), max_length=128, **settings)
    process, ray_built = build_both(spec, tokenizer, tmp_path)
    assert_same_entry(process, ray_built)
    if settings.get("format"):
        assert [where for where, _ in ray_built.report.bad_rows] == ["validation example 4",
                                                                   f"{tmp_path}/rows/val.jsonl:10"]


def test_a_bad_row_under_fail_is_the_same_one_line_error(ray_here, tokenizer, tmp_path):
    train, val = classification_data(tmp_path / "rows")
    spec = DataSpec(train=str(train), validation=str(val), columns={"label": "label"}, format="classification",
                    on_bad_row="fail", preprocess="ray")
    with pytest.raises(DataError, match=r"^bad row validation example 4: unknown label 'z'"):
        build_data(spec, tokenizer)


def test_the_launcher_builds_before_the_workers_and_names_the_folder(ray_here, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "launcher-cache"))
    rows = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"q {i}", "output": f"a {i}"} for i in range(200)])
    spec = JobSpec.model_validate({"name": "t", "model": {"path": str(tiny_model)},
                                   "data": {"train": str(rows), "preprocess": "ray"}})
    said: list[str] = []
    workers = build_before_workers(spec, say=said.append)
    assert "tokenized with Ray Data" in said[0]
    assert workers.data.cache_dir == str(tmp_path / "launcher-cache" / "data" / "tokenized")
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "a-worker's-own-cache"))  # a worker's default differs
    from ftcluster.models.load import load_tokenizer, resolve_model

    assert build_data(workers.data, load_tokenizer(resolve_model(str(tiny_model)))).from_cache
    # auto on small data: left to the workers, as before
    small = spec.model_copy(update={"data": spec.data.model_copy(update={"preprocess": "auto"})})
    assert build_before_workers(small, say=said.append) is small and len(said) == 1
    assert not wanted("auto", 1000) and wanted("auto", 10**9) and wanted("ray", 0)


def test_meta_records_no_preprocess_setting(ray_here, tokenizer, tmp_path):
    """data.preprocess and data.cache_dir choose who builds and where, not what: they are not in the key."""
    rows = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"q {i}", "output": f"a {i}"} for i in range(50)])
    first = build_data(DataSpec(train=str(rows), preprocess="ray", cache_dir=str(tmp_path / "c")), tokenizer)
    assert build_data(DataSpec(train=str(rows), preprocess="process", cache_dir=str(tmp_path / "c")),
                      tokenizer).from_cache
    assert json.loads((first.cache / "meta.json").read_text())["examples"] == 50
