"""Every Prometheus metric of the project, named here and nowhere else.

Each process serves these on its own HTTP port (`start_metrics_server`). The Helm chart's alerts and
the Grafana dashboards are generated against the names below (`METRIC_NAMES`).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

# --- gRPC, every service (labels: service, method; code on counts) -------------------------------
RPC_REQUESTS = Counter(
    "aligner_rpc_requests", "gRPC calls handled, by final status code", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "aligner_rpc_latency_seconds", "gRPC call latency", ["service", "method"], buckets=_LATENCY_BUCKETS
)
RPC_ERRORS = Counter("aligner_rpc_errors", "gRPC calls that ended with a non-OK status", ["service", "method", "code"])
RPC_IN_FLIGHT = Gauge("aligner_rpc_in_flight", "gRPC calls being handled now", ["service"])

# --- model servers ---------------------------------------------------------------------------------
BATCH_SIZE = Histogram(
    "aligner_batch_size", "Sequences per model forward pass (after dynamic batching)", ["service"],
    buckets=_BATCH_BUCKETS,
)
REQUESTS_PER_BATCH = Histogram(
    "aligner_requests_per_batch", "Client requests merged into one dynamic batch", ["service"], buckets=_BATCH_BUCKETS
)
QUEUE_DEPTH = Gauge("aligner_queue_depth", "Sequences waiting in the dynamic batcher", ["service"])
SEQUENCES_PROCESSED = Counter("aligner_sequences", "Sequences scored or processed", ["service"])
TOKENS_PROCESSED = Counter("aligner_tokens", "Tokens run through a model forward pass", ["service"])
MODEL_LOADED = Gauge("aligner_model_loaded", "1 once the service's model is loaded and serving", ["service"])

# --- generation ------------------------------------------------------------------------------------
TOKENS_GENERATED = Counter("aligner_generated_tokens", "Tokens sampled by the generation engine", ["engine"])
GENERATION_TOKENS_PER_SECOND = Gauge(
    "aligner_generation_tokens_per_second", "Sampling throughput of the last generation batch", ["engine"]
)
WEIGHT_UPDATES = Counter("aligner_weight_updates", "Weight versions applied to the generation engine", ["engine"])
WEIGHT_UPDATE_BYTES = Counter("aligner_weight_update_bytes", "Bytes of weights received", ["engine"])

# --- critic training -------------------------------------------------------------------------------
CRITIC_TRAIN_STEPS = Counter("aligner_critic_train_steps", "Critic optimizer steps")
CRITIC_VALUE_LOSS = Gauge("aligner_critic_value_loss", "Clipped value loss of the last critic update")

# --- PPO orchestrator (one run per process) ----------------------------------------------------------
PPO_STEP = Gauge("aligner_ppo_step", "Last finished PPO step")
PPO_LAST_STEP_TIMESTAMP = Gauge(
    "aligner_ppo_last_step_timestamp_seconds", "Unix time at which the last PPO step finished (stall alerts)"
)
PPO_POLICY_VERSION = Gauge("aligner_ppo_policy_version", "Policy version served by generation")
PPO_PHASE_SECONDS = Gauge(
    "aligner_ppo_phase_seconds", "Wall time of each phase in the last PPO step", ["phase"]
)
PPO_STEP_SECONDS = Histogram(
    "aligner_ppo_step_seconds", "Wall time of whole PPO steps", buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
)
PPO_REWARD_MEAN = Gauge("aligner_ppo_reward_mean", "Mean reward-model score of the last rollout")
PPO_REWARD_STD = Gauge("aligner_ppo_reward_std", "Std of the reward-model score of the last rollout")
PPO_KL = Gauge("aligner_ppo_kl", "Mean per-sequence KL to the initial policy in the last rollout")
PPO_ENTROPY = Gauge("aligner_ppo_entropy", "Mean per-token policy entropy in the last actor update")
PPO_CLIP_FRACTION = Gauge("aligner_ppo_clip_fraction", "Fraction of tokens whose ratio was clipped")
PPO_VALUE_LOSS = Gauge("aligner_ppo_value_loss", "Critic value loss reported for the last step")
PPO_POLICY_LOSS = Gauge("aligner_ppo_policy_loss", "PPO policy loss of the last actor update")
PPO_RESPONSE_LENGTH = Gauge("aligner_ppo_response_length", "Mean response length (tokens) of the last rollout")
PPO_TOKENS_PER_SECOND = Gauge("aligner_ppo_tokens_per_second", "Response tokens per second of the last step")
PPO_VAL_REWARD = Gauge("aligner_ppo_validation_reward_mean", "Mean reward on validation prompts (greedy)")
PPO_SERVICE_RETRIES = Counter(
    "aligner_ppo_service_retries", "Calls the orchestrator retried because a service was unavailable", ["target"]
)

PPO_PHASES = ("generate", "score", "logprobs", "actor_train", "critic_train", "weight_sync")


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve /metrics on host:port (port 0 = a free port); returns the bound port, or -1 when off."""
    if port < 0:
        return -1
    server, _thread = start_http_server(port, addr=host)
    return server.server_address[1]


def metric_names() -> list[str]:
    """Names of every aligner_ metric family as Prometheus exposes them (counters with _total)."""
    names = []
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - the registry has no public list
        for name in REGISTRY._collector_to_names[collector]:  # noqa: SLF001
            if name.startswith("aligner_"):
                names.append(name)
    return sorted(set(names))
