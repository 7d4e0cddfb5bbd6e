"""The monitor: the request log's day partitions, feedback, the Evidently report, alerts at a real webhook, and the
loop from corrections to a new dataset version and a pipeline run on a real Prefect server."""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from conftest import base_env, free_port, postgres, prefect_server, run, set_params, stop_servers
from llmops.serving.feedback import FeedbackError, Store, UnknownRequest
from llmops.serving.requestlog import Writer, read_window

@pytest.fixture(scope="module")
def monitor_api(tmp_path_factory):
    """A Prefect server of this module's own: its `llmops setup` and the runs it starts must not meet test_worker's
    worker and deployments on the session's server; yields (API URL, PREFECT_HOME)."""
    home = tmp_path_factory.mktemp("monitor_prefect_home")
    with prefect_server(home) as url:
        yield url, home


DRIFTED = ["Write a long poem about the autumn sea and its grey waves", "Tell me a story about dragons in a castle",
           "Summarise the history of the roman empire in three sentences", "Explain quantum entanglement simply",
           "Plan a trip through the mountains of northern Italy"]


def test_the_request_log_is_read_by_day_partition_and_survives_corrupt_lines(tmp_path):
    writer = Writer(tmp_path / "log")
    writer.write({"request_id": "a", "status": 200, "prompt": "p", "answer": "x"})
    day = next((tmp_path / "log").glob("date=*"))
    (day / "other-host-1.jsonl").write_text('{"time": "2001-01-01T00:00:00.000Z", "status": 200}\nnot json\n'
                                            '{"no_time": 1}\n')
    (tmp_path / "log" / "date=1999-01-01").mkdir()  # outside the window: never opened
    (tmp_path / "log" / "date=1999-01-01" / "x.jsonl").write_text("{broken")
    now = datetime.now(timezone.utc)
    window = read_window(tmp_path / "log", now - timedelta(hours=1), now + timedelta(seconds=1))
    assert [r["request_id"] for r in window.records] == ["a"] and window.files == 2
    assert len(window.skipped) == 2 and "other-host-1.jsonl:2: JSONDecodeError" in window.skipped[0]
    empty = read_window(tmp_path / "log", now - timedelta(days=3), now - timedelta(days=2))
    assert empty.records == [] and empty.files == 0


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def feedback_db(request, tmp_path):
    """The feedback database's URL: the default SQLite file, or a real PostgreSQL server."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fb.db'}"
    else:
        with postgres() as url:
            yield url


def test_feedback_needs_a_known_request_and_a_review_needs_a_correction(feedback_db):
    store = Store(feedback_db)
    with pytest.raises(UnknownRequest):
        store.add_feedback("nope", 3)
    store.record_request("r1", datetime.now(timezone.utc), "v1.0.0", "What number comes after 4?", "7")
    store.add_feedback("r1", 1)
    with pytest.raises(FeedbackError, match="nothing to accept"):
        store.review("r1", True, "ana", "wrong", None)
    store.review("r1", True, "ana", "wrong", "5")
    with pytest.raises(FeedbackError, match="already reviewed"):
        store.review("r1", False, "bo", "changed my mind", None)
    assert [r["correction"] for r in store.accepted(unused_only=True)] == ["5"]
    store.mark_used(["r1"], "data/corrections/accepted-000001.jsonl")
    assert store.accepted(unused_only=True) == [] and len(store.accepted()) == 1


@pytest.mark.services
def test_a_server_configured_with_postgresql_keeps_its_feedback_there(tmp_path):
    """LLMOPS_FEEDBACK_DB: answered requests and the feedback on them go to the PostgreSQL server it names."""
    import subprocess

    from openai import OpenAI

    from conftest import BIN, _wait_http, toy_model
    from llmops.governance.apikeys import hash_key

    model, port, key = toy_model(tmp_path / "toy"), free_port(), "sk-llmops-feedback-test"
    with postgres() as url:
        env = base_env(LLMOPS_FEEDBACK_DB=url, LLMOPS_API_KEY_HASHES=hash_key(key))
        proc = subprocess.Popen([str(BIN / "llmops"), "serve", "start", "--model", str(model), "--port", str(port)],
                                cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err", "w"))
        try:
            _wait_http(f"http://127.0.0.1:{port}/health", proc, 120)
            answer = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0).completions.create(
                model="toy", prompt="w1 w2", max_tokens=2, temperature=0)
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/feedback", headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"}, data=json.dumps(
                {"request_id": answer.id, "rating": 2, "correction": "w3"}).encode())
            assert json.load(urllib.request.urlopen(req, timeout=30))["rating"] == 2
        finally:
            proc.terminate()
            proc.wait(60)
        stored = Store(url).feedback_for([answer.id])[answer.id]
        assert stored["rating"] == 2 and stored["correction"] == "w3"
        assert not (tmp_path / ".llmops/serve/feedback.db").exists()  # nothing went to the default SQLite file


def test_a_user_registers_a_checker_for_their_own_tasks(tmp_path, monkeypatch):
    from llmops.monitoring.checks import checker
    from llmops.core.config import ConfigError
    from llmops.monitoring.report import rows

    (tmp_path / "my_checks.py").write_text(
        "import re\n"
        "def sums(prompt):\n"
        "    m = re.fullmatch(r'What is (\\d+) \\+ (\\d+)\\?', prompt)\n"
        "    return ('sums', str(int(m[1]) + int(m[2]))) if m else None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = checker(["sample_tasks", "my_checks:sums"])
    assert check("What is 2 + 3?") == ("sums", "5") and check("What number comes after 9?") == ("next_number", "10")
    table = rows([{"prompt": "What is 2 + 3?", "answer": "6"}, {"prompt": "What is 2 + 3?", "answer": " 5"},
                  {"prompt": "Hello?", "answer": ""}], check, ["sorry"])
    assert [r["wrong"] for r in table[:2]] == [1.0, 0.0] and table[2]["task"] == "other" and table[2]["empty"] == 1.0
    for bad in ("my_checks:nothing", "no_such_module:f", "unknown"):
        with pytest.raises(ConfigError, match="monitor.checkers"):
            checker([bad])


def test_each_dataset_version_is_one_commit_and_a_failed_one_leaves_the_checkout_as_it_was(project):
    from llmops.pipeline import corrections
    from llmops.monitoring.checks import checker
    from llmops.core.config import load_params

    store = Store(f"sqlite:///{project / '.llmops/serve/feedback.db'}")
    for i, (prompt, right) in enumerate([("What number comes after 4?", "5"), ("Tell me a joke", "No.")]):
        store.record_request(f"r{i}", datetime.now(timezone.utc), "v1.0.0", prompt, "wrong")
        store.review(f"r{i}", True, "ana", "right", right)
    before = (project / "params.yaml").read_bytes()
    hook = project / ".git/hooks/pre-commit"
    hook.write_text("#!/bin/sh\necho refused by a hook >&2\nexit 1\n")
    hook.chmod(0o755)
    with pytest.raises(corrections.LoopError, match="refused by a hook"):
        corrections.new_version(project, store, checker(["sample_tasks"]))
    assert (project / "params.yaml").read_bytes() == before and not (project / "data/corrections").exists()
    assert len(store.accepted(unused_only=True)) == 2 and not run(["git", "status", "--porcelain"], project).stdout

    hook.unlink()
    first = corrections.new_version(project, store, checker(["sample_tasks"]))
    assert first.path == "data/corrections/accepted-000002.jsonl" and (first.rows, first.new) == (2, 2)
    assert load_params(project / "params.yaml").data.corrections == first.path
    rows = [json.loads(line) for line in (project / first.path).read_text().splitlines()]
    assert rows == [{"prompt": "What number comes after 4?", "response": "5", "task": "next_number"},
                    {"prompt": "Tell me a joke", "response": "No.", "task": "correction"}]
    store.record_request("r2", datetime.now(timezone.utc), "v1.0.0", "Hi", "")
    store.review("r2", True, "bo", "empty answer", "Hello.")
    second = corrections.new_version(project, store, checker(["sample_tasks"]))
    assert (second.rows, second.new, second.parent) == (3, 1, first.commit)
    changed = run(["git", "show", "--name-status", "--format=", second.commit], project).stdout.split("\n")
    assert "D\tdata/corrections/accepted-000002.jsonl.dvc" in changed
    assert "A\tdata/corrections/accepted-000003.jsonl.dvc" in changed
    assert not (project / first.path).exists() and not run(["git", "status", "--porcelain"], project).stdout
    assert corrections.new_version(project, store, checker(["sample_tasks"])) is None  # nothing new
    # the pointer is a stage of DVC's graph too; the pipeline's plan is still dvc.yaml's stages, in order
    from llmops.pipeline.stage import plan

    assert [s.dvc_name for s in plan(project)][:4] == ["inputs", "prepare_data", "validate_data", "train@pretrain"]


@pytest.mark.services
def test_the_window_is_read_from_s3_partitions(tmp_path, s3_endpoint, bucket):
    import boto3

    from llmops.core.config import StorageParams
    from llmops.serving.requestlog import LogError

    writer = Writer(tmp_path / "log")
    for i in range(3):
        writer.write({"request_id": f"r{i}", "status": 200})
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    for path in (tmp_path / "log").rglob("*.jsonl"):  # what a log shipper does
        s3.upload_file(str(path), bucket, f"serving/{path.relative_to(tmp_path / 'log')}")
    s3.put_object(Bucket=bucket, Key="serving/date=1999-01-01/old.jsonl", Body=b"{not read")
    storage = StorageParams(remote="s3", bucket=bucket, endpoint_url=s3_endpoint)
    now = datetime.now(timezone.utc)
    window = read_window(f"s3://{bucket}/serving", now - timedelta(hours=1), now + timedelta(seconds=1), storage)
    assert [r["request_id"] for r in window.records] == ["r0", "r1", "r2"] and window.files == 1
    down = StorageParams(remote="s3", bucket=bucket, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(LogError, match="cannot reach the S3 endpoint"):
        read_window(f"s3://{bucket}/serving", now - timedelta(hours=1), now, down)


def test_the_wordlist_detector_flags_profanity_and_not_numbers():
    from llmops.monitoring.checks import detectors
    from llmops.core.config import HarmfulParams

    detect = detectors(HarmfulParams(detectors=["wordlist"]))["wordlist"]
    assert detect(["you are a fucking idiot", "f u c k this", "sh1t", "85", "What number comes after 41?", ""]) == \
        [True, True, True, False, False, False]


def test_a_local_classifier_is_a_harmful_content_detector(tmp_path):
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    from llmops.monitoring.checks import detectors
    from llmops.core.config import ConfigError, HarmfulParams

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["you are nice", "you are awful"], trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "[PAD]", "[CLS]", "[SEP]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(tmp_path / "clf")
    model = BertForSequenceClassification(BertConfig(
        vocab_size=len(fast), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        id2label={0: "neutral", 1: "toxic"}, label2id={"neutral": 0, "toxic": 1}))
    with torch.no_grad():  # a classifier whose verdict is known: "toxic" with p = sigmoid(8) for any text
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([-4.0, 4.0]))
    model.save_pretrained(tmp_path / "clf")
    texts = ["you are awful", "", "you are nice"]
    flags = detectors(HarmfulParams(detectors=["classifier"], classifier=str(tmp_path / "clf")))["classifier"]
    assert flags(texts) == [True, True, True]
    calm = detectors(HarmfulParams(detectors=["classifier"], classifier=str(tmp_path / "clf"),
                                   classifier_threshold=0.9999))["classifier"]
    assert calm(texts) == [False, False, False]
    other = detectors(HarmfulParams(detectors=["classifier"], classifier=str(tmp_path / "clf"),
                                    classifier_labels=["insult"]))["classifier"]
    assert other(texts) == [False, False, False]
    with pytest.raises(ConfigError, match="not a local model directory"):
        detectors(HarmfulParams(detectors=["classifier"], classifier=str(tmp_path)))


@pytest.mark.services
def test_no_traffic_and_a_missing_reference_are_said_plainly(project, monitor_api):
    api_url, home = monitor_api
    env = base_env(PREFECT_API_URL=api_url, PREFECT_HOME=str(home))
    quiet = run(["llmops", "monitor"], project, env=env)
    assert "0 answered requests" in quiet.stdout and "nothing to judge, no report" in quiet.stdout
    writer = Writer(project / ".llmops/serve/requests")
    writer.write({"request_id": "r1", "status": 200, "prompt": "What number comes after 4?", "answer": "5",
                  "model_version": "v1.0.0", "latency_ms": 3.0, "finish_reason": "stop"})
    with open(next((project / ".llmops/serve/requests").rglob("*.jsonl")), "a") as fh:
        fh.write("{corrupt\n")
    missing = run(["llmops", "monitor"], project, env=env, check=False)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert "no model in production and none served" in missing.stderr
    assert "skipped a corrupt log line" in missing.stderr  # (Prefect logs what a flow prints to stderr)
    assert "{corrupt" in next((project / ".llmops/serve/requests").rglob("*.jsonl")).read_text()  # left as it was
    old = run(["llmops", "monitor", "--end", "2001-01-01T00:00:00Z"], project, env=env)
    assert "0 answered requests from 2000-12-31 00:00 to 2001-01-01 00:00 UTC" in old.stdout
    bad = run(["llmops", "monitor", "--end", "yesterday"], project, env=env, check=False)
    assert bad.returncode == 2 and "not an ISO 8601 time" in bad.stderr


class _Hook(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.services
@pytest.mark.training
def test_drifted_traffic_and_corrections_alert_and_start_a_run_on_a_new_dataset_version(ran_project, monitor_api):
    from openai import OpenAI

    api_url, home = monitor_api
    project = ran_project
    port = free_port()
    hook = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    env = base_env(PREFECT_API_URL=api_url, PREFECT_HOME=str(home))

    def webhook_block(name: str, url: str) -> None:
        """A Custom Webhook notification block on the server, made as a user makes one in Python."""
        run([sys.executable, "-c", "from prefect.blocks.notifications import CustomWebhookNotificationBlock as B; "
             f"B(name={name!r}, url={url!r}, json_data={{'text': '{{{{subject}}}}: {{{{body}}}}'}})"
             f".save({name!r}, overwrite=True)"], project, env=env)

    webhook_block("llmops-alerts", f"http://127.0.0.1:{hook.server_port}/hook")
    set_params(project, "deploy.target=local", f"deploy.port={port}",
               "monitor.alerts.notify=custom-webhook/llmops-alerts",
               "monitor.retrain.min_corrections=2", "monitor.consistency.requests=3", "monitor.consistency.samples=3",
               "monitor.fairness.pairs_per_type=1", "monitor.alerts.max_wrong_rate=1")
    run(["git", "commit", "-qam", "deploy and monitor"], project)
    try:
        assert "Deployed model v1.0.0" in run(["llmops", "run", "--no-push"], project, env=env).stdout
        key = (project / ".llmops/serve/api_key").read_text().strip()
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        asked = []
        for i in range(12):
            prompt = DRIFTED[i % len(DRIFTED)] + ("" if i < 5 else f" (number {i})")
            prompt = "Tell me a story about a fucking dragon" if i == 11 else prompt  # for the wordlist detector
            reply = client.chat.completions.create(model="model", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=6, temperature=0)
            asked.append(reply.id)
        checkable = client.chat.completions.create(model="model", max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": "What number comes after 41?"}]).choices[0].message.content
        with pytest.raises(Exception):
            client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])

        def feedback(body: dict) -> tuple[int, dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/feedback", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        assert feedback({"request_id": asked[0], "rating": 1, "correction": "The sea is grey."})[0] == 200
        assert feedback({"request_id": asked[1], "rating": 2, "correction": "Once upon a time."})[0] == 200
        status, body = feedback({"request_id": "chatcmpl-unknown", "rating": 1})
        assert status == 404 and body["error"]["code"] == "request_not_found"
        assert feedback({"request_id": asked[2], "rating": 9})[0] == 400

        first = run(["llmops", "monitor"], project, env=env)
        report = sorted((project / ".llmops/monitor/reports").glob("*/metrics.json"))[-1]
        fig = json.loads(report.read_text())
        assert fig["window"]["answered"] == 13 and fig["window"]["errors"] == 1
        assert fig["traffic"]["error_rate"] == pytest.approx(1 / 14)
        assert fig["drift"]["columns"]["task"]["drifted"] and fig["drift"]["share"] >= 0.5
        # each column's verdict (from its ValueDrift score) agrees with Evidently's own DriftedColumnsCount
        assert sum(c["drifted"] for c in fig["drift"]["columns"].values()) == fig["drift"]["count"]
        assert fig["traffic"]["task_mix"] == {"next_number": 1, "other": 12}
        assert fig["hallucination"]["checked"] == 1 and fig["hallucination"]["consistency"]["requests"] == 3
        assert fig["hallucination"]["wrong_rate"] == (0.0 if checkable.strip() == "42" else 1.0), checkable
        assert 0 <= fig["hallucination"]["consistency"]["mean_agreement"] <= 1
        assert fig["harmful"]["prompt_rate"] == pytest.approx(1 / 13)  # the one profane prompt, by the wordlist
        assert fig["feedback"]["rated"] == 2 and fig["feedback"]["mean_rating"] == pytest.approx(1.5)
        assert fig["feedback"]["by_version"]["v1.0.0"] == pytest.approx(1.5)
        assert fig["feedback"]["by_task"]["other"] == pytest.approx(1.5)
        assert set(fig["fairness"]["by_type"]) == {"gender", "race-color", "religion", "age", "nationality",
                                                   "disability"}
        release = json.loads((project / ".llmops/serve/models/v1.0.0/release.json").read_text())
        assert fig["fairness"]["version"] == "v1.0.0"  # beside the offline audit of the same version
        assert fig["fairness"]["offline_audit"] == release["scores"]["audit_bias"] and "pct_stereotype" in \
            fig["fairness"]["offline_audit"]
        _opens_offline(report.parent / "report.html")
        drifted_line = next(line for line in first.stdout.splitlines() if line.startswith("| drifted columns |"))
        assert "task" in drifted_line and "retraining is due" in first.stdout
        artifacts = _artifacts(api_url)
        assert f"{report.parent.resolve().as_uri()}/report.html" in artifacts["monitor-report"]["data"]
        assert "wrong checkable answers" in artifacts["monitor"]["data"]
        assert asked[0] in json.dumps(artifacts["review-queue"]["data"])  # rated 1: flagged for a reviewer
        texts = [m["text"] for m in _Hook.received]
        assert any("share of monitored columns drifted" in t for t in texts), texts
        assert any("mean user rating" in t for t in texts)
        alerts = [json.loads(line) for line in (project / ".llmops/monitor/alerts.jsonl").read_text().splitlines()]
        assert {"monitor.alerts.max_drift_share", "monitor.alerts.max_error_rate"} <= {a["check"] for a in alerts}

        # a receiver that is down: the alerts are still recorded, and the run says they were not sent
        webhook_block("down", f"http://127.0.0.1:{free_port()}/hook")
        set_params(project, "monitor.alerts.notify=custom-webhook/down")
        run(["git", "commit", "-qam", "a receiver that is down"], project)
        unsent = run(["llmops", "monitor"], project, env=env, check=False)
        assert unsent.returncode == 1 and "Traceback" not in unsent.stderr
        assert "were recorded in .llmops/monitor/alerts.jsonl but not sent through custom-webhook/down" in unsent.stderr
        assert len((project / ".llmops/monitor/alerts.jsonl").read_text().splitlines()) == 2 * len(alerts)

        queue = run(["llmops", "feedback", "queue"], project, env=env).stdout
        assert asked[0] in queue and "rated 1" in queue
        for rid in asked[:2]:
            run(["llmops", "feedback", "accept", rid, "--reason", "the user is right"], project, env=env)
        refused = run(["llmops", "feedback", "accept", asked[0], "--reason", "again"], project, env=env, check=False)
        assert refused.returncode == 1 and "already reviewed" in refused.stderr

        set_params(project, "monitor.alerts.notify=custom-webhook/llmops-alerts")
        run(["git", "commit", "-qam", "the receiver is back"], project)
        run(["llmops", "setup"], project, env=env)
        head = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
        second = run(["llmops", "monitor"], project, env=env)
        commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
        assert commit != head and f"flow run 'push-{commit[:12]}'" in second.stdout, second.stdout
        changed = run(["git", "show", "--name-only", "--format=", commit], project).stdout.split()
        assert changed == ["data/corrections/.gitignore", "data/corrections/accepted-000002.jsonl.dvc", "params.yaml"]
        runs = _flow_runs(api_url)
        assert runs[f"push-{commit[:12]}"]["commit"] == commit
        # the new data goes through prepare_data and validate_data like any other
        prepared = run(["llmops", "prepare_data"], project, env=env).stdout
        assert "+ 2 corrections from data/corrections/accepted-000002.jsonl" in prepared
        run(["llmops", "validate_data"], project, env=env)
    finally:
        hook.shutdown()
        stop_servers(project)


def _artifacts(api_url: str) -> dict[str, dict]:
    """The newest artifact of each key on the Prefect server."""
    req = urllib.request.Request(f"{api_url}/artifacts/filter", data=json.dumps({"sort": "CREATED_DESC"}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        newest_first = json.loads(resp.read())
    return {a["key"]: a for a in reversed(newest_first) if a.get("key")}


def _flow_runs(api_url: str) -> dict[str, dict]:
    req = urllib.request.Request(f"{api_url}/flow_runs/filter", data=b"{}", headers={"Content-Type":
                                                                                      "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return {r["name"]: r["parameters"] for r in json.loads(resp.read())}


def _opens_offline(page_file) -> None:
    """The report renders in headless Chromium with every network request refused: it needs none."""
    import re
    import shutil

    from playwright.sync_api import expect, sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no chromium: the project's setup installs it (apt-get install chromium)"
    refused = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 2000})
        page.route(re.compile(r"^(?!file:)"), lambda route: (refused.append(route.request.url), route.abort()))
        page.goto(page_file.as_uri())
        expect(page.get_by_text("Drifted Columns").first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Drift in column 'prompt_length'").first).to_be_attached()
        page.screenshot(path=str(page_file.with_suffix(".png")), full_page=False)
        browser.close()
    assert not refused, refused
