"""Data at scale: shards, globs, an S3 store on loopback, `save_to_disk` folders, and the
tokenized-data cache (hit, invalidation, equality with encoding in memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from ftcluster.config.spec import ColumnSpec, DataSpec
from ftcluster.core.errors import DataError
from ftcluster.data import build_data
from ftcluster.data.formats import parse_row
from ftcluster.data.render import Renderer
from ftcluster.models.tiny import byte_tokenizer


def qa_rows(start: int, count: int) -> list[dict]:
    return [{"instruction": f"question {i}?", "output": f"answer {i}"} for i in range(start, start + count)]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTCLUSTER_CACHE", str(tmp_path / "cache"))


def write_shards(folder: Path, rows: list[dict], per_shard: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(0, len(rows), per_shard):
        path = folder / f"part-{index // per_shard:03d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[index:index + per_shard]), path)
        paths.append(path)
    return paths


def ids(sequences) -> list[list[int]]:
    return [item.input_ids for item in sequences]


def test_parquet_shards_a_glob_and_a_folder_read_the_same_rows_in_order(tmp_path, tokenizer):
    rows = qa_rows(0, 50)
    write_shards(tmp_path / "shards", rows, per_shard=12)
    (tmp_path / "shards" / "notes.txt").write_text("not data")  # a folder's other files are ignored
    whole = write_jsonl(tmp_path / "whole.jsonl", rows)
    one = build_data(DataSpec(train=str(whole), val_fraction=0.2), tokenizer)
    by_glob = build_data(DataSpec(train=str(tmp_path / "shards" / "part-*.parquet"), val_fraction=0.2), tokenizer)
    by_folder = build_data(DataSpec(train=str(tmp_path / "shards"), val_fraction=0.2), tokenizer)
    assert len(one.train) == 40 and len(one.val) == 10
    for other in (by_glob, by_folder):
        assert ids(other.train) == ids(one.train) and ids(other.val) == ids(one.val)
        assert [e.messages for e in other.val_examples] == [e.messages for e in one.val_examples]
    with pytest.raises(DataError, match="no data files"):
        build_data(DataSpec(train=str(tmp_path / "shards" / "none-*.parquet")), tokenizer)


def test_cached_sequences_equal_encoding_in_memory(tmp_path, tokenizer):
    rows = qa_rows(0, 30)
    spec = DataSpec(train=str(write_jsonl(tmp_path / "d.jsonl", rows)), val_fraction=0, max_length=40)
    bundle = build_data(spec, tokenizer)
    renderer = Renderer(tokenizer, 40)  # (the replies are cut short: 41-42 tokens each)
    expected = [renderer.encode(parse_row(r, "instruction", ColumnSpec(), None)) for r in rows]
    assert len(bundle.train) == 30
    for got, want in zip(bundle.train, expected, strict=True):
        assert got.input_ids == want.input_ids and got.trained == want.trained and got.label is None
    assert bundle.train[-1].input_ids == expected[-1].input_ids and bundle.train[3:5][1].input_ids == expected[4].input_ids
    assert bundle.report.truncated == sum(e.truncated for e in expected) > 0
    packed = build_data(spec.model_copy(update={"packing": True, "max_length": 96}), tokenizer)
    assert len(packed.train) < 30 and all(item.positions is not None for item in packed.train)


def test_the_cache_is_hit_on_a_second_build_and_missed_when_data_tokenizer_or_settings_change(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "d.jsonl", qa_rows(0, 20))
    spec = DataSpec(train=str(data))
    first = build_data(spec, tokenizer)
    second = build_data(spec, tokenizer)
    assert not first.from_cache and second.from_cache and second.cache == first.cache
    assert ids(second.train) == ids(first.train)

    write_jsonl(data, [*qa_rows(0, 19), {"instruction": "changed?", "output": "yes"}])  # same name, new content
    changed = build_data(spec, tokenizer)
    assert not changed.from_cache and changed.cache != first.cache
    setting = build_data(spec.model_copy(update={"system_prompt": "Be brief."}), tokenizer)
    assert not setting.from_cache and setting.cache not in (first.cache, changed.cache)

    other = tmp_path / "other-tokenizer"
    tokenizer.save_pretrained(other)
    reloaded = AutoTokenizer.from_pretrained(other)
    assert build_data(spec, reloaded).from_cache  # the same tokenizer, loaded again: a hit
    reloaded.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    templated = build_data(spec, reloaded)
    assert not templated.from_cache and ids(templated.train) != ids(changed.train)


def test_bad_rows_keep_their_shard_and_row(tmp_path, tokenizer):
    rows = qa_rows(0, 10)
    rows[7] = {"instruction": "no answer"}
    write_shards(tmp_path / "shards", rows, per_shard=5)
    bundle = build_data(DataSpec(train=str(tmp_path / "shards")), tokenizer)
    assert bundle.report.bad_rows == [(f"{tmp_path / 'shards' / 'part-001.parquet'}:row 2", "missing field 'output'")]
    assert bundle.report.rows_read == 10
    with pytest.raises(DataError, match=r"bad row .+part-001.parquet:row 2: missing field 'output'"):
        build_data(DataSpec(train=str(tmp_path / "shards"), on_bad_row="fail"), tokenizer)
    cached = build_data(DataSpec(train=str(tmp_path / "shards")), tokenizer)
    assert cached.from_cache and cached.report.bad_rows == bundle.report.bad_rows  # the report is cached too


def test_a_save_to_disk_folder_with_its_split_and_column_mapping(tmp_path, tokenizer):
    import datasets

    records = [{"question": f"q{i}", "reply": f"r{i}"} for i in range(12)]
    folder = tmp_path / "hf-data"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records),
                          "test": datasets.Dataset.from_list(records[:3])}).save_to_disk(str(folder))
    columns = {"instruction": "question", "output": "reply"}
    spec = DataSpec(train=str(folder), validation=str(folder), validation_split="test", columns=columns)
    bundle = build_data(spec, tokenizer)
    assert len(bundle.train) == 12 and len(bundle.val) == 3
    assert bundle.val_examples[0].messages[-1]["content"] == "r0"
    with pytest.raises(DataError, match=r"no split 'dev' \(it has train, test\); set data.split"):
        build_data(spec.model_copy(update={"split": "dev"}), tokenizer)


def test_an_s3_source_with_a_glob_on_a_loopback_store(tmp_path, tokenizer):
    import boto3
    from storage_server import loopback_store

    with loopback_store("data") as store:
        client = boto3.client("s3", endpoint_url=store.endpoint)
        rows = qa_rows(0, 16)
        rows[9] = {"instruction": 5, "output": "x"}
        for part in range(2):
            body = "".join(json.dumps(r) + "\n" for r in rows[part * 8:(part + 1) * 8])
            client.put_object(Bucket="data", Key=f"sets/qa/part-{part}.jsonl", Body=body.encode())
        client.put_object(Bucket="data", Key="sets/qa/readme.md", Body=b"not data")
        uri = store.uri("sets", "qa", "part-*.jsonl")
        bundle = build_data(DataSpec(train=uri, val_fraction=0), tokenizer)
        assert len(bundle.train) == 15
        assert bundle.report.bad_rows == [(store.uri("sets", "qa", "part-1.jsonl") + ":2",
                                           "field 'instruction' must be text, got int")]
        folder = build_data(DataSpec(train=store.uri("sets", "qa"), val_fraction=0), tokenizer)  # the whole folder
        assert ids(folder.train) == ids(bundle.train)
        with pytest.raises(DataError, match="no such object or folder"):
            build_data(DataSpec(train=store.uri("sets", "missing.jsonl")), tokenizer)


def test_a_second_launch_reads_the_tokenized_data_from_the_cache(make_job, cli, tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, qa_rows(0, 40), per_shard=16)
    job = make_job("cached", data={"train": str(shards / "part-*.parquet"), "validation": None},
                   training={"max_steps": 2}, output={"overwrite": True})
    first = cli("train", job, "--no-ray")
    assert first.code == 0, first
    assert "(tokenized now)" in first.out
    second = cli("train", job, "--no-ray")
    assert second.code == 0, second
    assert "(from the cache)" in second.out
    assert cli("validate", job).code == 0
    missing = cli("validate", make_job("gone", data={"train": str(tmp_path / "none-*.parquet")}))
    assert missing.code == 2 and "data.train: file not found" in missing.err
