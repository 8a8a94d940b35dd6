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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


# ---------------------------------------------------------------------------------------------
# Shared sections
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelArchConfig:
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
    reward_standardization_mean: float = 0.0
    reward_standardization_std: float = 1.0
    length_params: LengthParams = field(default_factory=LengthParams)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class PpoModelConfig(ModelArchConfig):
    micro_batch_size: int = 1
    global_batch_size: int = 64
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ppo: PpoParams = field(default_factory=PpoParams)


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


@dataclass
class PpoConfig:
    name: str = "ppo"
    seed: int = 1234
    torch_threads: int = 1
    run_id: str | None = None
    tokenizer_path: str | None = None
    host: str = "127.0.0.1"  # bind address of the control and metrics servers (0.0.0.0 in a pod)
    control_port: int = 0  # Orchestrator.{Status,Stop}; 0 = free port, -1 = off
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
    combine_rm_and_critic_server: bool = True
    # Keep only one model on the accelerator and swap the other from CPU memory.
    swap_models_to_cpu: bool = False
    # Critic optimizer steps over which the LR schedule decays to min_lr (then stays there).
    max_steps: int = 1000


@dataclass
class CriticTrainerConfig:
    ppo: CriticPpoConfig = field(default_factory=CriticPpoConfig)
    gradient_clip_val: float = 1.0


@dataclass
class CriticModelConfig:
    # Shards the served model(s) over this many ranks: run the server under
    # `torchrun --nproc-per-node N` (services/tensor_parallel.py).
    tensor_model_parallel_size: int = 1
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
    server: ServerConfig = field(default_factory=ServerConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    trainer: CriticTrainerConfig = field(default_factory=CriticTrainerConfig)
    model: CriticModelConfig = field(default_factory=CriticModelConfig)


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


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _normalise_override(item: str) -> str:
    # Hydra's `++key=value` (add or override) and `+key=value` (add) mean plain override here:
    # every valid key already exists in the schema.
    item = item.strip()
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    return item.lstrip("+")


def load_config(schema: type[T], yaml_path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Defaults of `schema`, then `yaml_path`, then dotted `overrides`; returns a `schema` instance."""
    base = OmegaConf.structured(schema)
    try:
        if yaml_path is not None:
            path = Path(yaml_path)
            if not path.is_file():
                raise ConfigError(f"config file {str(path)!r} does not exist")
            try:
                loaded = OmegaConf.load(path)
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
            base = OmegaConf.merge(base, loaded)
        if overrides:
            base = OmegaConf.merge(base, OmegaConf.from_dotlist([_normalise_override(o) for o in overrides]))
        return OmegaConf.to_object(base)  # type: ignore[return-value]
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
