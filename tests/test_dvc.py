"""DVC runs the stages, caches them, and versions their outputs on an S3-compatible remote."""

from __future__ import annotations

import filecmp
import json

import boto3
import pytest

from conftest import REPO, base_env, run, set_params
from llmops.pipeline.stage import plan

pytestmark = pytest.mark.services


STAGES = [s.dvc_name for s in plan(REPO)]


def _ran(log: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in log]


@pytest.mark.training
def test_repro_runs_every_stage_then_only_what_changed(pipeline, ran_project):
    assert _ran((pipeline.parent / "repro.log").read_text()) == STAGES  # the session's first `dvc repro`
    project = ran_project
    second = run(["dvc", "repro"], project).stdout
    # the inputs stage always runs (it fingerprints the files params name); nothing else changed
    assert _ran(second) == ["inputs"] and all(f"Stage '{s}' didn't change, skipping" in second for s in STAGES[1:])

    # a param only validate_data reads re-runs only validate_data (its verdict, which train reads, is unchanged)
    params = project / "params.yaml"
    params.write_text(params.read_text().replace("max_duplicate_rate: 0.01", "max_duplicate_rate: 0.02"))
    assert _ran(run(["dvc", "repro"], project).stdout) == ["inputs", "validate_data"]
    # an evaluate param re-runs evaluate and what reads its metrics (gate, release), not the audit or quantize beside it
    # (a fine-tuning param re-running fine-tuning and all after it: test_flow.py)
    set_params(project, "evaluate.bootstrap_resamples=500")
    assert _ran(run(["dvc", "repro"], project).stdout) == ["inputs", "evaluate", "gate", "release"]

    # the step log renders as a loss curve; the metrics are read by dvc metrics
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project).stdout)
    curve = plots["data"]["reports/train/pretrain/log.csv"][0]
    assert curve["type"] == "vega" and curve["content"]["encoding"]["x"]["field"] == "step"
    assert curve["content"]["layer"][0]["encoding"]["y"]["field"] == "loss"
    assert [row["step"] for row in curve["content"]["data"]["values"]] == [str(i) for i in range(1, 61)]
    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    evaluated = metrics[""]["data"]["reports/evaluate/metrics.json"]["data"]
    assert {"base", "finetuned", "by_task"} <= set(evaluated)
    assert evaluated["finetuned"]["perplexity"] < evaluated["base"]["perplexity"]


@pytest.mark.training
def test_a_file_params_name_edited_in_place_runs_its_stage_again(ran_project):
    """Your instruction file, or your bias pairs file, edited in place (params unchanged): the stage that reads it
    runs again on the new contents; it once said "didn't change, skipping" and kept the stale outputs."""
    from llmops.evaluation import bias_pairs

    project = ran_project
    pairs = project / "pairs.jsonl"
    generated = bias_pairs.generate(0, 4)
    pairs.write_text("".join(json.dumps(r) + "\n" for r in generated))
    set_params(project, "audit_bias.data=pairs.jsonl")
    assert _ran(run(["dvc", "repro", "audit_bias"], project).stdout) == ["inputs", "audit_bias"]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in generated[: len(generated) // 2]))
    assert _ran(run(["dvc", "repro", "audit_bias"], project).stdout) == ["inputs", "audit_bias"]
    audited = json.loads((project / "reports/audit_bias/metrics.json").read_text())
    assert audited["pairs"] + audited["skipped"] == len(generated) // 2

    rows = [{"prompt": f"What is {i} + {i}?", "response": str(2 * i)} for i in range(40)]
    mine = project / "mine.jsonl"
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    set_params(project, "data.instructions=mine.jsonl")
    assert _ran(run(["dvc", "repro", "prepare_data"], project).stdout) == ["inputs", "prepare_data"]
    assert _ran(run(["dvc", "repro", "prepare_data"], project).stdout) == ["inputs"]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    assert _ran(run(["dvc", "repro", "prepare_data"], project).stdout) == ["inputs", "prepare_data"]
    prepared = [(project / f"data/prepared/{split}.jsonl").read_text().splitlines() for split in ("train", "eval")]
    assert sum(map(len, prepared)) == 30


def _use_s3(project, endpoint, bucket, prefix="ds"):
    set_params(project, "storage.remote=s3", f"storage.bucket={bucket}", f"storage.endpoint_url={endpoint}",
               f"storage.prefix={prefix}")


def _keys(endpoint, bucket):
    pages = boto3.client("s3", endpoint_url=endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.mark.training
def test_push_then_fresh_clone_pulls_identical_data(ran_project, tmp_path, s3_endpoint, bucket):
    project = ran_project  # the session's run pipeline: nothing to retrain, everything to push
    _use_s3(project, s3_endpoint, bucket)
    run(["llmops", "run"], project, env=base_env(PREFECT_HOME=str(tmp_path / "ph")))
    keys = _keys(s3_endpoint, bucket)  # DVC's objects, and the audit trail beside them
    assert keys and all(k.startswith(("ds/files/md5/", "ds/audit/")) for k in keys) and "ds/audit/000000000001.json" in keys
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "run"], project)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "data" / "prepared").exists()
    run(["dvc", "pull"], clone)
    for name in ("data/prepared/train.jsonl", "data/prepared/eval.jsonl", "data/prepared/corpus.txt",
                 "data/prepared/manifest.json", "models/pretrain/model.safetensors", "models/pretrain/tokenizer.json",
                 "models/finetune/adapter_model.safetensors", "models/finetune/manifest.json"):
        assert filecmp.cmp(project / name, clone / name, shallow=False), name
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
    assert not (project / ".llmops/prefect").exists()  # and before a Prefect server was started
    assert _keys(s3_endpoint, bucket) == []
