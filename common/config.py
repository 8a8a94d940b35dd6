"""The typed configuration of every job and service, in one place.

Each job (`sft`, `train_rm`, `ppo`) and each service has a schema (a dataclass tree). A config is
the schema's defaults, then a YAML file, then dotted command-line overrides, as in the seed's
commands: `trainer.ppo.max_steps=15`, `++model.optim.lr=1e-6`,
`"model.data.data_prefix={train: [a.jsonl], validation: [b.jsonl], test: [c.jsonl]}"`.
Key names follow NeMo-Aligner's where it has one. An unknown key or a value of the wrong type is a
`ConfigError` naming the key. OmegaConf does the merging and the type checks.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------


@dataclass
class MegatronRuntimeConfig:
    """How Megatron runs a model, under NeMo-Aligner's key names (`model.*` of every job and of
    the critic server). The activation-recompute keys are passed to Megatron's
    TransformerConfig (`trainer.model.transformer_config`)."""

    # null (off) | selective (recompute the core attention) | full (recompute whole layers)
    activations_checkpoint_granularity: str | None = None
    activations_checkpoint_method: str | None = None  # full only: uniform | block
    activations_checkpoint_num_layers: int | None = None  # full only: layers per group (default 1)
    # NeMo's bf16 weights with fp32 main params in the optimizer: not implemented here, see
    # NOTICES below (a notice, never a silent no-op).
    megatron_amp_O2: bool = False
    mcore_gpt: bool = True  # every model here is a Megatron-core GPTModel; false is an error


@dataclass
class ModelArchConfig(MegatronRuntimeConfig):
    """A Llama-style decoder (Megatron-core GPTModel). Defaults: the tiny demo model."""

    num_layers: int = 2
    hidden_size: int = 128
    ffn_hidden_size: int = 384
    num_attention_heads: int = 4
    num_query_groups: int = 2  # GQA: key/value heads
    vocab_size: int = 512
    encoder_seq_length: int = 256  # maximum sequence length (prompt + response)
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    share_embeddings_and_output_weights: bool = False
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    precision: str = "fp32"  # fp32 | bf16
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    # Shorthand for activations_checkpoint_granularity=full, method=uniform, num_layers=1.
    activations_checkpoint: bool = False


@dataclass
class SchedConfig:
    name: str = "CosineAnnealing"  # CosineAnnealing | Constant
    warmup_steps: int = 10
    constant_steps: int = 0
    min_lr: float = 9e-8


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 9e-7
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    sched: SchedConfig = field(default_factory=SchedConfig)


@dataclass
class DataConfig:
    data_impl: str = "jsonl"
    # {train: [paths], validation: [paths], test: [paths]}
    data_prefix: dict[str, list[str]] = field(default_factory=dict)
    seq_length: int = 256
    shuffle: bool = True


@dataclass
class PretrainedCheckpointConfig:
    # One of our checkpoints, or a Hugging Face model directory (imported on the fly).
    restore_from_path: str | None = None


@dataclass
class WandbLoggerKwargs:
    project: str = "aligner"
    name: str | None = None
    mode: str = "offline"


@dataclass
class ExpManagerConfig:
    explicit_log_dir: str | None = None
    exp_dir: str = "runs"
    name: str = "aligner"
    create_tensorboard_logger: bool = True
    create_wandb_logger: bool = False
    wandb_logger_kwargs: WandbLoggerKwargs = field(default_factory=WandbLoggerKwargs)
    resume_if_exists: bool = True
    checkpoint_keep_last: int = 2


@dataclass
class TlsConfig:
    cert_file: str | None = None  # server certificate (PEM)
    key_file: str | None = None
    client_ca_file: str | None = None  # set to require client certificates (mTLS)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port
    metrics_port: int = 0  # Prometheus /metrics; 0 = pick a free port, -1 = off
    max_message_mb: int = 256
    grace_seconds: float = 10.0  # SIGTERM drain time
    auth_token: str | None = None  # bearer token required when set
    auth_token_file: str | None = None
    tls: TlsConfig = field(default_factory=TlsConfig)
    torch_threads: int = 1
    log_format: str = "json"  # json | console
    reflection: bool = True  # gRPC server reflection (grpcurl list/describe); the chart turns it off


@dataclass
class ModelServerConfig(ServerConfig):
    # The critic's Save/Load paths must lie inside this directory (relative paths are taken from
    # it; `..` or a symlink that leads out is refused). Unset: the server's working directory,
    # so a client can never make the server write or read elsewhere by default. Kubernetes sets
    # it to the checkpoint volume; a local run (`aligner up`, then `aligner ppo` from the same
    # directory) keeps its run folders under the working directory.
    checkpoint_root: str | None = None


@dataclass
class BatchingConfig:
    max_batch_size: int = 64  # sequences merged from concurrent requests
    max_queue_delay_us: int = 2000
    inference_micro_batch_size: int = 16  # sequences per forward pass


# ---------------------------------------------------------------------------------------------
# Training jobs
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopConfig:
    """Shared by the SFT and RM trainers (NeMo's trainer.sft / trainer.rm)."""

    max_epochs: int = 1
    max_steps: int = -1  # -1 = run max_epochs
    val_check_interval: int = 10
    save_interval: int = 50
    limit_val_batches: float = 1.0  # fraction (<= 1.0) or number of batches (> 1)
    gradient_clip_val: float = 1.0


@dataclass
class SftTrainerConfig:
    num_nodes: int = 1
    devices: int = 1
    sft: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class SftModelConfig(ModelArchConfig):
    micro_batch_size: int = 4
    global_batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.0))
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class SftConfig:
    name: str = "sft"
    seed: int = 1234
    torch_threads: int = 2
    tokenizer_path: str | None = None  # tokenizer.json or a HF tokenizer directory
    pretrained_checkpoint: PretrainedCheckpointConfig = field(default_factory=PretrainedCheckpointConfig)
    trainer: SftTrainerConfig = field(default_factory=SftTrainerConfig)
    model: SftModelConfig = field(default_factory=SftModelConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)


@dataclass
class RmTrainerConfig:
    num_nodes: int = 1
    devices: int = 1
    rm: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class RmModelConfig(ModelArchConfig):
    micro_batch_size: int = 2  # comparison pairs per micro batch
    global_batch_size: int = 16
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, weight_decay=0.0))
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class TrainRmConfig:
    name: str = "train_rm"
    seed: int = 1234
    torch_threads: int = 2
    tokenizer_path: str | None = None
    pretrained_checkpoint: PretrainedCheckpointConfig = field(default_factory=PretrainedCheckpointConfig)
    trainer: RmTrainerConfig = field(default_factory=RmTrainerConfig)
    model: RmModelConfig = field(default_factory=RmModelConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)


# ---------------------------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------------------------


@dataclass
class LengthParams:
    max_length: int = 64  # new tokens per response
    min_length: int = 1


@dataclass
class SamplingParams:
    use_greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


@dataclass
class PpoParams:
    num_rollout_samples: int = 512
    rollout_micro_batch_size: int = 8
    forward_micro_batch_size: int = 8
    num_val_samples: int = 16
    val_rollout_micro_batch_size: int = 8
    entropy_bonus: float = 0.0
    ratio_eps: float = 0.2
    discount_factor: float = 1.0
    gae_lambda: float = 0.95
    kl_estimator: str = "abs"  # abs (NeMo default, |k1|) | k1 | k3
    # NeMo's switch between the first two: true = kl_estimator abs, false = k1 (unset: kl_estimator).
    use_absolute_kl: bool | None = None
    # Keep the actor's Adam moments in CPU memory between optimizer steps.
    offload_adam_states: bool = False
    reward_standardization_mean: float = 0.0
    reward_standardization_std: float = 1.0
    length_params: LengthParams = field(default_factory=LengthParams)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class PpoModelConfig(ModelArchConfig):
    # Unset: the policy checkpoint's (the architecture always comes from the checkpoint).
    encoder_seq_length: int | None = None  # type: ignore[assignment]
    micro_batch_size: int = 1
    global_batch_size: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ppo: PpoParams = field(default_factory=PpoParams)


@dataclass
class TrtLlmConfig:
    """NeMo-Aligner's `trainer.ppo.trt_llm`. Here TensorRT-LLM runs inside the generation service
    (`aligner serve generation engine=tensorrt_llm`); `enable` says the run expects that engine."""

    enable: bool = False
    reshard: bool = False  # notice: nothing to reshard (see NOTICES)
    unload_engine_train: bool = False  # notice: the engine never shares the actor's memory
    model_type: str = "llama"  # the only architecture here (Llama-style GPT)


@dataclass
class BatchIteratorConfig:
    use_flask: bool = False  # notice: rank 0 balances the work (see NOTICES)


@dataclass
class PpoLoopConfig:
    max_epochs: int = 1
    max_steps: int = -1
    val_check_interval: int = 10
    save_interval: int = 10
    gradient_clip_val: float = 1.0
    initial_policy_kl_penalty: float = 0.01
    normalize_advantages: bool = True
    critic_warmup_steps: int = 0
    rollout_batch_seq_length: int | None = None
    trt_llm: TrtLlmConfig = field(default_factory=TrtLlmConfig)
    batch_iterator: BatchIteratorConfig = field(default_factory=BatchIteratorConfig)


@dataclass
class PpoTrainerConfig:
    num_nodes: int = 1
    devices: int = 1
    ppo: PpoLoopConfig = field(default_factory=PpoLoopConfig)


@dataclass
class Endpoint:
    """One service: `ip:port` (a DNS name that resolves to several pods is several replicas), or
    `replicas`, a list of "host:port" that replaces them. Generation's two endpoints pair up per
    pod: by IP when given as one name, by position when given as lists."""

    ip: str = "127.0.0.1"
    port: int = MISSING  # type: ignore[assignment]
    replicas: list[str] = field(default_factory=list)


@dataclass
class RemoteCriticRmConfig:
    combine_rm_and_critic_server: bool = True
    pad_to_length: int | None = None  # pad scoring batches to a fixed length (static shapes)
    reward_model: Endpoint = field(default_factory=lambda: Endpoint(port=5555))
    # With combine_rm_and_critic_server, the combined server's address (as in NeMo-Aligner). The
    # critic is single-writer: it takes exactly one address.
    critic: Endpoint = field(default_factory=lambda: Endpoint(port=5556))


@dataclass
class RemoteServicesConfig:
    generation: Endpoint = field(default_factory=lambda: Endpoint(port=8001))  # Triton gRPC
    generation_control: Endpoint = field(default_factory=lambda: Endpoint(port=5558))  # aligner.v1.Generation
    reference: Endpoint = field(default_factory=lambda: Endpoint(port=5557))
    deadline_s: float = 300.0  # per scoring, reference, critic and weight-push call
    # A generate call's deadline is sized to its work: base + per_token * rows * max new tokens.
    generate_deadline_base_s: float = 30.0
    generate_deadline_per_token_s: float = 0.02
    retry_max_wait_s: float = 120.0  # how long a service may stay down before the run stops
    connect_timeout_s: float = 60.0  # at start: every service healthy within this, or fail naming it
    resolve_interval_s: float = 30.0  # re-resolve DNS names (pods come and go)
    probe_interval_s: float = 1.0  # how often a replica that is down is checked again
    # The bearer token every service requires (their server.auth_token_file): set one, not both.
    auth_token: str | None = None
    auth_token_file: str | None = None


@dataclass
class PpoConfig:
    name: str = "ppo"
    seed: int = 1234
    torch_threads: int = 1
    run_id: str | None = None
    tokenizer_path: str | None = None
    host: str = "127.0.0.1"  # bind address of the control and metrics servers (0.0.0.0 in a pod)
    control_port: int = 0  # Orchestrator.{Status,Stop}; 0 = free port, -1 = off
    control_auth_token_file: str | None = None  # when set, Status and Stop need this bearer token
    metrics_port: int = 0
    pretrained_checkpoint: PretrainedCheckpointConfig = field(default_factory=PretrainedCheckpointConfig)
    trainer: PpoTrainerConfig = field(default_factory=PpoTrainerConfig)
    model: PpoModelConfig = field(default_factory=PpoModelConfig)
    remote_critic_rm: RemoteCriticRmConfig = field(default_factory=RemoteCriticRmConfig)
    remote: RemoteServicesConfig = field(default_factory=RemoteServicesConfig)
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)


# ---------------------------------------------------------------------------------------------
# Services
# ---------------------------------------------------------------------------------------------


@dataclass
class CriticPpoConfig:
    # Which server `aligner serve ppo-critic` (NeMo's serve_ppo_critic.py) starts: true (default)
    # the reward-critic server, false the critic alone. `serve critic` / `serve reward-critic`
    # accept only their own value; other servers reject the key.
    combine_rm_and_critic_server: bool | None = None
    # Keep only one model on the accelerator and swap the other from CPU memory.
    swap_models_to_cpu: bool = False
    # Critic optimizer steps over which the LR schedule decays to min_lr (then stays there).
    max_steps: int = 1000


@dataclass
class CriticTrainerConfig:
    ppo: CriticPpoConfig = field(default_factory=CriticPpoConfig)
    gradient_clip_val: float = 1.0
    # Devices of this server job, checked against its processes when set (unset: the job's own
    # size; services/model_server.py).
    num_nodes: int | None = None
    devices: int | None = None


@dataclass
class CriticModelConfig(MegatronRuntimeConfig):
    # Shards the served model(s) over this many ranks: run the server under
    # `torchrun --nproc-per-node N` (services/tensor_parallel.py).
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1  # only 1: the served passes are not pipelined
    micro_batch_size: int = 4
    global_batch_size: int = 64  # sequences per critic optimizer step (a Train call may take several)
    loss_clip_val: float = 0.2
    offload_adam_states: bool = False
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=9e-6, sched=SchedConfig(min_lr=9e-7)))


@dataclass
class ModelServiceConfig:
    """reward, critic, reward-critic and reference servers."""

    name: str = "reward"
    seed: int = 1234
    checkpoint_path: str = MISSING  # type: ignore[assignment]  # the model to serve
    critic_checkpoint_path: str | None = None  # critic init (default: checkpoint_path, the RM)
    tokenizer_path: str | None = None
    server: ModelServerConfig = field(default_factory=ModelServerConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    trainer: CriticTrainerConfig = field(default_factory=CriticTrainerConfig)
    model: CriticModelConfig = field(default_factory=CriticModelConfig)
    # A server with a critic writes the critic's training metrics (metrics per Train call:
    # critic.jsonl, TensorBoard, W&B offline) under exp_manager.explicit_log_dir when that is set.
    exp_manager: ExpManagerConfig = field(default_factory=ExpManagerConfig)


@dataclass
class ServedModelConfig:
    # Shards the model over this many ranks: run the server under `torchrun --nproc-per-node N`
    # (services/tensor_parallel.py; decode=megatron then).
    tensor_model_parallel_size: int = 1


@dataclass
class GenerationServiceConfig:
    name: str = "generation"
    seed: int = 1234
    checkpoint_path: str = MISSING  # type: ignore[assignment]
    tokenizer_path: str | None = None
    engine: str = "torch"  # torch | tensorrt_llm
    # The torch engine's decode step: "fused" (trainer/fused_decode.py; same tokens and logprobs
    # as "megatron", about 3x faster decode on CPU where megatron's per-call overhead dominates)
    # or "megatron" (any model megatron builds). "fused" covers Llama-style models at
    # tensor-parallel size 1; any other model fails at startup naming this key (never a silent
    # switch). Unused by engine=tensorrt_llm.
    decode: str = "fused"  # fused | megatron
    triton_model_name: str = "tensorrt_llm"
    triton_grpc_port: int = 0
    triton_http_port: int = 0
    triton_metrics_port: int = 0
    max_batch_size: int = 64
    max_queue_delay_us: int = 2000
    server: ServerConfig = field(default_factory=ServerConfig)  # aligner.v1.Generation
    model: ServedModelConfig = field(default_factory=ServedModelConfig)


@dataclass
class LaunchConfig:
    """`aligner up`: every service as a local process on 127.0.0.1 (free ports)."""

    run_dir: str = "runs/services"
    policy_checkpoint: str = MISSING  # type: ignore[assignment]  # SFT policy: generation + reference
    reward_checkpoint: str = MISSING  # type: ignore[assignment]  # reward model (and critic init)
    critic_checkpoint: str | None = None  # default: the reward model
    tokenizer_path: str | None = None
    combine_rm_and_critic_server: bool = True
    host: str = "127.0.0.1"
    torch_threads: int = 1  # per service process
    startup_timeout_s: float = 300.0
    # Extra dotted overrides per service, e.g. generation: ["max_batch_size=32"].
    generation: list[str] = field(default_factory=list)
    reward: list[str] = field(default_factory=list)  # reward-critic, or reward alone
    critic: list[str] = field(default_factory=list)
    reference: list[str] = field(default_factory=list)
    # Ranks per model server (tensor parallel under torchrun), by service name, e.g.
    # {"reward-critic": 2}; absent = 1.
    tensor_parallel: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


# Other names of a schema key: NeMo-Aligner's names for keys that a service architecture keeps
# elsewhere. Each resolves to the one schema key (the documented name) before anything is checked,
# on the command line and in --config files alike; giving both with different values is an error.
ALIASES: dict[type, dict[str, str]] = {
    ModelServiceConfig: {
        "trainer.ppo.port": "server.port",
        "pretrained_checkpoint.restore_from_path": "checkpoint_path",
        "trainer.ppo.inference_micro_batch_size": "batching.inference_micro_batch_size",
    },
    PpoConfig: {
        # The actor reads the servers' layout from remote_critic_rm (NeMo's own actor key).
        "model.ppo.combine_rm_and_critic_server": "remote_critic_rm.combine_rm_and_critic_server",
        "trainer.trt_llm.model_type": "trainer.ppo.trt_llm.model_type",
    },
}

# NeMo-Aligner keys with no switch of their own in a service architecture. Setting one (on the
# command line or in --config) logs this one-line notice saying what it means here.
NOTICES: dict[str, str] = {
    "model.mcore_gpt": "every model here is a Megatron-core GPTModel; true is what always happens",
    "model.megatron_amp_O2": (
        "not implemented here: weights and optimizer stay in model.precision (fp32 unless "
        "model.precision=bf16, which keeps no fp32 main params)"
    ),
    "trainer.ppo.trt_llm.reshard": (
        "nothing to reshard: the generation service holds its own engine in its own tensor-parallel "
        "layout and receives full weights from the actor after each step"
    ),
    "trainer.ppo.trt_llm.unload_engine_train": (
        "the engine lives in the generation service's process, never in the actor's memory, so "
        "there is nothing to unload during training"
    ),
    "remote_critic_rm.pad_to_length": (
        "checked against the sequence length, but not applied: scoring requests carry ragged rows "
        "and the servers pad each micro-batch to its longest row"
    ),
    "model.ppo.val_rollout_micro_batch_size": "validation rollouts go out in model.ppo.rollout_micro_batch_size chunks",
    "trainer.ppo.rollout_batch_seq_length": "rollouts stay ragged; nothing pads them to a fixed length",
    "trainer.ppo.batch_iterator.use_flask": (
        "rank 0 sends all rollout requests to the generation service, whose dynamic batcher "
        "balances the work; there is no per-rank work queue to serve"
    ),
}

# Values a key can never take here, and why (for every schema that has the key, or one schema).
_ONLY_VALUES: dict[str, tuple[Any, str, type | None]] = {
    "model.mcore_gpt": (True, "every model here is a Megatron-core GPTModel", None),
    "trainer.ppo.trt_llm.model_type": ("llama", "the models here are Llama-style GPTs", None),
    # The training jobs check theirs when they build the model (trainer/model.py).
    "model.pipeline_model_parallel_size": (
        1,
        "the served passes are not pipelined (use model.tensor_model_parallel_size)",
        ModelServiceConfig,
    ),
}

_notice_log = logging.getLogger("aligner.config")


def notice(key: str, value: Any, text: str) -> None:
    """Log the one-line notice for a key that is taken, but means something else here than in
    NeMo-Aligner (stdlib logging: plain text on stderr before a process sets up its logs)."""
    _notice_log.warning("notice: %s=%s: %s", key, value, text)


_UNSET = object()


@dataclass(frozen=True)
class Override:
    """One command-line override, as Hydra reads it: `key=value` sets an existing key,
    `+key=value` adds one that has no value yet, `++key=value` adds or sets."""

    prefix: str  # "", "+" or "++"
    key: str
    value: str  # as typed; parsed as YAML when applied

    @classmethod
    def parse(cls, item: str) -> Override:
        item = item.strip()
        prefix = "++" if item.startswith("++") else "+" if item.startswith("+") else ""
        body = item[len(prefix) :]
        if item.startswith("~"):
            raise ConfigError(f"override {item!r}: deleting a key (~key) is not supported")
        key, eq, value = body.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        return cls(prefix, key, value)

    def __str__(self) -> str:
        return f"{self.prefix}{self.key}={self.value}"


def _lookup(cfg: Any, key: str) -> tuple[bool, bool, bool]:
    """(parent exists, key exists, parent is an open map) for a dotted key of `cfg`. A key exists
    when the schema (or an open map such as model.data.data_prefix) has it, set or not."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=_UNSET) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        return False, False, False
    is_open = parent._metadata.object_type in (dict, None)
    return True, leaf in parent.keys(), is_open


def _is_set(cfg: Any, key: str) -> bool:
    return not OmegaConf.is_missing(cfg, key) and OmegaConf.select(cfg, key) is not None


def _unknown_key(schema: type, key: str, cfg: Any) -> ConfigError:
    parts = key.split(".")
    for i in range(1, len(parts)):  # name the first part of the path the schema lacks
        if OmegaConf.select(cfg, ".".join(parts[:i]), default=_UNSET) is _UNSET:
            key = ".".join(parts[:i])
            break
    known = [k for k, _ in _leaf_items(OmegaConf.to_container(cfg, resolve=False))]
    known += list(ALIASES.get(schema, {}))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return ConfigError(
        f"config key {key!r}: not a key of the {schema.__name__} schema, so nothing would read it{hint}"
    )


def _apply_override(schema: type, cfg: Any, ov: Override) -> Any:
    parent_exists, exists, is_open = _lookup(cfg, ov.key)
    if not exists and not (parent_exists and is_open):
        raise _unknown_key(schema, ov.key, cfg)
    if ov.prefix == "" and not exists:
        raise ConfigError(
            f"config key {ov.key!r}: not in the config yet; add it with ++{ov.key}={ov.value} or +{ov.key}={ov.value}"
        )
    if ov.prefix == "+" and exists and _is_set(cfg, ov.key):
        raise ConfigError(
            f"config key {ov.key!r}: +{ov.key} adds a key, but it already has a value; "
            f"set it with {ov.key}={ov.value} or ++{ov.key}={ov.value}"
        )
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{ov.key}={ov.value}"]))


def _leaf_items(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) of every leaf of a nested dict (maps count as leaves when empty)."""
    if not isinstance(tree, dict) or not tree:
        return [(prefix, tree)] if prefix else []
    items: list[tuple[str, Any]] = []
    for k, v in tree.items():
        items += _leaf_items(v, f"{prefix}.{k}" if prefix else str(k))
    return items


def _move_aliases(schema: type, tree: dict) -> dict:
    """A --config file's tree with alias keys moved to their schema keys (nested dicts)."""
    for alias, target in ALIASES.get(schema, {}).items():
        *path, leaf = alias.split(".")
        nodes = [tree]
        for part in path:
            nodes.append(nodes[-1].get(part) if isinstance(nodes[-1], dict) else None)
        if not isinstance(nodes[-1], dict) or leaf not in nodes[-1]:
            continue
        value = nodes[-1].pop(leaf)
        for parent, part, node in reversed(list(zip(nodes[:-1], path, nodes[1:], strict=True))):
            if not node:  # a section that held only the alias goes too
                del parent[part]
        *tpath, tleaf = target.split(".")
        dest = tree
        for part in tpath:
            dest = dest.setdefault(part, {})
        if tleaf in dest and dest[tleaf] != value:
            raise ConfigError(f"config keys {alias!r} and {target!r} are one key and have different values")
        dest[tleaf] = value
    return tree


def _resolve_aliases(schema: type, overrides: list[Override]) -> list[Override]:
    aliases = ALIASES.get(schema, {})
    seen: dict[str, Override] = {}  # schema key -> the override that set it
    out = []
    for ov in overrides:
        key = aliases.get(ov.key, ov.key)
        before = seen.get(key)
        if before is not None and before.key != ov.key and before.value != ov.value:
            raise ConfigError(
                f"config keys {before.key!r} and {ov.key!r} are one key and have different values"
            )
        seen[key] = ov
        out.append(dataclasses.replace(ov, key=key))
    return out


def _check_nemo_keys(schema: type, cfg: Any, given: set[str]) -> None:
    """Keys NeMo users pass: values that cannot work are errors; the others get their notice.
    `given`: the keys set on the command line, and those a --config file sets to a value other
    than the default (a file that spells out every default gets no notices)."""
    for key, (only, why, only_schema) in _ONLY_VALUES.items():
        value = OmegaConf.select(cfg, key, default=_UNSET)
        if value is not _UNSET and value != only and only_schema in (None, schema):
            raise ConfigError(f"config key {key!r}: only {only!r} is supported, got {value!r}: {why}")
    for key, text in NOTICES.items():
        if key in given:
            notice(key, OmegaConf.select(cfg, key), text)
    if OmegaConf.select(cfg, "model.activations_checkpoint_granularity", default=None) == "selective":
        for key in ("model.activations_checkpoint_method", "model.activations_checkpoint_num_layers"):
            if key in given and OmegaConf.select(cfg, key) is not None:
                notice(
                    key,
                    OmegaConf.select(cfg, key),
                    "applies to full recompute only; selective recomputes the core attention of every layer",
                )
    # model.ppo.use_absolute_kl is NeMo's switch between two of kl_estimator's values.
    absolute = OmegaConf.select(cfg, "model.ppo.use_absolute_kl", default=None)
    if absolute is not None:
        wanted = "abs" if absolute else "k1"
        if "model.ppo.kl_estimator" in given and cfg.model.ppo.kl_estimator != wanted:
            raise ConfigError(
                f"config key 'model.ppo.use_absolute_kl': {absolute} means kl_estimator={wanted}, "
                f"but model.ppo.kl_estimator={cfg.model.ppo.kl_estimator}"
            )
        cfg.model.ppo.kl_estimator = wanted


def load_config(schema: type[T], yaml_path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults of `schema`, then `yaml_path`, then `overrides` (Hydra's rules: `key=value` sets a
    key that exists, `+key=value` adds one that has no value yet, `++key=value` adds or sets;
    every key must be one the schema has, since nothing would read any other). Alias keys
    (ALIASES) resolve to their schema key; NeMo-only keys are checked and get their notice."""
    cfg = OmegaConf.structured(schema)
    given: set[str] = set()
    try:
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            try:
                loaded = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(
                    f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}"
                ) from None
            if not isinstance(loaded, dict):
                raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
            loaded = _move_aliases(schema, loaded)
            defaults = OmegaConf.structured(schema)
            given.update(
                k for k, v in _leaf_items(loaded) if OmegaConf.select(defaults, k, default=_UNSET) != v
            )
            cfg = OmegaConf.merge(cfg, OmegaConf.create(loaded))
        parsed = _resolve_aliases(schema, [Override.parse(o) for o in overrides])
        for ov in parsed:
            cfg = _apply_override(schema, cfg, ov)
            given.add(ov.key)
        _check_nemo_keys(schema, cfg, given)
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or getattr(exc, "key", None)
        detail = str(exc).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {detail}" if key else f"config: {detail}") from None


def to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(schema: type[T], data: dict[str, Any]) -> T:
    """Rebuild a config saved with `to_dict` (e.g. from a checkpoint), validating it again."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config: {str(exc).splitlines()[0]}") from None
