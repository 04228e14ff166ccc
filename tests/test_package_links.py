"""`submit` uploads a data folder's files, never what a link inside it points to outside it."""

from __future__ import annotations

import json

import pytest

from ftcluster.core.errors import FtError


def folder_job(make_job, tmp_path, link_target):
    shards = tmp_path / "shards"
    shards.mkdir()
    row = {"instruction": "1+1", "output": "2"}
    (shards / "part-0.jsonl").write_text(json.dumps(row) + "\n")
    (shards / "part-1.jsonl").symlink_to(link_target)
    return make_job("linked", data={"train": str(shards), "validation": None})


def test_a_link_leaving_the_data_folder_is_never_uploaded(make_job, tmp_path):
    from ftcluster.cluster.package import build_package
    from ftcluster.config.spec import load_spec

    secret = tmp_path / "home" / "aws_keys"
    secret.parent.mkdir()
    secret.write_text('{"instruction": "aws_secret_access_key", "output": "AKIA..."}\n')
    spec = load_spec(folder_job(make_job, tmp_path, secret))
    with pytest.raises(FtError, match=r"data\.train: .*part-1\.jsonl is a link to .*aws_keys, outside"):
        build_package(spec, tmp_path / "package", None, max_upload_mb=10)
    assert not any("AKIA" in p.read_text() for p in (tmp_path / "package").rglob("*") if p.is_file())


def test_a_link_within_the_data_folder_is_uploaded(make_job, tmp_path):
    from ftcluster.cluster.package import build_package
    from ftcluster.config.spec import load_spec

    spec = load_spec(folder_job(make_job, tmp_path, "part-0.jsonl"))  # a relative link to its sibling
    package = build_package(spec, tmp_path / "package", None, max_upload_mb=10)
    assert sorted(p.name for p in (package.folder / "data").rglob("*.jsonl")) == ["part-0.jsonl", "part-1.jsonl"]
