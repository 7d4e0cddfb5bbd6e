"""Shared fixtures: a throwaway copy of the project as a git repo, and real services on 127.0.0.1."""

from __future__ import annotations

import compileall
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

# One compute thread a process, this one (set before torch is imported here) and every one it starts: the suite runs
# two pytest-xdist workers on two cores, and a second OpenMP thread would only wait, spinning, for a core the other
# worker holds (the tiny pipeline ran 15% slower).
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

# The fork server (llmops.core.forkserver; on unless LLMOPS_FORKSERVER=0, which runs the suite without it): a folder
# of the session's own, shared by the xdist workers (they inherit it), its servers stopped at the end.
if not os.environ.get("PYTEST_XDIST_WORKER"):
    import tempfile

    os.environ["LLMOPS_FORKSERVER_DIR"] = tempfile.mkdtemp(prefix="llmops-forkserver-")

from llmops.core import forkserver
from llmops.pipeline.prefect_api import seeded
from llmops.serving.instances import free_port  # (the tests' ports, found as the project finds its own)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The package's bytecode, written once here: the editable install compiles nothing, and with PYTHONDONTWRITEBYTECODE
# set (as on the CI machines) each of the suite's hundreds of interpreters would compile what it imports anew.
compileall.compile_dir(REPO / "llmops", quiet=1)


def run(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or base_env(), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def base_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        DVC_NO_ANALYTICS="1",
        GX_ANALYTICS_ENABLED="false",
        HF_HUB_OFFLINE="1",  # tests never reach a model hub
        HF_HUB_DISABLE_PROGRESS_BARS="1",  # as `llmops run` sets it: its stages and the tests' share a fork server
        TOKENIZERS_PARALLELISM="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        GIT_AUTHOR_NAME="test", GIT_AUTHOR_EMAIL="test@example.com",
        GIT_COMMITTER_NAME="test", GIT_COMMITTER_EMAIL="test@example.com",
    )
    for var in ("LLMOPS_S3_BUCKET", "LLMOPS_S3_PREFIX", "LLMOPS_S3_ENDPOINT_URL", "LLMOPS_S3_REGION", "PREFECT_API_URL"):
        env.pop(var, None)
    env.update(extra)
    return env


TOY_WORDS = [f"w{i}" for i in range(40)]


def toy_model(path: Path, poison: str | None = None) -> Path:
    """A 2-layer Llama of random weights with a word-level tokenizer over TOY_WORDS: loads and answers in seconds.

    `poison`: a word whose embedding row is NaN, as a fine-tune that diverged on a rare token leaves it: a sampled
    answer to a prompt holding it fails inside the engine (torch.multinomial refuses the NaN probabilities), and with
    it the generation loop."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", *TOY_WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                         pad_token_id=0, eos_token_id=1, bos_token_id=None))
    if poison is not None:
        with torch.no_grad():
            model.model.embed_tokens.weight[vocab[poison]] = float("nan")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch):
    """In-process boto3 calls use fake credentials and never the developer's real ones."""
    for key, value in base_env().items():
        if key.startswith(("AWS_", "DVC_", "GX_", "HF_", "TOKENIZERS_")):
            monkeypatch.setenv(key, value)
    for var in ("LLMOPS_S3_BUCKET", "LLMOPS_S3_PREFIX", "LLMOPS_S3_ENDPOINT_URL", "LLMOPS_S3_REGION"):
        monkeypatch.delenv(var, raising=False)


# A model small enough to train in seconds on 2 CPU cores, yet big enough for its loss to fall clearly.
TINY_TRAIN = [
    "model.vocab_size=300", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
    "model.intermediate_size=64", "lr=0.01",
]
TINY_RUN = ["steps=60", "warmup_steps=5", "max_seq_len=128", "micro_batch=8", "checkpoint_every=0"]
# The tiny model learns little in 60 steps: its gate lets it through, so the tests can flip one check at a time.
TINY_GATE = [
    "min_score=0", "min_gain_over_base=-1", "min_gain_over_baseline=-1", "max_perplexity=1e9",
    "max_stereotype_deviation=50", "max_stereotype_increase=50", "max_stereotype_deviation_per_type=50",
    "max_regression=1", "max_quantized_exact_match_drop=1",
    "max_quantized_perplexity_increase=100",
]


def set_params(project: Path, *overrides: str) -> None:
    """Write dotted overrides into the project's params.yaml (checked by the schema, as `-S` is)."""
    from llmops.core.config import load_params, write_params

    write_params(project / "params.yaml", load_params(project / "params.yaml", overrides))


def make_project(dest: Path, remote: Path) -> Path:
    """The project's files (as they are in this work tree) in a fresh git repo: small data, tiny model."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file() and not name.startswith(("data/prepared", "reports/", "models/", "benchmarks/")) \
                and name != "dvc.lock":
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for compiled in (REPO / "llmops").rglob("__pycache__/*.pyc"):  # a worker run as `python -m` imports the copy
        (dest / compiled.relative_to(REPO)).parent.mkdir(exist_ok=True)
        shutil.copy2(compiled, dest / compiled.relative_to(REPO))
    params = dest / "params.yaml"
    params.write_text(
        params.read_text()
        .replace("local_dir: null", f"local_dir: {remote}")
        .replace("num_examples: 2000", "num_examples: 400")
        .replace("corpus_lines: 4000", "corpus_lines: 500")
    )
    set_params(
        dest,
        *(f"train.pretrain.{o}" for o in TINY_TRAIN + TINY_RUN),
        *(f"train.finetune.{o}" for o in TINY_RUN + ["lora.r=4"]),
        "audit_bias.pairs_per_type=10", "quantize.max_examples=16", "quantize.latency_new_tokens=4",
        "quantize.latency_repeats=1",
        *(f"gate.{o}" for o in TINY_GATE),
        "evaluate.max_new_tokens=8",
        "deploy.target=none",  # the tests that deploy say so, each on a port of its own
    )
    run(["git", "init", "-q", "-b", "main"], dest)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "project under test"], dest)
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A fresh copy of the project with a private local remote."""
    return make_project(tmp_path / "project", tmp_path / "remote")


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """`build(dir)` run once per test run, however many pytest-xdist workers ask: the first builds, under
    a file lock, and the others wait for it. A failed build is retried by the next to ask."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base directory, which every worker's lies in
    path, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            done.touch()
    return path


# The CPU kernels the pinned run (test_pinned_numbers) computes with, whatever x86 CPU runs it: PyTorch's own
# kernels and oneDNN at their AVX2 level (an AVX-512 or AMX machine would otherwise round differently), MKL's
# conditional numerical reproducibility in its vendor-independent mode (its AVX2 path alone still differs between
# Intel and AMD), and one thread (a reduction split over threads adds in another order).
PORTABLE_CPU = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "COMPATIBLE",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _run_pipeline(tmp: Path) -> None:
    project = make_project(tmp / "project", tmp / "remote")
    (tmp / "repro.log").write_text(run(["dvc", "repro"], project, env=base_env(**PORTABLE_CPU)).stdout)


def _train_two_ranks(tmp: Path) -> None:
    project = make_project(tmp / "project", tmp / "remote")
    set_params(
        project,
        "train.pretrain.deepspeed.zero_stage=2", "train.pretrain.deepspeed.num_procs=2",
        "train.finetune.deepspeed.zero_stage=3", "train.finetune.deepspeed.num_procs=2",
        "train.finetune.merge=true",
    )
    for stage in (["prepare_data"], ["train", "pretrain"], ["train", "finetune"]):
        run([str(BIN / "llmops"), *stage], project)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A project whose tiny model was pretrained with ZeRO-2 and LoRA-fine-tuned with ZeRO-3, each on 2 ranks."""
    return built_once(tmp_path_factory, "trained", _train_two_ranks) / "project"


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> Path:
    """The tiny pipeline, run once per test run through `dvc repro`: copy it with `ran_project`."""
    return built_once(tmp_path_factory, "pipeline", _run_pipeline) / "project"


TRAINED_FIXTURES = {"pipeline", "trained", "two_versions"}  # (and every fixture built on them)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One test that needs the run pipeline first, the rest of those last: the first xdist worker builds
    the pipeline while the other runs tests that need none (xdist hands out contiguous chunks in order).

    A test that needs a trained fixture launches training (when it is the first to ask): without the `training`
    marker, `-m "not training"` would train anyway, for minutes."""
    unmarked = [item.nodeid for item in items if TRAINED_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("training") is None]
    if unmarked:
        raise pytest.UsageError(f"tests that need a trained fixture lack the training marker: {unmarked}")
    needs = [item for item in items if "pipeline" in getattr(item, "fixturenames", ())]
    others = [item for item in items if "pipeline" not in getattr(item, "fixturenames", ())]
    items[:] = needs[:1] + others + needs[1:]


@pytest.fixture
def ran_project(pipeline: Path, tmp_path: Path) -> Path:
    """A copy of the session's run pipeline (outputs, dvc.lock, DVC cache), with a remote of its own."""
    return copy_ran_project(pipeline, tmp_path)


def _register_two_versions(tmp: Path, pipeline: Path) -> None:
    project = copy_ran_project(pipeline, tmp)
    llmops = [str(BIN / "llmops")]
    run(llmops + ["registry", "register", "--why", "v1"], project)
    run(llmops + ["registry", "promote", "v1", "--to", "production", "--why", "first"], project)
    set_params(project, "train.finetune.seed=1", "train.finetune.lr=0.02")  # another adapter on the same base
    run(["dvc", "repro", "release"], project)
    run(llmops + ["registry", "register", "--why", "v2"], project)
    run(["git", "commit", "-qam", "v2's params"], project)


@pytest.fixture(scope="session")
def two_versions(pipeline, tmp_path_factory) -> Path:
    """The pipeline with v1 (production) and v2 (the same base, another LoRA adapter) registered, built once per
    test run: copy it with `versioned_project`."""
    return built_once(tmp_path_factory, "two_versions", lambda tmp: _register_two_versions(tmp, pipeline)) / "project"


@pytest.fixture
def versioned_project(two_versions: Path, tmp_path: Path) -> Path:
    """A copy of `two_versions` (registry tags, DVC cache), with a remote of its own."""
    return copy_ran_project(two_versions, tmp_path)


def copy_ran_project(pipeline: Path, into: Path) -> Path:
    """A copy of a run project (outputs, dvc.lock, DVC cache, git history and tags) with a remote of its own, where its
    audit trail goes with it: the registry's tags are accounted for by the trail's records (llmops/registry/versions.py)."""
    from llmops.core.config import load_params

    dest = into / "project"
    shutil.copytree(pipeline, dest, symlinks=True)
    trail = Path(load_params(pipeline / "params.yaml").storage.local_dir or "") / "audit"
    if trail.is_dir() and trail.is_absolute():
        shutil.copytree(trail, into / "remote" / "audit")
    set_params(dest, f"storage.local_dir={into / 'remote'}")
    run(["git", "commit", "-qam", "a remote of its own"], dest)
    return dest


def stop_servers(project: Path) -> None:
    """Stop the servers a test's deploy left running (they outlive the run by design), and check they are gone."""
    from llmops.serving import instances as servers

    left = servers.running(project)
    run(["llmops", "serve", "stop"], project, check=bool(left))
    for server in left:
        assert _exited(server.pid), f"server {server.pid} still running"


def _exited(pid: int) -> bool:
    """Gone, or a zombie (exited; its parent, the run that started it, is gone too, and init reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # (gone before, or while, it was read)
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def snapshot(project: Path, *paths: str) -> dict[str, bytes]:
    """The bytes of every file under `paths`, to check that a failed run left them as they were."""
    found = {}
    for top in paths:
        for f in sorted((project / top).rglob("*")) if (project / top).is_dir() else [project / top]:
            if f.is_file():
                found[str(f.relative_to(project))] = f.read_bytes()
    return found


def _wait_http(url: str, proc: subprocess.Popen, seconds: float) -> None:
    from llmops.core.procs import Exited, wait_until

    def answers() -> bool:
        try:
            urllib.request.urlopen(url, timeout=2)
            return True
        except Exception:
            return False

    try:
        if not wait_until(answers, seconds, interval_s=0.5, proc=proc):
            raise RuntimeError(f"no answer from {url} within {seconds}s")
    except Exited as exc:
        raise RuntimeError(f"server exited with {exc.returncode} before answering {url}") from None


@contextmanager
def postgres() -> Iterator[str]:
    """A PostgreSQL server (Debian's package; .ci/run installs it) in a throwaway cluster on 127.0.0.1; yields its
    SQLAlchemy URL. As root it runs as the package's `postgres` user, since PostgreSQL refuses to run as root."""
    import tempfile

    bindirs = sorted(Path("/usr/lib/postgresql").glob("*/bin"))
    if not bindirs:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql; .ci/run does it)")
    bindir, port = bindirs[-1], free_port()
    data = Path(tempfile.mkdtemp(prefix="llmops-pg-"))
    as_owner = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_owner, bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_owner, bindir / "pg_ctl", "-D", data, "-w", "-l", data / "log", "-o",
                    f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_owner, bindir / "pg_ctl", "-D", data, "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """moto's standalone S3-compatible server on 127.0.0.1."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=log, env=base_env()
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url, proc, 60)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture
def bucket(s3_endpoint, request) -> str:
    """A fresh, empty bucket on the moto server."""
    import boto3

    name = "llmops-" + request.node.name.lower().replace("_", "-")[:40].strip("-[]")
    name = "".join(c for c in name if c.isalnum() or c == "-")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A real Prefect server (SQLite, its own PREFECT_HOME) on 127.0.0.1, stopped after the block; yields its API URL."""
    port = free_port()
    env = base_env(
        PREFECT_HOME=str(home),
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api",  # the UI a browser test opens
    )
    log = open(home / "server.log", "w")
    keep_migrated = seeded(home / "prefect.db")  # as a project's own server starts (llmops/pipeline/prefect_api.py)
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=log, env=env,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{url}/health", proc, 120)
        keep_migrated()
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The session's Prefect server; yields (API URL, PREFECT_HOME). Tests that register deployments or create runs
    that others could see (test_worker's, the monitor's) keep to their own module's server."""
    home = tmp_path_factory.mktemp("prefect_home")
    with prefect_server(home) as url:
        yield url, home


def pytest_unconfigure(config) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = Path(os.environ["LLMOPS_FORKSERVER_DIR"])
        forkserver.stop_all(folder)
        shutil.rmtree(folder, ignore_errors=True)
