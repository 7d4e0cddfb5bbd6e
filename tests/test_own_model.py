"""A user's own foundation model and data, end to end: stand-in bases of four architectures named by hub id (from
the Hugging Face cache, offline, as an online run finds them once fetched), real GSM8K rows in chat form.

Each base is fetched by train@pretrain (nothing pretrains), fine-tuned with LoRA through its own tokenizer and
chat template, evaluated, audited, quantized, released and served; the served chat renders through the same
template, token for token.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import standin
from conftest import BIN, REPO, _wait_http, base_env, built_once, free_port, make_project, run, set_params, snapshot
from llmops.training import chat
from llmops.data import formats
from llmops.training import licences
from llmops.core.config import load_params
from llmops.training.modeling import encode_row, load_tokenizer

pytestmark = [pytest.mark.services, pytest.mark.training]

GSM8K = Path(__file__).resolve().parents[2] / "shared/data/gsm8k"
SYSTEM = "Solve the grade-school math problem. End with #### and the answer."
# small and quick: the point is that every stage runs on the architecture, not what a tiny random model learns
QUICK = ["train.finetune.steps=4", "train.finetune.warmup_steps=1", "train.finetune.micro_batch=4",
         "train.finetune.max_seq_len=null", "evaluate.max_examples=6", "evaluate.max_new_tokens=6",
         "audit_bias.pairs_per_type=2", "quantize.max_examples=4", "quantize.latency_new_tokens=2"]


def _bases(tmp: Path) -> None:
    for arch in standin.ARCHS:  # Llama in bf16, as Meta ships it: a release merged from it stays bf16
        standin.into_hub_cache(standin.build(arch, tmp / arch, dtype="bfloat16" if arch == "llama" else "float32"),
                               tmp / "hf", f"acme/tiny-{arch}")


@pytest.fixture(scope="session")
def hf_home(tmp_path_factory) -> Path:
    """A Hugging Face cache holding acme/tiny-{llama,qwen2,mistral,gpt2}, built once per test run."""
    return built_once(tmp_path_factory, "standin_bases", _bases) / "hf"


def _project(tmp_path: Path, arch: str, *overrides: str) -> Path:
    project = make_project(tmp_path / "project", tmp_path / "remote")
    set_params(project, f"train.finetune.base_model=acme/tiny-{arch}", *QUICK, *overrides)
    return project


def _serve_and_chat(project: Path, env: dict, messages: list[dict]) -> tuple[dict, list[int]]:
    """The release served; one greedy chat through the openai client. Returns the answer's JSON and what plain
    generate() answers to the same conversation rendered through the release's tokenizer."""
    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    release = project / "models/release"
    key = run([str(BIN / "llmops"), "serve", "keygen", "t"], project, env=env).stdout.split()[0]
    port = free_port()
    with open(project / "server.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "llmops"), "serve", "start", "--model", str(release), "--port", str(port)],
                                cwd=project, env=env, stdout=log, stderr=log)
    try:
        _wait_http(f"http://127.0.0.1:{port}/health", proc, 120)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0)
        name = client.models.list().data[0].id
        answer = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=6)
    finally:
        proc.terminate()
        proc.wait(60)
    tok = load_tokenizer(str(release))
    ids = chat.prompt_ids(tok, messages)
    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32)  # as the server computes on a CPU
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert answer.usage.prompt_tokens == len(ids)  # the server rendered the conversation as training did
    return answer.model_dump(), expected


@pytest.mark.skipif(not GSM8K.is_dir(), reason="../shared/data/gsm8k is not beside the project")
def test_gsm8k_as_chat_on_a_qwen2_base_end_to_end(hf_home, tmp_path):
    """Real data of real length, as `messages` with a system prompt: validated, fine-tuned, scored with GSM8K's
    numeric extractor against the base, released and served with the base's own chat template."""
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()[:120]]
    test = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:12]]
    for name, part in (("train", rows), ("test", test)):
        with open(tmp_path / f"{name}.jsonl", "w") as fh:
            for r in part:
                fh.write(json.dumps({"messages": [{"role": "system", "content": SYSTEM},
                                                  {"role": "user", "content": r["question"]},
                                                  {"role": "assistant", "content": r["answer"]}]}) + "\n")
    project = _project(tmp_path, "qwen2", f"data.instructions={tmp_path / 'train.jsonl'}",
                       f"data.eval_instructions={tmp_path / 'test.jsonl'}", "governance.data_licence=MIT",
                       "evaluate.metrics=[numeric, chrf, exact_match]", "validate_data.max_response_chars=4096",
                       "train.finetune.prompt_overflow=drop")  # the stand-in's 600-token BPE makes some rows long
    env = base_env(HF_HOME=str(hf_home))
    repro = run(["dvc", "repro"], project, env=env)
    assert "nothing to pretrain: fetched the base acme/tiny-qwen2 at " in repro.stdout  # no pretraining ran
    assert "examples of " in repro.stdout and "over it: prompt_overflow drop" in repro.stdout  # counted, then left out

    fetched = json.loads((project / "models/pretrain/manifest.json").read_text())["fetched"]
    lock = (project / "dvc.lock").read_text()
    assert fetched["licence"] == "apache-2.0" and len(fetched["revision"]) == 40
    assert "models/pretrain" in lock and "base_model: acme/tiny-qwen2" in lock  # a versioned input of the DAG
    train = [json.loads(line) for line in (project / "data/prepared/train.jsonl").read_text().splitlines()]
    assert train[0]["messages"][0] == {"role": "system", "content": SYSTEM} and train[0]["response"].count("####") == 1

    ev = json.loads((project / "reports/evaluate/metrics.json").read_text())
    assert ev["headline"] == "numeric" and set(ev["finetuned"]["metrics"]) == {"numeric", "chrf", "exact_match"}
    samples = [json.loads(line) for line in (project / "reports/evaluate/samples.jsonl").read_text().splitlines()]
    from llmops.evaluation.metrics import scores

    for model in ("base", "finetuned"):  # the numeric extractor, as metrics.json reports it
        expected = scores("numeric", [s[model] for s in samples], [s["reference"] for s in samples])
        assert ev[model]["metrics"]["numeric"]["value"] == sum(expected) / len(samples)
    verdict = json.loads((project / "reports/gate/verdict.json").read_text())
    assert [c["about"] for c in verdict["checks"] if c["name"] == "min_score"] == ["fine-tuned numeric on the eval split"]

    # the base is an input DVC versions: pushed with the rest, a fresh clone gets it back with no hub and no cache
    run(["dvc", "remote", "add", "-d", "mine", str(tmp_path / "dvc-remote")], project)
    run(["dvc", "push"], project, env=env)
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "a run on my base"], project)
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    no_hub = base_env(HF_HOME=str(tmp_path / "empty-hf-home"))  # HF_HUB_OFFLINE=1 too, as every test
    run(["dvc", "pull"], clone, env=no_hub)
    assert json.loads((clone / "models/pretrain/manifest.json").read_text())["fetched"]["revision"] == fetched["revision"]
    # nothing to rebuild: only the inputs stage, which runs every time (it fingerprints your files), is listed
    assert run(["dvc", "status"], clone, env=no_hub).stdout.split() == ["inputs:", "always", "changed"]

    release_tok = load_tokenizer(str(project / "models/release"))
    assert release_tok.chat_template == standin.CHATML  # the base's own template, not one of ours
    answer, expected = _serve_and_chat(project, env, [{"role": "system", "content": SYSTEM},
                                                      {"role": "user", "content": test[0]["question"]}])
    assert answer["choices"][0]["message"]["content"] == expected

    # the same rows as alpaca train the same tokens as the messages rows without a system prompt
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("".join(json.dumps({"instruction": r["question"], "input": "", "output": r["answer"]}) + "\n"
                              for r in rows[:5]))
    set_params(project, f"data.instructions={alpaca}", "data.eval_instructions=null", "data.eval_fraction=0.2")
    run(["llmops", "prepare_data"], project, env=env)
    run(["llmops", "validate_data"], project, env=env)
    tok = load_tokenizer(str(project / "models/pretrain"))
    by_prompt = {r["question"]: r["answer"] for r in rows}
    for row in [json.loads(line) for line in (project / "data/prepared/train.jsonl").read_text().splitlines()]:
        as_messages = {"messages": [{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": by_prompt[row["prompt"]]}]}
        assert encode_row(tok, row, "alpaca") == encode_row(tok, formats.normalize([(1, as_messages)], "m")[0], "m")


def _chats(path: Path, rows: list[dict]) -> Path:
    """The demo's instruction rows as chat data with a system prompt."""
    path.write_text("".join(json.dumps({"messages": [
        {"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": r["prompt"]},
        {"role": "assistant", "content": r["response"]}], "task": r["task"]}) + "\n" for r in rows))
    return path


def _from_config(tmp_path: Path, config: str, arch: str, *overrides: str) -> Path:
    """A project whose params.yaml is configs/<config> as shipped, with only what a test must change: the stand-in
    base, local data, a local remote, a short run and a gate a random model can pass."""
    from conftest import TINY_GATE

    project = make_project(tmp_path / "project", tmp_path / "remote")
    applied = run(["llmops", "params", "--apply", str(REPO / "configs" / config)], project)  # as the file's header says
    assert applied.stdout.startswith("params.yaml: ") and "train.finetune.base_model" in applied.stdout
    set_params(project, f"train.finetune.base_model=acme/tiny-{arch}", "train.finetune.revision=null", *QUICK,
               "train.finetune.deepspeed.precision=fp32", "storage.remote=local",
               f"storage.local_dir={tmp_path / 'remote'}", "deploy.target=none", *(f"gate.{g}" for g in TINY_GATE),
               "audit_bias.pairs_per_type=2", *overrides)
    return project


def test_shipped_configs_load_validate_and_run(hf_home, tmp_path, s3_endpoint, bucket):
    """Every config loads; configs/own-data-on-s3.yaml as shipped runs on a Mistral stand-in, its data read from S3
    (moto), through every stage to a served release."""
    import boto3

    from llmops.data import sample_data

    for config in sorted((REPO / "configs").glob("*.yaml")):
        load_params(config)  # every key known, every value valid
    rows = sample_data.instructions(0, 60)
    key = "support/instructions.jsonl"
    boto3.client("s3", endpoint_url=s3_endpoint).put_object(
        Bucket=bucket, Key=key, Body=_chats(tmp_path / "chats.jsonl", rows).read_bytes())
    project = _from_config(tmp_path, "own-data-on-s3.yaml", "mistral", f"data.instructions=s3://{bucket}/{key}",
                           f"storage.bucket={bucket}", f"storage.endpoint_url={s3_endpoint}", "storage.remote=s3",
                           "evaluate.max_new_tokens=4")
    env = base_env(HF_HOME=str(hf_home))
    run(["dvc", "repro"], project, env=env)
    ev = json.loads((project / "reports/evaluate/metrics.json").read_text())
    assert ev["headline"] == "chrf" and ev["base_model"] == "acme/tiny-mistral"
    train = (project / "data/prepared/train.jsonl").read_text()
    assert '"role": "system"' in train and len(train.splitlines()) == 57  # eval_fraction 0.05 of 60
    answer, expected = _serve_and_chat(project, env, [{"role": "user", "content": "What number comes after 250?"}])
    assert answer["choices"][0]["message"]["content"] == expected  # [INST] ... [/INST], as trained


def test_qlora_config_is_refused_without_a_gpu_before_training(hf_home, tmp_path):
    project = _from_config(tmp_path, "qlora-gpu.yaml", "llama", "train.finetune.deepspeed.precision=bf16",
                           f"data.instructions={tmp_path / 'rows.jsonl'}")
    (tmp_path / "rows.jsonl").write_text("".join(
        json.dumps({"instruction": f"Say {w}.", "input": "", "output": w}) + "\n" for w in standin.ARCHS))
    env = base_env(HF_HOME=str(hf_home))
    for stage in (["prepare_data"], ["validate_data"], ["train", "pretrain"]):
        run(["llmops", *stage], project, env=env)
    refused = run(["llmops", "train", "finetune"], project, env=env, check=False)
    assert refused.returncode != 0 and "qlora" in refused.stderr and "CUDA" in refused.stderr, refused.stderr
    assert not (project / "models/finetune").exists()


@pytest.mark.parametrize("arch, config", [("llama", "chat-lora-hub-model.yaml"), ("gpt2", None)])
def test_every_stage_runs_on_the_architecture(hf_home, tmp_path, arch, config):
    """Every stage on a stand-in base: LoRA finds its layers (GPT-2's Conv1D too), a quantization that would change
    nothing is refused before training, and what is released serves with the base's template. Llama runs the
    chat-LoRA example config as shipped; GPT-2, which has no chat template, the demo's params with one named."""
    from llmops.data import sample_data

    env = base_env(HF_HOME=str(hf_home))
    if config:
        rows = sample_data.instructions(0, 80)
        project = _from_config(tmp_path, config, arch, f"data.instructions={_chats(tmp_path / 'c.jsonl', rows[:64])}",
                               f"data.eval_instructions={_chats(tmp_path / 'e.jsonl', rows[64:])}",
                               "gate.release_candidate=none")  # the merged model, as a GPU user serves it
    else:  # no chat template of its own; torchao's int8 converts nn.Linear only, and GPT-2 has Conv1D
        project = _project(tmp_path, arch)
        run(["llmops", "prepare_data"], project, env=env)
        refused = run(["llmops", "train", "pretrain"], project, env=env, check=False)
        assert refused.returncode == 2 and "its tokenizer has no chat template" in refused.stderr
        set_params(project, f"train.finetune.chat_template={standin.PLAIN}")
        refused = run(["llmops", "train", "pretrain"], project, env=env, check=False)
        assert refused.returncode == 2 and "quantize.methods: int8_weight_only (torchao) converts Linear layers and " \
            "this gpt2 model has none (its linear layers are Conv1D)" in refused.stderr
        assert snapshot(project, "models") == {}  # refused before anything was written
        set_params(project, "quantize.methods=[nf4]", "gate.release_candidate=nf4")
    run(["dvc", "repro"], project, env=env)
    adapter = json.loads((project / "models/finetune/adapter_config.json").read_text())
    linear = {"gpt2": {"c_attn", "c_proj", "c_fc"}}.get(arch, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"})
    # all-linear, as the architecture names its layers (peft lists each layer it adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]} == linear
    quantized = json.loads((project / "reports/quantize/metrics.json").read_text())["methods"]
    assert quantized and all(q["quantized_layers"] == q["linear_layers"] > 0 for q in quantized.values())
    if config:  # merged in the base's own precision, though every stage computed in float32 on this CPU
        base = json.loads((project / "models/pretrain/config.json").read_text())
        release = json.loads((project / "models/release/config.json").read_text())
        assert base["dtype"] == release["dtype"] == "bfloat16"
    answer, expected = _serve_and_chat(project, env, [{"role": "user", "content": "What number comes after 250?"}])
    assert answer["choices"][0]["message"]["content"] == expected


def test_continued_pretraining_config_pretrains_the_named_base_on_the_corpus(hf_home, tmp_path):
    """configs/continued-pretraining.yaml as shipped, short: the Qwen2 stand-in fetched, its pretraining continued on
    a corpus in its own tokens (from its weights, not at random), then fine-tuned on it."""
    from safetensors.torch import load_file

    from llmops.data import sample_data

    corpus = tmp_path / "domain.txt"
    corpus.write_text(sample_data.corpus(1, 300))
    rows = sample_data.instructions(0, 40)
    project = _from_config(
        tmp_path, "continued-pretraining.yaml", "qwen2", f"data.corpus={corpus}",
        f"data.instructions={_chats(tmp_path / 'c.jsonl', rows)}", "train.pretrain.steps=4",
        "train.pretrain.warmup_steps=1", "train.pretrain.max_seq_len=64", "train.pretrain.grad_accum=1",
        "train.pretrain.activation_checkpointing=false", "train.pretrain.deepspeed.precision=fp32",
        "train.pretrain.deepspeed.zero_stage=2", "train.pretrain.checkpoint_every=0")
    env = base_env(HF_HOME=str(hf_home))
    run(["dvc", "repro", "train@finetune"], project, env=env)
    summary = json.loads((project / "reports/train/pretrain/summary.json").read_text())
    assert summary["continued_from"] == "acme/tiny-qwen2" and summary["steps"] == 4
    # trained from the base's weights, not from a random start: every weight is near the base's, some moved
    base = load_file(str(hf_home.parent / "qwen2/model.safetensors"))
    trained = load_file(str(project / "models/pretrain/model.safetensors"))
    moved = [k for k in base if not (trained[k] == base[k]).all()]
    assert moved and all((trained[k] - base[k]).abs().max() < 0.1 for k in base)  # near the base, not re-drawn
    manifest = json.loads((project / "models/pretrain/manifest.json").read_text())
    assert manifest["fetched"]["base_model"] == "acme/tiny-qwen2"  # fine-tuning finds the base it names
    assert (project / "models/finetune/adapter_model.safetensors").is_file()
    inputs = [e["input"] for e in licences.of_inputs(load_params(project / "params.yaml"), project)]
    assert any(i.startswith("data.corpus") for i in inputs)  # the corpus is an input of the release now
