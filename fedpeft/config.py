"""The run configuration schema (pydantic): sections, keys, defaults and value checks.

This is the platform's core: it knows nothing of methods. Recipe loading, which also checks the
method's options and declared capabilities, is `fedpeft.app.recipe`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedpeft.config_sources import data_source, model_source
from fedpeft.tracking.options import MlflowOptions, WandbOptions
from fedpeft.tracking.registry import check_names


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """A small model built from a transformers config (random weights, for tests and quick trials)."""

    arch: Literal["bert", "llama", "gpt2"] = Field("bert", description="architecture of the tiny model")
    hidden_size: int = Field(32, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(64, gt=0)


class ModelConfig(_Section):
    """Which frozen base model to fine-tune, and as what: a sequence classifier or a causal LM."""

    kind: Literal["classifier", "causal-lm"] = Field(
        "classifier", description="classifier: text -> label; causal-lm: instruction -> generated response")
    source: Literal["auto", "embedded", "local", "hub", "gguf", "tiny"] = Field(
        "auto", description="auto = embedded without a path; with one: gguf (a .gguf file), local (a folder) or hub")
    embedded: Literal["auto", "minilm", "smollm2"] = Field(
        "auto", description="source=embedded: which packaged model; auto = MiniLM-L6 for classifier, "
        "SmolLM2-135M-Instruct for causal-lm")
    path: str = Field("", description="local directory (source=local), hub id (source=hub) or a .gguf file (source=gguf)")
    max_length: int = Field(48, gt=0, le=4096, description="tokens per example (prompt + response for causal-lm)")
    tiny: TinyModelConfig = TinyModelConfig()

    @model_validator(mode="after")
    def _resolve_source(self) -> "ModelConfig":
        self.__dict__["source"] = model_source(self.source, self.path)  # no re-validation loop
        return self


class AdapterConfig(BaseModel):
    """A peft adapter: `type` is any peft method name (lora, loha, ...); other keys go to its config."""

    model_config = ConfigDict(extra="allow")
    type: str = "lora"

    def peft_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for the peft config class (everything but `type`)."""
        return dict(self.model_extra or {})


class BuiltinDataConfig(_Section):
    """Size and shape of the built-in task (review classification, or instructions for causal-lm)."""

    num_train: int = Field(8000, gt=0)
    num_test: int = Field(1000, gt=0)
    num_domains: int = Field(3, ge=1, le=3)
    negation_rate: float = Field(0.3, ge=0.0, le=1.0)
    task: Literal["skills", "words"] = Field(
        "skills", description="causal-lm: skills = seven transformations with multi-word answers (count, next, "
        "opposites, plurals, reverse, question, review); words = six one-word-answer questions")
    categories: list[str] = Field(default_factory=list, description="causal-lm: the task's categories; [] = all")


class DataConfig(_Section):
    """Where examples come from and which columns hold text and label."""

    source: Literal["auto", "builtin", "file", "hub"] = Field(
        "auto", description="auto = builtin without a path; with one: file (exists or has a data suffix) or hub")
    path: str = Field("", description="file or save_to_disk folder (source=file) or hub dataset id (source=hub)")
    test_path: str = Field("", description="optional separate test file or folder")
    text_column: str = "text"
    label_column: str = "label"
    label_map: dict[str, int] = Field(default_factory=dict, description="raw label -> class index")
    instruction_column: str = Field("", description="causal-lm: '' = instruction / prompt / question")
    input_column: str = Field("", description="causal-lm: optional context; '' = input / context if present")
    output_column: str = Field("", description="causal-lm: '' = output / response / answer / completion")
    template: Literal["auto", "alpaca", "chat"] = Field(
        "auto", description="causal-lm prompt: the tokenizer's chat template if it has one (auto), or Alpaca's")
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_test_examples: int = Field(2000, gt=0)
    builtin: BuiltinDataConfig = BuiltinDataConfig()

    @model_validator(mode="after")
    def _resolve_source(self) -> "DataConfig":
        self.__dict__["source"] = data_source(self.source, self.path)  # no re-validation loop
        return self


class PartitionConfig(_Section):
    """How the training set is split over clients (flwr-datasets partitioners)."""

    type: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, gt=0.0)
    by: str | list[str] = Field("label", description="column the non-IID partitioners skew on; a list: the "
                                "first of its columns the data has (e.g. ['group', 'label'])")
    shards_per_client: int = Field(2, gt=0)
    min_partition_size: int = Field(2, ge=0)


class MethodConfig(BaseModel):
    """The federated method by registered name; other keys are that method's options."""

    model_config = ConfigDict(extra="allow")
    name: str = "fedavg"

    def options(self) -> dict[str, Any]:
        """The method-specific options (everything but `name`)."""
        return dict(self.model_extra or {})


class TrainConfig(_Section):
    """Local training on each sampled client."""

    local_steps: int = Field(10, ge=0, description="optimizer steps per round (used when local_epochs = 0)")
    local_epochs: int = Field(0, ge=0)
    batch_size: int = Field(16, gt=0)
    lr: float = Field(5e-4, gt=0.0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    weight_decay: float = Field(0.0, ge=0.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(0.0, ge=0.0, description="0 disables gradient clipping")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="compute precision of local training, evaluation and generation (weights, adapters, "
        "optimizer state and wire stay fp32); auto = bf16 where the hardware runs it fast")

    @model_validator(mode="after")
    def _some_work(self) -> "TrainConfig":
        if self.local_steps == 0 and self.local_epochs == 0:
            raise ValueError("train.local_steps or train.local_epochs must be > 0")
        return self


class SimConfig(_Section):
    """Simulation size, sampling and Ray resources."""

    num_clients: int = Field(100, gt=0)
    clients_per_round: int = Field(10, gt=0)
    rounds: int = Field(10, ge=0)
    seed: int = 0
    num_cpus: int = Field(0, ge=0, description="CPUs Ray may use; 0 = all")
    cpus_per_client: float = Field(1.0, gt=0.0)
    gpus_per_client: float = Field(0.0, ge=0.0)
    eval_batch_size: int = Field(128, gt=0)
    object_store_mib: int = Field(256, ge=64, description="Ray's object store for a local Ray, in MiB")
    round_timeout_s: float = Field(3600.0, gt=0.0)
    ray_address: str = Field("", description="attach to this running Ray cluster (host:port) instead of starting Ray")
    comm_budget_mib: float = Field(0.0, ge=0.0, description="stop before a round that would exceed this many MiB; "
                                   "0 = none")
    client_retries: int = Field(
        0, ge=0, description="re-run a client whose Ray worker died up to this many times on a fresh worker"
    )
    min_replies: float = Field(1.0, gt=0.0, description="valid replies a round needs: a count (>= 1) or a fraction "
                               "(< 1) of the sampled clients; fewer = a failed round, global model unchanged")
    max_failed_rounds: int = Field(0, ge=0, description="stop the run after this many failed rounds; 0 = never")
    max_reply_mib: float = Field(0.0, ge=0.0, description="reject replies larger than this many MiB; 0 = 4x the "
                                 "round's largest download + 1 MiB")

    @model_validator(mode="after")
    def _sample_fits(self) -> "SimConfig":
        if self.clients_per_round > self.num_clients:
            raise ValueError(
                f"sim.clients_per_round ({self.clients_per_round}) exceeds sim.num_clients ({self.num_clients})"
            )
        if self.min_replies >= 1 and (self.min_replies != int(self.min_replies) or self.min_replies > self.clients_per_round):
            raise ValueError(f"sim.min_replies ({self.min_replies:g}) must be a whole count <= sim.clients_per_round "
                             f"({self.clients_per_round}), or a fraction below 1")
        return self


class UserDPConfig(_Section):
    """User-level DP through Flower's DP strategy wrappers: each client's whole update is clipped, the mean noised."""

    enabled: bool = False
    side: Literal["server", "client", "distributed"] = Field(
        "server", description="who clips each update (client: Flower's mod); distributed: each client clips and "
        "adds its share of the noise before secure aggregation (needs secagg.enabled)")
    clipping: Literal["fixed", "adaptive"] = "fixed"
    noise_multiplier: float | None = Field(None, gt=0.0, description="set this or target_epsilon")
    target_epsilon: float | None = Field(None, gt=0.0, description="noise solved for sim.rounds releases")
    delta: float | None = Field(None, gt=0.0, lt=1.0, description="default 1/(10 sim.num_clients)")
    clipping_norm: float = Field(0.1, gt=0.0, description="bound on each update's L2 norm (adaptive: initial bound)")
    target_quantile: float = Field(
        0.5, ge=0.0, le=1.0, description="adaptive: quantile of update norms the bound tracks (fraction left unclipped)"
    )
    clip_norm_lr: float = Field(0.2, gt=0.0, description="adaptive: learning rate of the bound")
    clipped_count_stddev: float | None = Field(None, gt=0.0, description="adaptive: default clients_per_round/20")
    accountant: Literal["rdp", "prv"] = "rdp"

    @model_validator(mode="after")
    def _one_noise_source(self) -> "UserDPConfig":
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "exactly one of dp.user.noise_multiplier and dp.user.target_epsilon must be set "
                "when dp.user.enabled = true"
            )
        return self


class DPConfig(_Section):
    """Sample-level DP-SGD (Opacus) on each client's adapter parameters; `[dp.user]`: user-level DP."""

    enabled: bool = False
    noise_multiplier: float | None = Field(None, gt=0.0, description="set this or target_epsilon")
    target_epsilon: float | None = Field(None, gt=0.0, description="noise solved per client for the whole run")
    delta: float | None = Field(
        None, gt=0.0, lt=1.0, description="default 1/(10 n_max), n_max = the largest client's example count"
    )
    max_grad_norm: float = Field(1.0, gt=0.0, description="per-sample clipping bound")
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["hooks", "ghost"] = "hooks"
    noise_source: Literal["auto", "seeded", "os"] = Field(
        "auto", description="DP randomness: seeded (reproducible), os (OS entropy, unknown to the server); "
        "auto = seeded under `fedpeft simulate`, os under `flwr run` / `fedpeft deploy`")
    user: UserDPConfig = UserDPConfig()

    @model_validator(mode="after")
    def _one_noise_source(self) -> "DPConfig":
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "exactly one of dp.noise_multiplier and dp.target_epsilon must be set when dp.enabled = true"
            )
        return self


MERGES = ("mean", "sparse-mean", "task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")


class CodecsConfig(_Section):
    """Update codecs: `[delta] [sparsifier] [value coder]` chains for uploads and downloads, and the merge rule."""

    up: list[str] = Field(default_factory=list, description='e.g. ["delta", "topk:0.05", "ternary"]; [] = dense')
    down: list[str] = Field(default_factory=list, description='casts only, e.g. ["fp16"]; [] = dense')
    error_feedback: bool | None = Field(None, description="keep what was not sent per client; default: on with topk")
    merge: Literal[MERGES] = Field("mean", description="how client updates combine (peft merge utilities)")
    merge_density: float = Field(0.5, gt=0.0, le=1.0, description="fraction kept by ties / dare / magnitude_prune")

    @field_validator("up", "down")
    @classmethod
    def _chain_builds(cls, v: list[str], info) -> list[str]:
        from fedpeft.codecs import Chain, CodecSpecError

        try:
            if v:
                Chain(v, direction=info.field_name)
        except CodecSpecError as err:
            raise ValueError(str(err)) from None
        return v

    @property
    def active(self) -> bool:
        """Whether any codec or a non-default merge is configured."""
        return bool(self.up or self.down) or self.merge != "mean"


class FaultsConfig(_Section):
    """Injected faults, drawn from (sim.seed, round, client): identical in every run, simulated or deployed."""

    crash: float = Field(0.0, ge=0.0, le=1.0, description="chance a sampled client's ClientApp raises")
    straggle: float = Field(0.0, ge=0.0, le=1.0, description="chance a sampled client first sleeps straggle_s")
    straggle_s: float = Field(5.0, ge=0.0, description="a straggler's delay (past sim.round_timeout_s: cut)")
    drop: float = Field(0.0, ge=0.0, le=1.0, description="chance a client's reply is lost on its way back")
    malformed: float = Field(0.0, ge=0.0, le=1.0, description="chance a client's reply is corrupted")
    malformed_kind: str = Field("nan", description="how (fedpeft.faults.malformed.KINDS)")
    byzantine_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="fixed seeded set of Byzantine clients")
    attack: Literal["sign_flip", "scale", "noise", "label_flip", "alie"] = "sign_flip"
    attack_scale: float = Field(10.0, gt=0.0, description="sign_flip: -s x update; scale: s x update")
    noise_std: float = Field(1.0, gt=0.0, description="noise: the update replaced by N(0, std^2) values")
    alie_z: float | None = Field(None, description="alie: mean - z std; default from the sampled and Byzantine counts")

    @model_validator(mode="after")
    def _probabilities(self) -> "FaultsConfig":
        total = self.crash + self.straggle + self.drop + self.malformed
        if total > 1.0 + 1e-12:
            raise ValueError(f"faults.crash + straggle + drop + malformed = {total:g} exceeds 1 (one fault per client-round)")
        from fedpeft.faults.malformed import KINDS

        if self.malformed_kind not in KINDS:
            raise ValueError(f"faults.malformed_kind '{self.malformed_kind}' is unknown (known: {', '.join(sorted(KINDS))})")
        return self

    @property
    def active(self) -> bool:
        """Whether any fault or attack is configured."""
        return bool(self.crash or self.straggle or self.drop or self.malformed or self.byzantine_fraction)


class SecAggConfig(_Section):
    """Secure aggregation (SecAgg+, `fedpeft.secagg`): the server learns only the weighted mean of the updates."""

    enabled: bool = False
    threshold: float = Field(0.6, gt=0.0, description="fewest clients a sum may cover (and shares that rebuild a "
                             "secret): a fraction (< 1) of the round's clients, rounded up, or a count")
    num_shares: float | Literal["all"] = Field(
        "all", description="each client's neighbourhood, itself included: 'all' = classic SecAgg, a fraction (< 1) "
        "of the round's clients (rounded up to an odd count), or an odd count")
    clip_range: float = Field(1.0, gt=0.0, description="each value of a client's update is clipped to "
                              "[-clip_range, clip_range] before quantization")
    quantization_bits: int = Field(22, ge=1, le=30, description="2**bits quantization levels over the clip range")
    max_weight: int | None = Field(None, ge=1, description="public bound on a client's weight (its example count) "
                                   "in the secure mean: unset, the largest partition (simulation); required on "
                                   "SuperNodes, where a client above it is refused")

    @model_validator(mode="after")
    def _counts_are_whole(self) -> "SecAggConfig":
        for key in ("threshold", "num_shares"):
            v = getattr(self, key)
            if isinstance(v, float) and v >= 1 and v != int(v):
                raise ValueError(f"secagg.{key} ({v:g}) must be a fraction below 1 or a whole count")
        return self


class EvalConfig(_Section):
    """Held-out evaluation; for causal-lm, how often and how much to generate."""

    generate_every: int = Field(5, ge=0, description="causal-lm: rounds between generation scores; 0 = end only")
    generate_examples: int = Field(64, gt=0, description="causal-lm: held-out prompts generated from (fixed subset)")
    max_new_tokens: int = Field(16, gt=0, description="causal-lm: greedy generation length limit")
    # On for causal-lm by default: 100 built-in questions take 12 s on SmolLM2-135M (one CPU thread),
    # less than its generation of 64 prompts (17 s), on generation rounds only; classifiers never score it.
    multiple_choice: str = Field(
        "builtin", description="causal-lm: questions scored by choice log-likelihood on generation rounds "
        "(mc_accuracy, mc_accuracy_norm): '' = off, 'builtin', or a .jsonl / .csv file")
    multiple_choice_examples: int = Field(100, gt=0, description="causal-lm: multiple-choice questions scored "
                                          "(the first N of the file, or N built-in ones)")


class OutputConfig(_Section):
    """Where the run directory goes, how often the global adapter is checkpointed, which trackers watch the run."""

    dir: str = "runs"
    checkpoint_every: int = Field(1, ge=0, description="rounds between checkpoints; 0 = final only")
    trackers: list[str] = Field(default_factory=list, description="also send each round's metrics to these: "
                                "tensorboard, mlflow, wandb")
    mlflow: MlflowOptions = MlflowOptions()
    wandb: WandbOptions = WandbOptions()

    @field_validator("trackers")
    @classmethod
    def _known_trackers(cls, v: list[str]) -> list[str]:
        return check_names(v)


class Config(_Section):
    """A whole, validated run configuration."""

    name: str = "run"
    model: ModelConfig = ModelConfig()
    # No target_modules: peft picks them per architecture (query/value for BERT, q_proj/v_proj for Llama, ...).
    adapter: AdapterConfig = AdapterConfig(type="lora", r=8, lora_alpha=16)
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    sim: SimConfig = SimConfig()
    dp: DPConfig = DPConfig()
    codecs: CodecsConfig = CodecsConfig()
    eval: EvalConfig = EvalConfig()
    faults: FaultsConfig = FaultsConfig()
    secagg: SecAggConfig = SecAggConfig()
    output: OutputConfig = OutputConfig()

    @model_validator(mode="after")
    def _fits_task_kind(self) -> "Config":
        if self.model.kind == "classifier" and self.model.source == "tiny" and self.model.tiny.arch != "bert":
            raise ValueError(f"model.tiny.arch = '{self.model.tiny.arch}' is a decoder: use it with "
                             "model.kind = 'causal-lm' (tiny classifiers use arch 'bert')")
        if self.model.kind == "causal-lm":
            if self.dp.enabled and self.dp.grad_sample_mode == "ghost":
                raise ValueError("dp.grad_sample_mode = 'ghost' computes a per-example loss from classifier logits; "
                                 "model.kind = 'causal-lm' trains on a response-token loss: use 'hooks'")
            if self.data.label_map:
                raise ValueError("data.label_map maps class labels: it has no use with model.kind = 'causal-lm'")
        attacked = self.faults.byzantine_fraction > 0
        if attacked and self.faults.attack == "label_flip" and self.model.kind != "classifier":
            raise ValueError("faults.attack = 'label_flip' flips class labels: it needs model.kind = 'classifier'")
        if attacked and self.faults.attack != "label_flip" and self.codecs.up:
            raise ValueError(f"faults.attack = '{self.faults.attack}' rewrites dense adapter uploads; "
                             "codecs.up is set (use label_flip, or dense uploads)")
        return self

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\") or v.startswith("."):
            raise ValueError("name must be a non-empty file-name-safe string")
        return v

    def to_json(self) -> str:
        """Serialize to a JSON string (the form carried in Flower's run config)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "Config":
        """Rebuild a config serialized with `to_json` (schema only: it was fully validated when made)."""
        try:
            return cls.model_validate(json.loads(text))
        except ValidationError as err:  # a client's rebuilt config is checked as a recipe is
            raise ConfigError(str(err)) from None
