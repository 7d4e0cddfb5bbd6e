"""DVC runs the stages, caches them, and versions their outputs on an S3-compatible remote."""

from __future__ import annotations

import filecmp

import boto3
import pytest

from conftest import base_env, run

pytestmark = pytest.mark.services


def test_repro_runs_both_stages_then_skips_both(project):
    first = run(["dvc", "repro"], project).stdout
    assert "Running stage 'prepare_data'" in first and "Running stage 'validate_data'" in first
    second = run(["dvc", "repro"], project).stdout
    assert "Stage 'prepare_data' didn't change, skipping" in second
    assert "Stage 'validate_data' didn't change, skipping" in second
    # a param only validate_data reads re-runs only validate_data
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("max_duplicate_rate: 0.01", "max_duplicate_rate: 0.02"))
    third = run(["dvc", "repro"], project).stdout
    assert "Stage 'prepare_data' didn't change, skipping" in third and "Running stage 'validate_data'" in third


def _use_s3(project, endpoint, bucket, prefix="ds"):
    params = project / "params.yaml"
    text = params.read_text().replace("remote: local ", "remote: s3    ")
    text = text.replace("bucket: null", f"bucket: {bucket}").replace("endpoint_url: null", f"endpoint_url: {endpoint}")
    params.write_text(text.replace("prefix: llmops", f"prefix: {prefix}"))


def _keys(endpoint, bucket):
    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


def test_push_then_fresh_clone_pulls_identical_data(project, tmp_path, s3_endpoint, bucket):
    _use_s3(project, s3_endpoint, bucket)
    run(["llmops", "run"], project, env=base_env(PREFECT_HOME=str(tmp_path / "ph")))
    assert _keys(s3_endpoint, bucket) and all(k.startswith("ds/files/md5/") for k in _keys(s3_endpoint, bucket))
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "run"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "data" / "prepared").exists()
    run(["dvc", "pull"], clone)
    for name in ("train.jsonl", "eval.jsonl", "corpus.txt", "manifest.json"):
        assert filecmp.cmp(project / "data/prepared" / name, clone / "data/prepared" / name, shallow=False)
    status = run(["dvc", "status", "-c"], clone).stdout
    assert "Cache and remote 'storage' are in sync" in status


@pytest.mark.parametrize("problem", ["unreachable", "missing_bucket"])
def test_bad_remote_is_a_clear_error_and_nothing_is_done(project, tmp_path, s3_endpoint, bucket, problem):
    endpoint = "http://127.0.0.1:9" if problem == "unreachable" else s3_endpoint
    _use_s3(project, endpoint, bucket if problem == "unreachable" else "no-such-bucket")
    proc = run(["llmops", "run"], project, env=base_env(PREFECT_HOME=str(tmp_path / "ph")), check=False)
    assert proc.returncode == 1
    expected = "cannot reach the S3 endpoint http://127.0.0.1:9" if problem == "unreachable" else "s3://no-such-bucket: bucket does not exist"
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr.split("error: pipeline")[-1]
    assert not (project / "data" / "prepared").exists()  # failed before any work
    assert _keys(s3_endpoint, bucket) == []
