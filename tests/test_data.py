"""Data: readers, bad rows with line numbers, response-only loss masks, packing, balancing."""

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ftcluster.config.spec import DataSpec
from ftcluster.core.errors import DataError
from ftcluster.data import build_data
from ftcluster.data.batches import StepOrder, collate, model_inputs
from ftcluster.data.dataset import pack
from ftcluster.data.readers import read_rows
from ftcluster.models.tiny import byte_tokenizer

ROWS = [{"text": "good movie", "label": "pos"}, {"text": "awful", "label": "neg"}]


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_readers_agree_across_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    with (tmp_path / "a.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["text", "label"])
        writer.writeheader()
        writer.writerows(ROWS)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    for suffix in ("jsonl", "json", "csv", "parquet"):
        assert [r.values for r in read_rows(tmp_path / f"a.{suffix}")] == ROWS, suffix
    assert read_rows(tmp_path / "a.csv")[0].where.endswith("a.csv:2")  # line 1 is the header


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "bad.json").write_text("[{]")
    with pytest.raises(DataError, match=r"bad.json: line 1: invalid JSON"):
        read_rows(tmp_path / "bad.json")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported data file type"):
        read_rows(tmp_path / "x.txt")


def bad_rows_file(tmp_path):
    lines = [
        json.dumps({"instruction": "say hi", "output": "hi"}),
        json.dumps({"instruction": "say hi"}),  # line 2: missing output
        "{not json",  # line 3
        json.dumps({"instruction": 5, "output": "x"}),  # line 4: wrong type
        json.dumps({"instruction": "  ", "output": "x"}),  # line 5: empty
        json.dumps({"instruction": "say yo", "output": "yo"}),
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_counted_with_line_numbers(tmp_path, tokenizer):
    path = bad_rows_file(tmp_path)
    bundle = build_data(DataSpec(train=str(path), val_fraction=0), tokenizer)
    assert len(bundle.train) == 2
    where = {w.rsplit(":", 1)[1]: reason for w, reason in bundle.report.bad_rows}
    assert where == {
        "2": "missing field 'output'",
        "3": where["3"],
        "4": "field 'instruction' must be text, got int",
        "5": "field 'instruction' is empty",
    }
    assert where["3"].startswith("invalid JSON")
    assert "6 rows read, 4 bad" in bundle.report.lines()[0]


def test_on_bad_row_fail_names_the_row(tmp_path, tokenizer):
    path = bad_rows_file(tmp_path)
    with pytest.raises(DataError, match=r"rows.jsonl:2: missing field 'output'"):
        build_data(DataSpec(train=str(path), val_fraction=0, on_bad_row="fail"), tokenizer)


def test_only_response_tokens_are_trained(tokenizer):
    rows = [{"instruction": "add 2 and 3", "output": "5"}]
    bundle = build_data(DataSpec(train="-", val_fraction=0), tokenizer, train_records=rows)
    item = bundle.train[0]
    trained = tokenizer.decode([t for t, keep in zip(item.input_ids, item.trained) if keep])
    assert trained == "5<|im_end|>\n"
    full = tokenizer.decode(item.input_ids)
    assert full.startswith("<|im_start|>user\nadd 2 and 3<|im_end|>\n<|im_start|>assistant\n")
    everything = build_data(DataSpec(train="-", val_fraction=0, train_on_prompt=True), tokenizer, train_records=rows)
    assert all(everything.train[0].trained)


def test_chat_trains_every_assistant_turn(tokenizer):
    messages = [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "again"}, {"role": "assistant", "content": "A2"},
    ]
    bundle = build_data(DataSpec(train="-", format="chat", val_fraction=0), tokenizer, train_records=[{"messages": messages}])
    item = bundle.train[0]
    trained = tokenizer.decode([t for t, keep in zip(item.input_ids, item.trained) if keep])
    assert trained == "A1<|im_end|>\nA2<|im_end|>\n"


def test_truncation_is_counted(tokenizer):
    rows = [{"text": "x" * 100}, {"text": "short"}]
    bundle = build_data(DataSpec(train="-", format="text", max_length=16, val_fraction=0), tokenizer, train_records=rows)
    assert bundle.report.truncated == 1
    assert max(len(e.input_ids) for e in bundle.train) == 16


def test_unknown_validation_label_is_a_bad_row(tokenizer):
    train = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    val = [{"text": "c", "label": "z"}, {"text": "d", "label": "x"}]
    spec = DataSpec(train="-", format="classification")
    bundle = build_data(spec, tokenizer, train_records=train, val_records=val)
    assert bundle.label_names == ["x", "y"]
    assert len(bundle.val) == 1
    assert "unknown label 'z'" in bundle.report.bad_rows[0][1]


def test_class_balancing_oversamples_minorities(tokenizer):
    train = [{"text": f"a{i}", "label": "big"} for i in range(9)] + [{"text": "b", "label": "small"}]
    bundle = build_data(DataSpec(train="-", format="classification", balance_classes=True, val_fraction=0), tokenizer, train_records=train)
    labels = [e.label for e in bundle.train]
    assert labels.count(0) == labels.count(1) == 9


def test_split_is_seeded(tokenizer):
    rows = [{"text": f"row {i}"} for i in range(50)]
    one = build_data(DataSpec(train="-", format="text", val_fraction=0.2, seed=3), tokenizer, train_records=rows)
    two = build_data(DataSpec(train="-", format="text", val_fraction=0.2, seed=3), tokenizer, train_records=rows)
    other = build_data(DataSpec(train="-", format="text", val_fraction=0.2, seed=4), tokenizer, train_records=rows)
    assert len(one.val) == 10
    assert [e.input_ids for e in one.val] == [e.input_ids for e in two.val]
    assert [e.input_ids for e in one.val] != [e.input_ids for e in other.val]


@pytest.mark.parametrize("attention", ["sdpa", "eager", pytest.param("flex_attention", marks=[pytest.mark.integration, pytest.mark.slow])])
def test_packing_has_no_cross_example_attention(tiny_model, tokenizer, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attention).eval()
    rows = [{"text": "first example"}, {"text": "the second, longer example"}, {"text": "third"}]
    bundle = build_data(DataSpec(train="-", format="text", val_fraction=0), tokenizer, train_records=rows)
    packed = pack(bundle.train, max_length=128)
    assert len(packed) == 1
    short = pack(bundle.train[2:], max_length=128)  # a shorter row in the same batch: a padding tail
    batch = collate(packed + short, tokenizer.pad_token_id)
    assert "attention_mask" not in batch  # transformers derives the mask from the position ids, on the device
    with torch.no_grad():
        packed_logits = model(**model_inputs(batch)).logits
        offset = 0
        for item in bundle.train:
            alone = model(input_ids=torch.tensor([item.input_ids])).logits[0]
            n = len(item.input_ids)
            torch.testing.assert_close(packed_logits[0, offset : offset + n], alone, atol=1e-5, rtol=1e-5)
            offset += n
        n = len(bundle.train[2].input_ids)
        torch.testing.assert_close(packed_logits[1, :n], alone, atol=1e-5, rtol=1e-5)


def test_step_order_is_the_same_for_accumulation_and_resume():
    big = StepOrder(64, micro_batch=8, grad_accum=1, world_size=1, seed=0)
    small = StepOrder(64, micro_batch=4, grad_accum=2, world_size=1, seed=0)
    for step in range(10):  # crosses an epoch boundary (8 steps per epoch)
        assert [i for batch in small.micro_batches(step, 0) for i in batch] == big.micro_batches(step, 0)[0]
    two_workers = StepOrder(64, micro_batch=4, grad_accum=1, world_size=2, seed=0)
    merged = sorted(two_workers.micro_batches(3, 0)[0] + two_workers.micro_batches(3, 1)[0])
    assert merged == sorted(big.micro_batches(3, 0)[0])
    assert big.micro_batches(8, 0) != big.micro_batches(0, 0)  # a new epoch reshuffles
