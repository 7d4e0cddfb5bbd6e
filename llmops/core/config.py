"""Typed pipeline parameters: params.yaml parsed into pydantic models.

One parser for every consumer (stages, CLI, flow): unknown keys, wrong types and
impossible combinations fail here, before any work, with the dotted key named.
"""

from __future__ import annotations

import difflib
import io
import os
import re
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError

from llmops.core.errors import Refused
from llmops.core.fs import write_text
from llmops.core.peft_methods import METHODS, LoraParams, PromptTuningParams

PARAMS_FILE = "params.yaml"
# keys a release renamed: a params.yaml that still has one is told the new name
RENAMED = {"gate.min_exact_match": "gate.min_score: the headline metric of evaluate.metrics, exact match by default"}
MAX_STEPS = 100_000_000
MAX_LR = 1.0  # above this Adam only diverges; prompt tuning, the most lr-hungry method, uses <= 0.3
# a seed every generator takes: numpy's legacy seeding refuses anything outside [0, 2**32), and a negative one
# or 2**64 reached the stage as a traceback after the run had started
Seed = Annotated[int, Field(ge=0, lt=2**32, description="random seed, 0 to 2**32 - 1")]


class ConfigError(Refused):
    """Bad parameters. The message names the source and the dotted key, one line per problem."""


def _listed_once(value: list, what: str) -> list:
    if len(set(value)) != len(value):
        raise ValueError(f"lists a {what} twice: {value}")
    return value


def read_by(stage: str) -> dict[str, str]:
    """A field's marker (json_schema_extra): its value names a file (or files) that `stage` reads. The inputs stage
    fingerprints every marked file, and the stage depends on its fingerprints (llmops/pipeline/stages/inputs.py): a file edited in
    place runs it again. A new file parameter costs this marker alone."""
    return {"read_by": stage}


def _reader(info) -> str | None:
    """The stage a field's read_by marker names, or None."""
    return info.json_schema_extra.get("read_by") if isinstance(info.json_schema_extra, dict) else None


def readers(model: type[BaseModel] | None = None) -> list[str]:
    """The stages that read files named by params (those of the fields marked read_by), in declaration order."""
    found: list[str] = []
    for info in (model or Params).model_fields.values():
        stage = _reader(info)
        inner = [stage] if stage is not None else (
            readers(info.annotation) if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
            else [])
        found += [stage for stage in inner if stage not in found]
    return found


def stage_inputs(params: BaseModel, prefix: str = "") -> dict[str, list[tuple[str, str]]]:
    """stage -> (params key, value) of every file that params name and the stage reads (the fields marked read_by)."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name, info in type(params).model_fields.items():
        value, key, stage = getattr(params, name), f"{prefix}{name}", _reader(info)
        if stage is not None:
            for one in value if isinstance(value, list) else [value]:
                if one is not None:
                    found.setdefault(stage, []).append((key, one))
        elif isinstance(value, BaseModel):
            for inner, pairs in stage_inputs(value, f"{key}.").items():
                found.setdefault(inner, []).extend(pairs)
    return found


class Section(BaseModel):
    # strict: a quoted "128" is a string, not a number, and is refused like any other wrong type
    # allow_inf_nan=False: `lr: .inf` or `nan` can only be a mistake
    # field_title_generator: the Prefect UI's form labels each field with its params.yaml key
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False,
                              field_title_generator=lambda name, info: name)


class DataParams(Section):
    """Where the instruction data and the pretraining corpus come from.

    A path left null means "generate the embedded sample from `seed`".
    """

    seed: Seed = 0
    num_examples: int = Field(2000, ge=2, le=10_000_000, description="generated instruction examples (train + eval)")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="share of examples held out for eval")
    corpus_lines: int = Field(4000, ge=1, le=100_000_000, description="lines of generated pretraining text")
    instructions: str | None = Field(None, description="your instruction data: JSONL or CSV, local path or s3:// URI, "
                                     "in one of the formats of `format`", json_schema_extra=read_by("prepare_data"))
    format: Literal["auto", "messages", "alpaca", "prompt_response"] = Field(
        "auto", description="of instructions and eval_instructions: messages (OpenAI chat: system, user and assistant "
        "turns), alpaca (instruction, input, output), prompt_response (prompt, response); auto: as the first row's "
        "keys say")
    eval_instructions: str | None = Field(
        None, description="your eval split (same format); when null, eval is split off `instructions`",
        json_schema_extra=read_by("prepare_data"))
    corpus: str | None = Field(None, description="your pretraining text: local path or s3:// URI",
                               json_schema_extra=read_by("prepare_data"))
    corrections: str | None = Field(None, description="reviewed corrections from production (JSONL, `llmops "
                                    "feedback` writes it): their rows join the train split",
                                    json_schema_extra=read_by("prepare_data"))

    @field_validator("eval_instructions")
    @classmethod
    def _eval_needs_train(cls, value, info: ValidationInfo):
        if value is not None and info.data.get("instructions") is None:
            raise ValueError("set only together with data.instructions (the train split)")
        return value

    @field_validator("instructions", "eval_instructions", "corpus", "corrections")
    @classmethod
    def _known_format(cls, value, info: ValidationInfo):
        if value is None:
            return value
        suffixes = (".txt", ".text") if info.field_name == "corpus" else (".jsonl", ".csv")
        if not value.lower().endswith(suffixes):
            raise ValueError(f"{value!r}: expected a file ending in {' or '.join(suffixes)}")
        return value


class ValidateDataParams(Section):
    """Thresholds of the Great Expectations suite run by validate_data."""

    min_chars: int = Field(1, ge=0, description="shortest allowed prompt or response, in characters")
    max_prompt_chars: int = Field(2048, ge=1)
    max_response_chars: int = Field(2048, ge=1)
    max_duplicate_rate: float = Field(
        0.01, ge=0, le=1, description="largest share of rows whose (prompt, response) pair appears twice or more"
    )
    pii: list[Literal["email", "phone", "card", "ip", "iban", "ssn"]] = Field(
        default_factory=lambda: ["email", "phone", "card", "ip", "iban", "ssn"], description="kinds of PII refused "
        "(and, at inference, handled by deploy.privacy)"
    )
    phone_regions: list[str] = Field(
        default_factory=lambda: ["US", "GB"], min_length=1,
        description="where a phone number written without +country code is read as national (ISO 3166 codes)")

    @field_validator("phone_regions")
    @classmethod
    def _known_regions(cls, regions: list[str]) -> list[str]:
        import phonenumbers

        unknown = [r for r in regions if r not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown region {unknown[0]!r}: use ISO 3166 codes phonenumbers knows (US, GB, DE, ...)")
        return regions

    @field_validator("max_prompt_chars", "max_response_chars")
    @classmethod
    def _max_above_min(cls, value, info: ValidationInfo):
        low = info.data.get("min_chars")
        if low is not None and value < low:
            raise ValueError(f"must be >= validate_data.min_chars ({low})")
        return value


class StorageParams(Section):
    """The DVC remote that datasets and checkpoints are pushed to.

    Credentials never live here: they come from the standard AWS sources
    (environment, ~/.aws, instance roles).
    """

    remote: Literal["local", "s3"] = "local"
    local_dir: str | None = Field(
        None, description="the local remote's directory; null: ~/.cache/llmops/dvc-remote/<first commit>, one per project")
    bucket: str | None = Field(None, validate_default=True)
    prefix: str = Field("llmops", description="key prefix inside the bucket")
    endpoint_url: str | None = Field(None, description="for S3-compatible stores (MinIO, moto, R2...)")
    region: str | None = None

    @field_validator("bucket")
    @classmethod
    def _bucket_for_s3(cls, value, info: ValidationInfo):
        if info.data.get("remote") == "s3" and not value:
            raise ValueError("required when storage.remote is 's3'")
        return value

    @property
    def url(self) -> str:
        """The remote's URL as DVC takes it."""
        if self.remote == "s3":
            return f"s3://{self.bucket}/{self.prefix.strip('/')}" if self.prefix.strip("/") else f"s3://{self.bucket}"
        if self.local_dir is None:
            raise ValueError("storage.local_dir is resolved per project: use storage_for(storage, root)")
        return self.local_dir


class DeepSpeedParams(Section):
    """How DeepSpeed shards and places the training state, and how many processes run."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="0: plain DDP; 1: shard optimizer; 2: + gradients; 3: + parameters")
    offload_optimizer: bool = Field(False, description="keep optimizer states in CPU memory (ZeRO 1-3)")
    offload_params: bool = Field(False, description="keep parameters in CPU memory (ZeRO 3 only)")
    precision: Literal["bf16", "fp32"] = "fp32"
    num_procs: int = Field(1, ge=1, description="training processes per node (one per GPU; CPU ranks when there is none)")
    nnodes: int = Field(1, ge=1, le=65_536, description="machines training together; each runs the same command in its "
                        "own checkout, and the node that gets rank 0 publishes the model")
    rdzv_endpoint: str | None = Field(
        None, description="host:port where the nodes meet (torchrun's c10d rendezvous, on one of them); null: "
        "LLMOPS_RDZV_ENDPOINT, PET_RDZV_ENDPOINT, or MASTER_ADDR and MASTER_PORT as SLURM scripts and Kubernetes "
        "set them. Needed when nnodes > 1")

    @field_validator("rdzv_endpoint")
    @classmethod
    def _host_port(cls, value):
        if value is not None and not re.fullmatch(r"[^\s:]+:\d{1,5}", value):
            raise ValueError(f"{value!r}: expected host:port")
        return value

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3 (got zero_stage {self.zero_stage}); set zero_stage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage 1, 2 or 3 (ZeRO-Offload); got zero_stage 0")
        return self


class TrainRunParams(Section):
    """What every training run shares: optimization, schedule, batch, checkpoints, DeepSpeed."""

    # Upper bounds catch values that can only be typos (lr 1e30 trains a dead model and reports success).
    steps: int = Field(ge=1, le=MAX_STEPS, description="optimizer steps")
    lr: float = Field(gt=0, le=MAX_LR, description="peak learning rate")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="after warmup")
    warmup_steps: int = Field(20, ge=1, description="linear warmup (DeepSpeed's schedulers need at least 1)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine: final lr as a share of lr")
    weight_decay: float = Field(0.0, ge=0, le=1)
    micro_batch: int = Field(16, ge=1, le=65_536, description="sequences per process per forward pass")
    grad_accum: int = Field(1, ge=1, le=65_536, description="micro-batches per optimizer step")
    grad_clip: float = Field(1.0, ge=0, description="max global gradient norm; 0 turns clipping off")
    max_seq_len: int = Field(128, ge=8, le=1 << 20, description="tokens per sequence")
    eval_every: int = Field(50, ge=0, description="steps between held-out loss measurements; 0: only at the end")
    seed: Seed = 0
    checkpoint_every: int = Field(50, ge=0, description="steps between resumable checkpoints; 0: none")
    keep_checkpoints: int = Field(2, ge=1, description="complete checkpoints kept while training")
    kernels: Literal["auto", "none", "liger", "compile"] = Field(
        "auto", description="auto: liger on a CUDA GPU (when liger-kernel is installed), none on CPU; liger: Liger's "
        "Triton kernels (RoPE, RMSNorm, SwiGLU, and a cross-entropy fused with the output layer that never holds the "
        "logits; CUDA only); compile: torch.compile of the model; none: eager PyTorch")
    activation_checkpointing: bool = Field(
        False, description="keep only each layer's input and recompute the rest in the backward pass: far less "
        "activation memory for about a third more compute")
    deepspeed: DeepSpeedParams = Field(default_factory=DeepSpeedParams)

    @model_validator(mode="after")
    def _warmup_within_steps(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})")
        return self


class ModelParams(Section):
    """A Llama-style decoder built from scratch. The vocabulary is the tokenizer trained on the corpus."""

    vocab_size: int = Field(260, ge=260, le=1_000_000,
                            description="BPE vocabulary trained on the corpus (256 bytes + merges + specials)")
    hidden_size: int = Field(128, ge=8, le=65_536)
    num_layers: int = Field(2, ge=1, le=1_000)
    num_heads: int = Field(4, ge=1, le=1_024)
    num_kv_heads: int | None = Field(None, ge=1, description="grouped-query attention; null: as num_heads")
    intermediate_size: int = Field(384, ge=1, le=262_144)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        return self


class PretrainParams(TrainRunParams):
    """train@pretrain: tokenizer and model from scratch on the corpus (the demo), or the named base model fetched,
    and optionally pretrained further on the corpus."""

    steps: int = Field(900, ge=1, le=MAX_STEPS)
    lr: float = Field(3e-3, gt=0, le=MAX_LR)
    model: ModelParams = Field(default_factory=ModelParams)
    continue_pretraining: bool = Field(
        False, description="with a named train.finetune.base_model: continue its pretraining on data.corpus (every "
        "weight, the loss on every token; its own tokenizer, `model` ignored) before fine-tuning, to adapt it to a "
        "domain; false: fetch it as it is")


class FinetuneParams(TrainRunParams):
    """train@finetune: a peft adapter on a base model, trained on the instruction data (response tokens only)."""

    steps: int = Field(1800, ge=1, le=MAX_STEPS)
    lr: float = Field(4e-3, gt=0, le=MAX_LR)
    base_model: str = Field(
        "pretrain", description="what is fine-tuned: a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct), a local Hugging Face "
        "model directory, or 'pretrain' (the demo: a small model pretrained here from scratch on the corpus). A named "
        "base is fetched once by train@pretrain into models/pretrain, where DVC versions it; nothing is pretrained",
        json_schema_extra=read_by("train"))
    revision: str | None = Field(
        None, min_length=1, description="the hub revision of base_model: a commit sha pins it; a branch or tag (null: "
        "the default branch) is resolved to its commit when fetched, and the commit is recorded in the lineage")
    chat_template: str | None = Field(
        None, min_length=1, description="a chat template (Jinja text, or a path to a .jinja file) for a base whose "
        "tokenizer has none, or to replace its own; null: the base's. Training, evaluation and serving render with it",
        json_schema_extra=read_by("train"))
    method: str = Field("lora", description=f"one of: {', '.join(METHODS)}")
    lora: LoraParams = Field(default_factory=LoraParams)
    prompt_tuning: PromptTuningParams = Field(default_factory=PromptTuningParams)
    adapter: str | None = Field(None, description="start from this saved adapter directory instead of a new one",
                                json_schema_extra=read_by("train"))
    merge: bool = Field(False, description="also write the base model with the adapter merged in (LoRA)")
    prompt_overflow: Literal["truncate", "drop", "refuse"] = Field(
        "refuse", description="examples longer than max_seq_len (counted in the base's tokens before training): "
        "truncate (cut the conversation's start; its final answer must fit), drop (leave them out), or refuse (stop, "
        "naming the first); how many there are is printed either way")
    max_seq_len: int | None = Field(
        None, ge=8, le=1 << 20, description="tokens per sequence; null: the base's context (its "
        "max_position_embeddings), at most 2048")
    packing: bool = Field(True, description="pack several examples into each sequence of max_seq_len, with "
                          "attention that cannot cross from one to the next; false: one example per sequence, padded")
    qlora: bool = Field(False, description="QLoRA: hold the frozen base in 4-bit NF4 (bitsandbytes) and train the "
                        "LoRA adapter on it in bf16; needs a CUDA GPU, method lora and deepspeed.precision bf16")

    @field_validator("method")
    @classmethod
    def _registered(cls, value):
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r}; registered: {', '.join(METHODS)}")
        return value

    @model_validator(mode="after")
    def _merge_needs_lora(self):
        if self.merge and self.method != "lora":
            raise ValueError(f"merge needs method 'lora' (a {self.method} adapter has no weights to merge)")
        if self.qlora and self.method != "lora":
            raise ValueError(f"qlora needs method 'lora' (got {self.method!r})")
        if self.qlora and self.deepspeed.precision != "bf16":
            raise ValueError("qlora needs deepspeed.precision: bf16 (the 4-bit base computes in bf16)")
        return self

    @property
    def method_params(self) -> BaseModel:
        return getattr(self, self.method)


class TrainParams(Section):
    """The two modes of the train stage (dvc.yaml runs them as train@pretrain and train@finetune)."""

    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)

    @model_validator(mode="after")
    def _continue_a_named_base(self):
        if self.pretrain.continue_pretraining and self.finetune.base_model == "pretrain":
            raise ValueError(".pretrain.continue_pretraining: needs a named train.finetune.base_model (a hub id or a "
                             "directory) to continue; base_model 'pretrain' is pretrained from scratch anyway")
        return self


class EvaluateParams(Section):
    """evaluate: held-out perplexity and the answer metrics of greedy answers, base vs fine-tuned."""

    metrics: list[Literal["exact_match", "numeric", "chrf"]] = Field(
        default_factory=lambda: ["exact_match"], min_length=1,
        description="answer metrics, the first the headline the gate judges: exact_match (normalised), numeric (the "
        "final number, GSM8K's #### N), chrf (character n-gram F-score, for free text)")
    max_examples: int | None = Field(None, ge=1, description="first N eval examples; null: all")
    max_new_tokens: int = Field(24, ge=1, description="generation budget per answer")
    batch_size: int = Field(32, ge=1)
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000, description="for the perplexity interval")
    seed: Seed = 0
    harness_tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks scored on base and fine-tuned: a task YAML file "
        "(lm-eval's format, its data a local file) or a task of lm-eval's registry (its data from the dataset hub)",
        json_schema_extra=read_by("evaluate"))

    @field_validator("metrics")
    @classmethod
    def _unique(cls, value):
        return _listed_once(value, "metric")

    @field_validator("harness_tasks")
    @classmethod
    def _unique_tasks(cls, value):
        return _listed_once(value, "task")


class AuditBiasParams(Section):
    """audit_bias: paired log-likelihood audit (CrowS-Pairs format) of the base and the fine-tuned model."""

    data: str | None = Field(None, description="CrowS-Pairs-format CSV/JSONL, local path or s3:// URI; "
                             "null: generated counterfactual pairs", json_schema_extra=read_by("audit_bias"))
    pairs_per_type: int = Field(50, ge=1, le=10_000, description="generated pairs per bias type (data: null)")
    max_pairs: int | None = Field(None, ge=1, description="first N pairs of the file; null: all")
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000)
    seed: Seed = 0
    batch_size: int = Field(32, ge=1)


QuantMethod = Literal["int8_weight_only", "nf4", "int4_weight_only", "fp8"]


class QuantizeParams(Section):
    """quantize: weight quantization of the fine-tuned model (LoRA merged into its base), each method vs unquantized."""

    methods: list[QuantMethod] = Field(default_factory=lambda: ["int8_weight_only", "nf4"],
                                       description="[] quantizes nothing (e.g. for a prompt_tuning adapter)")
    max_examples: int | None = Field(None, ge=1, description="first N eval examples for perplexity and exact match")
    batch_size: int = Field(32, ge=1)
    latency_new_tokens: int = Field(32, ge=1, le=4096, description="tokens generated per latency measurement")
    latency_repeats: int = Field(3, ge=1, le=100, description="timed repeats per batch size (the median is kept)")

    @field_validator("methods")
    @classmethod
    def _unique(cls, value):
        return _listed_once(value, "method")


class GateParams(Section):
    """gate: the release checks; every one must pass for the run to go on (push, register, deploy)."""

    min_score: float = Field(0.4, ge=0, le=1, description="the fine-tuned model's headline metric (the first of "
                             "evaluate.metrics) on the eval split")
    min_gain_over_base: float = Field(0.1, ge=-1, le=1, description="fine-tuned minus base, headline metric")
    min_gain_over_baseline: float = Field(0.05, ge=-1, le=1,
                                          description="fine-tuned minus most-frequent-answer baseline, headline metric")
    max_regression: float = Field(0.05, ge=0, le=1, description="how much lower than the base's each other metric "
                                  "of evaluate.metrics may be, and each share-valued (0-1) metric of "
                                  "evaluate.harness_tasks")
    max_perplexity: float = Field(1000.0, ge=1, description="fine-tuned perplexity on the eval split")
    max_stereotype_deviation: float = Field(25.0, ge=0, le=50, description="|pct_stereotype - 50|, fine-tuned")
    max_stereotype_deviation_per_type: float = Field(
        25.0, ge=0, le=50, description="each bias type's: the distance from 50 of the nearest point of its Wilson "
        "interval, at a family-wise 95% over the types (Bonferroni), fine-tuned: a type whose whole interval lies "
        "further from 50 fails")
    max_stereotype_increase: float = Field(10.0, ge=-50, le=50,
                                           description="increase of |pct_stereotype - 50| over the base, in points")
    release_candidate: str = Field("int8_weight_only", description="a quantize.methods entry, or none (unquantized)")
    max_quantized_exact_match_drop: float = Field(0.05, ge=0, le=1)
    max_quantized_perplexity_increase: float = Field(0.1, ge=0, description="relative, e.g. 0.1 = 10%")


class RegistryParams(Section):
    """registry: where the model registry's git tags are shared."""

    git_remote: str | None = Field(None, description="a git remote (e.g. origin) that registry changes are pushed to "
                                                      "and read from; null: this clone's tags only")


class GovernanceParams(Section):
    """governance: the audit trail (`llmops trail`), who may do what (llmops/governance/access.py), the inputs' licences."""

    policy: str = Field("governance/policy.csv", min_length=1,
                        description="the access policy (casbin CSV: roles' permissions, identities' roles)")
    default_role: str = Field("admin", min_length=1, description="the role of an identity the policy does not name")
    default_key_role: str = Field("caller", min_length=1,
                                  description="the role of an API key the policy does not name")

    intended_use: str = Field(
        "Short instruction prompts like its training data (arithmetic, letters, units); a pipeline demo.",
        min_length=1, description="the model card's intended use")
    limitations: str = Field(
        "A tiny model trained on generated data, often wrong outside its tasks; not for decisions about people.",
        min_length=1, description="the model card's known limits and uses to avoid")
    data_licence: str | None = Field(None, min_length=1, description="the SPDX id of your data's licence "
                                     "(data.instructions, eval_instructions, corpus); null: NOASSERTION for data of "
                                     "yours, CC0-1.0 for the embedded sample")
    base_model_licence: str | None = Field(
        None, min_length=1, description="the SPDX id of train.finetune.base_model's licence; null: its model card's "
        "`license:` ('pretrain': data.corpus's licence)")
    audit_lock_days: int = Field(0, ge=0, description="S3 only: write each audit record under S3 Object Lock "
                                 "(compliance mode) for this many days, so nobody can delete or overwrite it (the "
                                 "bucket must have Object Lock enabled); 0: off")


class VllmParams(Section):
    """deploy.vllm: the cluster manifests `deploy.target: vllm` writes (llmops/serving/vllm_manifests.py)."""

    format: Literal["kserve", "kubernetes"] = Field(
        "kserve", description="kserve: an InferenceService (canary traffic through canaryTrafficPercent); kubernetes: "
                              "a Deployment and a Service")
    image: str = Field("vllm/vllm-openai:v0.11.0", min_length=1, description="vLLM's OpenAI-compatible server image")
    fetch_image: str = Field("python:3.11-slim", min_length=1,
                             description="the init container that `dvc get`s the models from the registry")
    name: str = Field("llmops-model", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$",
                      description="the objects' name (a DNS-1123 label)")
    namespace: str | None = None
    replicas: int = Field(1, ge=1)
    gpus: int = Field(1, ge=1, description="nvidia.com/gpu per replica")
    api_key_secret: str = Field("llmops-api-key", min_length=1,
                                description="a Secret whose key `api-key` vLLM takes as its API key")
    storage_secret: str = Field("llmops-storage", min_length=1,
                                description="a Secret of AWS_* variables for the DVC remote (S3)")
    kubernetes_version: str = Field("1.33.0", description="the Kubernetes schemas the manifests are validated against")
    out: str = Field("deployments/vllm", min_length=1, description="where the manifest is written")


class DeployParams(Section):
    """deploy: after register, the version goes to staging, passes a smoke request, then production (served)."""

    target: Literal["local", "vllm", "none"] = Field(
        "local", description="local: a server process on this machine that keeps running after the run "
                             "(`llmops serve status|stop`); vllm: Kubernetes manifests for vLLM on a GPU cluster "
                             "(deploy.vllm); none: register only")
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=1, le=65535, description="the production server's port")
    max_concurrency: int = Field(16, ge=1, description="requests generated together (continuous batching)")
    smoke_prompt: str = Field("What number comes after 250?", min_length=1,
                              description="the chat request the candidate must answer before it is promoted")
    smoke_expect: str | None = Field(None, description="text the smoke answer must contain; null: any non-empty answer")
    smoke_max_tokens: int = Field(24, ge=1)
    timeout_s: float = Field(300, gt=0, description="for a server to load its model and answer")
    allowed_licences: list[str] = Field(
        default_factory=lambda: ["CC0-1.0", "MIT", "Apache-2.0", "BSD-3-Clause", "CC-BY-4.0"],
        description="the licences (SPDX ids) a registered or production model may be built on: data and base model")
    privacy: Literal["mask", "refuse", "log"] = Field(
        "mask", description="personal data (validate_data.pii) in prompts and answers: mask (the model and the caller "
        "see [EMAIL], [PHONE], ...), refuse (a prompt holding some gets a 400), log (passed unchanged); the request log "
        "is masked whatever the mode")
    require_approval: bool = Field(
        False, description="pause before production until a person approves (the Prefect UI's Resume form, or "
                           "`llmops approve RUN`); a rejection or no answer in approval_timeout_s ends the run")
    approval_timeout_s: float = Field(86_400, gt=0, description="how long a paused run waits for a decision")
    adapters: bool = Field(
        False, description="the production server holds the base once and also serves the LoRA adapter of every "
        "registered version built on it (asked for as model@vN), loading new ones as they are registered")
    max_adapters: int = Field(8, ge=1, description="adapters served at once: the stage holders, then the newest")
    watch_s: float = Field(30, ge=0, description="how often a server of adapters looks for registry changes; "
                                                 "0: only on `llmops serve reload`")
    cache_entries: int = Field(1024, ge=0, description="greedy answers the server's response cache keeps (the same "
                               "model, prompt, max_tokens and stop strings are answered from it); 0: no cache")
    cache_ttl_s: float = Field(600, gt=0, description="how long a cached answer is served")
    read_timeout_s: float = Field(30, gt=0, description="a request's head and body must arrive within this long of "
                                  "its connection opening (or of its first byte, on a kept-alive connection); slower "
                                  "clients are disconnected")
    canary_min_requests: int = Field(20, ge=1, description="recent requests each of the canary and production "
                                     "need before the server judges the canary")
    canary_max_error_rate_increase: float = Field(0.05, ge=0, le=1, description="the canary is dropped when its "
                                                  "share of 5xx answers exceeds production's by more than this")
    canary_max_latency_ratio: float = Field(1.5, gt=0, description="the canary is dropped when its median latency "
                                            "is over this many times production's")
    vllm: VllmParams = Field(default_factory=VllmParams)


class ReplicaClass(Section):
    """route.classes.<name>: what every replica of the class must be; each replica's /health says what it is."""

    hardware: Literal["cpu", "cuda"]
    variant: str | None = Field(None, min_length=1, description="its weights: a dtype (bfloat16, float32) or a "
                                "quantization method (int8_weight_only); null: any")


class Replica(Section):
    """route.replicas[]: an `llmops serve` (or any server with our /health) behind the router."""

    url: str = Field(pattern=r"^https?://[^/\s]+/?$", description="its base URL, e.g. http://10.0.0.5:8000")
    class_: str = Field(alias="class", title="class", min_length=1, description="its class in route.classes")
    name: str | None = Field(None, min_length=1, description="default: host:port")

    # `class` is a Python keyword: the field is class_, params.yaml and the UI's form say class
    model_config = ConfigDict(**Section.model_config, populate_by_name=True, serialize_by_alias=True)

    @property
    def label(self) -> str:
        return self.name or self.url.split("://", 1)[1].rstrip("/")


class RoutePolicy(Section):
    """route.policy: the classes each kind of request tries, in order (the next when none of a class fits or has
    room: overflow); within a class, the least loaded replica."""

    latency: list[str] = Field(default_factory=lambda: ["gpu-bf16", "cpu"], min_length=1,
                               description="latency-sensitive requests (streamed, or X-LLMOps-Priority: latency)")
    default: list[str] = Field(default_factory=lambda: ["cpu", "gpu-bf16"], min_length=1,
                               description="every other request")


class RouteParams(Section):
    """route: `llmops route`, one OpenAI-compatible endpoint in front of several servers (llmops/serving/router.py)."""

    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8080, ge=1, le=65535)
    classes: dict[str, ReplicaClass] = Field(
        default_factory=lambda: {"gpu-bf16": ReplicaClass(hardware="cuda", variant="bfloat16"),
                                 "cpu": ReplicaClass(hardware="cpu")},
        description="replica classes by name: the hardware (and variant) a replica of the class must report")
    replicas: list[Replica] = Field(default_factory=list)
    policy: RoutePolicy = Field(default_factory=RoutePolicy)
    tokenizer: str | None = Field(None, description="counts a prompt's tokens (against each replica's context); null: "
                                  "production's release, as its servers load it")
    health_interval_s: float = Field(1.0, gt=0, description="how often each replica's /health is read")
    health_timeout_s: float = Field(2.0, gt=0, description="a replica that does not answer /health in this long is "
                                    "down until it does")
    retries: int = Field(2, ge=0, description="other replicas a failed request is sent to (one that never reached a "
                         "replica, or a generation whose replica failed before answering)")
    timeout_s: float = Field(600, gt=0, description="for a replica's whole answer")
    read_timeout_s: float = Field(30, gt=0, description="a request's head and body must arrive within this long of "
                                  "its connection opening (or of its first byte, on a kept-alive connection); slower "
                                  "clients are disconnected")

    @model_validator(mode="after")
    def _known_classes(self):
        problems = [f".replicas[{i}].class: {r.class_!r} is not one of route.classes ({', '.join(self.classes)})"
                    for i, r in enumerate(self.replicas) if r.class_ not in self.classes]
        problems += [f".policy.{kind}: {name!r} is not one of route.classes ({', '.join(self.classes)})"
                     for kind in ("latency", "default") for name in getattr(self.policy, kind)
                     if name not in self.classes]
        labels = [r.label for r in self.replicas]
        problems += [f".replicas: {label!r} is listed twice" for label in sorted(set(labels)) if labels.count(label) > 1]
        if problems:
            raise ValueError("; ".join(problems))
        return self


class OrchestrationParams(Section):
    """orchestration: how the runs that Prefect starts (UI, schedule, git push) share this machine's devices."""

    concurrency_limit: str | None = Field(
        "llmops-training", min_length=1,
        description="a Prefect global concurrency limit of one slot (`llmops setup` creates it) that every pipeline "
                    "run holds while it builds: runs naming the same limit never train together; null: no limit")
    on_busy: Literal["wait", "skip"] = Field(
        "wait", description="when another run holds the limit: wait for it, or skip this run (cancelled, saying why)")
    wait_timeout_s: float | None = Field(None, gt=0, description="wait at most this long, then fail; null: no limit")


class ConsistencyParams(Section):
    """Self-consistency of answers no checker can verify: the same prompt asked `samples` times, sampled."""

    requests: int = Field(20, ge=0, le=10_000, description="requests of the window re-asked; 0: none")
    samples: int = Field(5, ge=2, le=64, description="k: sampled answers per request")
    temperature: float = Field(0.8, gt=0, le=2)
    max_tokens: int = Field(32, ge=1, le=4096)


class HarmfulParams(Section):
    """Harmful-content detectors applied to every prompt and answer of the window."""

    detectors: list[str] = Field(default_factory=lambda: ["wordlist"],
                                 description="wordlist (glin-profanity's maintained lists) and/or classifier")
    classifier: str | None = Field(None, description="a local text-classification model directory (e.g. a toxicity "
                                   "model you downloaded); required by the classifier detector")
    classifier_labels: list[str] = Field(default_factory=lambda: ["toxic"],
                                         description="the classifier's labels that mean harmful")
    classifier_threshold: float = Field(0.5, gt=0, lt=1)

    @model_validator(mode="after")
    def _classifier_named(self):
        if "classifier" in self.detectors and not self.classifier:
            raise ValueError("the classifier detector needs classifier: a local model directory")
        return self


class FairnessParams(Section):
    """Counterfactual probes to the live endpoint: each audit template with its two group terms swapped."""

    pairs_per_type: int = Field(4, ge=0, le=1_000, description="probe pairs per bias type; 0: none")
    prompt: str = Field("{sentence} Is that true?", description="what is asked; {sentence} is the audit's sentence")
    max_tokens: int = Field(16, ge=1, le=4096)
    seed: Seed = 0

    @field_validator("prompt")
    @classmethod
    def _has_sentence(cls, value):
        if "{sentence}" not in value:
            raise ValueError("must contain {sentence}")
        return value


class AlertParams(Section):
    """Thresholds on the window's figures: a breach is recorded and notified."""

    max_drift_share: float = Field(0.5, ge=0, le=1, description="share of monitored columns that drifted")
    max_empty_rate: float = Field(0.05, ge=0, le=1, description="empty answers")
    max_truncated_rate: float = Field(0.5, ge=0, le=1, description="answers cut by max_tokens")
    max_refusal_rate: float = Field(0.2, ge=0, le=1)
    max_wrong_rate: float = Field(0.5, ge=0, le=1, description="wrong answers among the checkable ones")
    max_harmful_rate: float = Field(0.01, ge=0, le=1, description="prompts or answers a detector flags")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="requests answered with a 4xx or 5xx")
    max_p95_latency_ms: float = Field(10_000, gt=0)
    min_mean_rating: float = Field(2.5, ge=1, le=5, description="mean user rating (1-5) of the rated answers")
    notify: str | None = Field(None, description="a Prefect notification block as type/name (custom-webhook/oncall, "
                               "slack-webhook/ml-team, sendgrid-email/...); null: alerts are recorded, not sent")


class RetrainParams(Section):
    """When the monitor starts the pipeline on a new dataset version (accepted corrections joined to the data)."""

    on_drift_share: float = Field(0.5, ge=0, le=1, description="retrain when this share of columns drifted")
    on_wrong_rate: float = Field(0.5, ge=0, le=1, description="... or this share of checkable answers is wrong")
    min_corrections: int = Field(20, ge=1, description="... or this many accepted corrections are not in the data")
    deployment: str = Field("build-model/on-push", description="the deployment started (as a git push starts it)")


class DriftParams(Section):
    """Evidently's drift methods, pinned (its default switches method at 1000 reference rows)."""

    numerical: Literal["ks", "wasserstein", "psi", "jensenshannon", "kl_div"] = Field(
        "ks", description="for lengths, word counts, the out-of-vocabulary share: ks is a test (a p-value) and does "
                          "not cry drift on a small window; wasserstein or psi (distances) suit large windows")
    categorical: Literal["chisquare", "jensenshannon", "psi", "kl_div"] = Field(
        "chisquare", description="for the task mix and PII hits: chisquare is a test (a p-value)")
    numerical_threshold: float | None = Field(None, gt=0, description="null: the method's own (0.05 for a p-value, "
                                              "0.1 for a distance)")
    categorical_threshold: float | None = Field(None, gt=0)


class MonitorParams(Section):
    """monitor: the deployed model's traffic in a window against a reference, in an Evidently report."""

    window_hours: float = Field(24, gt=0, le=24 * 366, description="the window ends when the monitor runs")
    reference: Literal["data", "previous"] = Field(
        "data", description="data: the prepared train/eval prompts and the eval answers of the served version's "
                            "evaluation; previous: the window before this one")
    request_log: str | None = Field(None, description="the servers' request log: a directory or an s3:// prefix "
                                    "of day partitions; null: this project's (.llmops/serve/requests)")
    min_requests: int = Field(1, ge=1, description="fewer requests in the window: no report, said so")
    drift: DriftParams = Field(default_factory=DriftParams)
    checkers: list[str] = Field(default_factory=lambda: ["sample_tasks"], description="verifiable-answer checkers: "
                                "built-in sample_tasks, or your own as module:function (prompt -> (task, answer))")
    refusals: list[str] = Field(default_factory=lambda: ["I cannot", "I can't", "I'm sorry", "As an AI"],
                                description="phrases that make an answer a refusal (case-insensitive)")
    flag_rating: int = Field(2, ge=1, le=5, description="a rating at or below this flags the answer for review")
    consistency: ConsistencyParams = Field(default_factory=ConsistencyParams)
    harmful: HarmfulParams = Field(default_factory=HarmfulParams)
    fairness: FairnessParams = Field(default_factory=FairnessParams)
    alerts: AlertParams = Field(default_factory=AlertParams)
    retrain: RetrainParams = Field(default_factory=RetrainParams)


class Params(Section):
    """Everything in params.yaml: one section per stage, plus storage, the registry, the deploy target and how
    Prefect's runs share the machine."""

    @field_validator("gate")
    @classmethod
    def _candidate_is_quantized(cls, gate, info: ValidationInfo):
        quantize = info.data.get("quantize")
        if quantize is not None and gate.release_candidate not in ("none", *quantize.methods):
            raise ValueError(f".release_candidate: {gate.release_candidate!r} is not one of quantize.methods "
                             f"({', '.join(quantize.methods)}) nor 'none'")
        return gate

    data: DataParams = Field(default_factory=DataParams)
    validate_data: ValidateDataParams = Field(default_factory=ValidateDataParams)
    train: TrainParams = Field(default_factory=TrainParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    audit_bias: AuditBiasParams = Field(default_factory=AuditBiasParams)
    quantize: QuantizeParams = Field(default_factory=QuantizeParams)
    gate: GateParams = Field(default_factory=GateParams)
    storage: StorageParams = Field(default_factory=StorageParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    deploy: DeployParams = Field(default_factory=DeployParams)
    route: RouteParams = Field(default_factory=RouteParams)
    orchestration: OrchestrationParams = Field(default_factory=OrchestrationParams)
    monitor: MonitorParams = Field(default_factory=MonitorParams)
    governance: GovernanceParams = Field(default_factory=GovernanceParams)


# Environment variables that point storage elsewhere without editing params.yaml
# (a CI runner or a Prefect worker with its own bucket).
STORAGE_ENV = {
    "LLMOPS_S3_BUCKET": "bucket",
    "LLMOPS_S3_PREFIX": "prefix",
    "LLMOPS_S3_ENDPOINT_URL": "endpoint_url",
    "LLMOPS_S3_REGION": "region",
}


def _yaml() -> YAML:
    yaml = YAML()  # round-trip: keeps comments when we write params back
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap a long line: a rewrite changes only the values overridden
    # a value set to None is written `null`, as the file spells it (ruamel's default is an empty value)
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _read_yaml(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a YAML file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not valid UTF-8 (save the file as UTF-8)") from None
    try:
        return _yaml().load(text)
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}malformed YAML: {getattr(exc, 'problem', exc)}") from None


def parse_override(text: str) -> tuple[str, Any]:
    """Split `a.b=value` into the dotted key and the value parsed as a YAML scalar (as `dvc exp run -S`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"-S {text}: expected KEY=VALUE with a dotted key, e.g. data.num_examples=500")
    try:
        value = YAML(typ="safe").load(raw) if raw.strip() else raw
    except YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"-S {key}: {'.'.join(parents[: i + 1])} is a value, not a section")
        node = child
    node[leaf] = value


def _plain(node: Any) -> Any:
    if isinstance(node, dict):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_plain(v) for v in node]
    return node


def _near(loc: tuple) -> str:
    """'; did you mean KEY?' for an unknown key at `loc` a typo away from a key its section takes."""
    model = Params
    for part in loc[:-1]:  # a list's index or a mapping's key is not a field: its items are of the same model
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:  # the model the field is or holds: X, X | None, list[X], dict[str, X]
            model = next((t for t in (field.annotation, *get_args(field.annotation))
                          if isinstance(t, type) and issubclass(t, BaseModel)), None)
            if model is None:
                return ""
    close = difflib.get_close_matches(str(loc[-1]), [f.alias or n for n, f in model.model_fields.items()], n=1)
    return f"; did you mean {'.'.join(map(str, (*loc[:-1], close[0])))}?" if close else ""


def _format_errors(exc: ValidationError, source: str, overridden: set[str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = "-S" if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overridden) else source
        msg = err["msg"].removeprefix("Value error, ")
        if msg.startswith("."):  # a section's validator naming one of its keys: ".key: message"
            sub, _, msg = msg[1:].partition(": ")
            key += "." + sub
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (renamed {RENAMED[key]})" if key in RENAMED else "unknown key" + _near(err["loc"])
        elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
            msg += f" (got {err['input']!r})"
        lines.append(f"-S {key}: {msg}" if where == "-S" else f"{where}: {key}: {msg}")
    return "\n".join(lines)


def load_params(path: str | os.PathLike = PARAMS_FILE, overrides: Iterable[str] = ()) -> Params:
    """Read params.yaml, apply dotted overrides and validate the result.

    Args:
        path: the params file.
        overrides: `dotted.key=value` strings, as given to `-S`.

    Returns:
        The validated parameters.

    Raises:
        ConfigError: one line per problem, naming the file (or -S) and the dotted key.
    """
    path = Path(path)
    tree = _plain(_read_yaml(path)) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return _with_overrides(tree, overrides, str(path))


def _with_overrides(tree: dict, overrides: Iterable[str], source: str) -> Params:
    """The params of `tree` with the dotted overrides set, validated; errors name `source` or -S."""
    keys = set()
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        keys.add(key)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source, keys)) from None


def overlay(path: str | os.PathLike, config: str | os.PathLike, overrides: Iterable[str] = ()) -> Params:
    """The params of `path` with every value that `config` (a whole or partial params file, such as one of
    configs/) sets laid over them, then the overrides; checked as load_params checks.

    Raises:
        ConfigError: as load_params, naming `config` for its keys.
    """
    def merged(under: Any, over: Any) -> Any:
        if isinstance(under, dict) and isinstance(over, dict):
            return {**under, **{k: merged(under.get(k), v) for k, v in over.items()}}
        return over

    tree = _plain(_read_yaml(Path(path))) or {}
    layer = _plain(_read_yaml(Path(config))) or {}
    if not isinstance(layer, dict):
        raise ConfigError(f"{config}: expected a mapping of sections at the top level")
    try:
        Params.model_validate(merged(Params().model_dump(mode="json", by_alias=True), layer))
    except ValidationError as exc:  # the config's own mistakes, named as its own
        raise ConfigError(_format_errors(exc, str(config), set())) from None
    return _with_overrides(merged(tree, layer), overrides, f"{path} with {config}")


def storage_for(storage: StorageParams, root: str | os.PathLike) -> StorageParams:
    """The storage a run in project `root` uses: LLMOPS_S3_* applied, and a local remote of its own.

    One default local remote per project (named after the repository's first commit, which
    every clone shares), so `dvc gc -c` in one project never deletes another's data.
    """
    storage = storage_from_env(storage)
    if storage.local_dir is not None:
        return storage
    return storage.model_copy(update={"local_dir": f"~/.cache/llmops/dvc-remote/{project_id(root)}"})


def project_id(root: str | os.PathLike) -> str:
    """The repository's first commit: the same in every clone, wherever it lies, different between projects.

    Outside git, a hash of the directory's path.
    """
    import hashlib

    root = Path(root).resolve()
    from llmops.core import git

    roots = (git.answer(root, "rev-list", "--max-parents=0", "HEAD", timeout=30) or "").split()
    first = roots[-1][:12] if roots else None
    return first or "path-" + hashlib.sha256(str(root).encode()).hexdigest()[:12]


def storage_from_env(storage: StorageParams, environ: dict[str, str] | None = None) -> StorageParams:
    """Storage with the LLMOPS_S3_* environment variables applied; a bucket switches the remote to S3."""
    environ = os.environ if environ is None else environ
    update = {field: environ[var] for var, field in STORAGE_ENV.items() if environ.get(var)}
    if "bucket" in update:
        update["remote"] = "s3"
    if not update:
        return storage
    try:
        return StorageParams.model_validate(storage.model_dump() | update)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "environment", set()).replace("environment: ", "environment: storage.")) from None


def write_params(path: str | os.PathLike, params: Params) -> list[str]:
    """Write the values of `params` that differ from the params file into it, and nothing else.

    Used when a flow run is given parameters (from the UI or the CLI's -S): like
    `dvc exp run -S`, the values land in params.yaml so dvc.lock records them.
    Comments, layout and every untouched line stay as they are, so `git diff params.yaml`
    shows exactly the changed keys.

    Returns:
        The dotted keys that changed (empty: the file was left alone).
    """
    path = Path(path)
    doc = _read_yaml(path) if path.exists() else None
    if doc is None:
        doc = CommentedMap()
    try:
        current = Params.model_validate(_plain(doc)).model_dump(mode="json")
    except ValidationError:
        current = {}
    changed = _changed_leaves(current, params.model_dump(mode="json"))
    for key, value in changed.items():
        _set_node(doc, key, value)
    if changed:
        buf = io.StringIO()
        _yaml().dump(doc, buf)
        write_text(path, buf.getvalue())
    return sorted(changed)


def changes(old: Params, new: Params) -> dict[str, Any]:
    """Dotted key -> value of `new` for every value that differs from `old`."""
    return _changed_leaves(old.model_dump(mode="json"), new.model_dump(mode="json"))


def with_changes(params: Params, changed: dict[str, Any]) -> Params:
    """`params` with the dotted keys of `changed` set (checked by the schema, as -S overrides are)."""
    tree = params.model_dump(mode="json")
    for key, value in changed.items():
        _set_dotted(tree, key, value)
    try:
        return Params.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, "params.yaml with the run's changes", set())) from None


def _changed_leaves(old: Any, new: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> new value for every leaf (scalar or list) of `new` that differs from `old`."""
    out: dict[str, Any] = {}
    for key, value in new.items():
        dotted = f"{prefix}{key}"
        before = old.get(key) if isinstance(old, dict) else None
        if isinstance(value, dict):
            out |= _changed_leaves(before, value, dotted + ".")
        elif not isinstance(old, dict) or key not in old or before != value:
            out[dotted] = value
    return out


def _set_node(doc: CommentedMap, key: str, value: Any) -> None:
    """Set one dotted key in the round-trip document, creating sections as needed; lists keep their style."""
    *parents, leaf = key.split(".")
    node = doc
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = CommentedMap()
        node = node[part]
    if isinstance(value, list):
        seq = CommentedSeq(value)
        old = node.get(leaf)
        if not isinstance(old, CommentedSeq) or old.fa.flow_style():
            seq.fa.set_flow_style()
        value = seq
    node[leaf] = value
