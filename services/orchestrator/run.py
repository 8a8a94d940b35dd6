"""The PPO loop over the services (docs/architecture.md), one `step()` per rollout.

Read `step()` top to bottom: generate + score, recompute the actor's logprobs, advantages, actor
and critic updates side by side, weight sync, then metrics, validation and checkpoints.

Under `torchrun` every rank runs this loop; rank 0 alone talks to the services (`_on_main`) and
hands the outcome (a rollout, the critic's metrics, or the error that stopped it) to every rank,
which then train the actor together (data / tensor parallel) and checkpoint together.

The services come in as a Scorer and a Generator (`services.orchestrator.clients`): over gRPC
replica sets by default (`clients.connect`), or in this process (`in_process.InProcessServices`).
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from common import metrics
from common.config import PpoConfig, notice, to_dict
from common.errors import AlignerError, InvalidArgument
from common.logging import bind_context, get_logger
from common.replicas import ServiceDown
from services.orchestrator import clients
from services.orchestrator.rollouts import RolloutCollector, sampling_params
from trainer import checkpoint
from trainer.data.datasets import EpochSampler, PromptDataset
from trainer.hf import full_state_dict
from trainer.loop import MetricsLog, check_data_impl, check_loggers, check_world_size
from trainer.model import sequence_logprobs
from trainer.optim import build_optimizer, build_scheduler
from trainer.parallel import init_parallel
from trainer.ppo.actor import actor_train
from trainer.ppo.rollout import compute_advantages, pad_rows, rollout_from_samples

log = get_logger(__name__)

CRITIC_CHECKPOINTS = "critic_checkpoints"  # beside checkpoints/, one per actor checkpoint


class PeerFailed(AlignerError):
    """Rank 0 hit an error while talking to the services; every other rank stops with it."""

    def __init__(self, message: str, service_down: bool, critic_down: bool):
        super().__init__(message)
        self.service_down, self.critic_down = service_down, critic_down


class CriticLost(AlignerError):
    """The critic service lost its state and there is no critic checkpoint to reload."""


def _world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class PpoRun:
    def __init__(self, cfg: PpoConfig, run_dir: Path, scorer: clients.Scorer | None = None,
                 generator: clients.Generator | None = None, run_id: str | None = None):  # fmt: skip
        """`scorer`/`generator`: the services (rank 0 only); default: over gRPC, from the config."""
        self.cfg, self.run_dir = cfg, run_dir
        self.run_id = run_id or run_dir.name
        ppo, model_cfg = cfg.model.ppo, cfg.model
        self._check(cfg)
        init_parallel(model_cfg.tensor_model_parallel_size, model_cfg.pipeline_model_parallel_size, cfg.seed)
        check_world_size(cfg.trainer.num_nodes, cfg.trainer.devices)
        check_loggers(cfg.exp_manager)
        if not cfg.pretrained_checkpoint.restore_from_path:
            raise InvalidArgument("pretrained_checkpoint.restore_from_path", "is required (the SFT policy)")
        self.actor, self.arch, self.tokenizer = checkpoint.load_model_for_inference(
            cfg.pretrained_checkpoint.restore_from_path, value_head=False, runtime=model_cfg
        )
        self.seq_length = self._seq_length(cfg, self.arch.encoder_seq_length)
        self.optimizer = build_optimizer(self.actor, model_cfg.optim)
        max_prompt = self.seq_length - ppo.length_params.max_length
        self.prompts = PromptDataset(self._data_path("train"), self.tokenizer, max_prompt_length=max_prompt)
        self.val_prompts = PromptDataset(self._data_path("validation"), self.tokenizer, max_prompt_length=max_prompt)
        self.max_steps = self._max_steps(cfg, len(self.prompts))
        optimizer_steps = self.max_steps * ppo.num_rollout_samples // model_cfg.global_batch_size
        self.scheduler = build_scheduler(self.optimizer, model_cfg.optim, optimizer_steps)
        self.sampler = EpochSampler(len(self.prompts), seed=cfg.seed)
        self.rank, self.world_size = _world()
        self.is_main = self.rank == 0
        self._pushed_weights: dict[str, torch.Tensor] | None = None
        if self.is_main:
            if scorer is None or generator is None:
                scorer, generator = clients.connect(cfg)
            self.scorer, self.generator = scorer, generator
            self.collector = RolloutCollector(generator, scorer, ppo.rollout_micro_batch_size, cfg.seed)
            self.critic_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="critic")
        self.step_index = 0
        self.consumed_samples = 0
        self.policy_version = 0
        self.last_saved_step = -1
        self.phase = "idle"
        self.last_metrics: dict[str, float] = {}
        self.stop_requested = threading.Event()
        # Rank 0's view of the critic service: its optimizer step and this run's last checkpoint of it.
        self.critic_step = 0
        self.critic_checkpoint: str | None = None
        self.save_on_stop = True
        # metrics.jsonl / validation.jsonl, TensorBoard and W&B (exp_manager), rank 0 only;
        # appended to, so a resumed run's files hold the whole history.
        self.metrics_log = MetricsLog(run_dir, cfg.exp_manager, cfg, resume_step=None, enabled=self.is_main)

    # --- setup -------------------------------------------------------------------------------

    @staticmethod
    def _check(cfg: PpoConfig) -> None:
        ppo, m = cfg.model.ppo, cfg.model
        check_data_impl(m.data.data_impl)
        if ppo.num_rollout_samples % m.global_batch_size:
            raise InvalidArgument(
                "model.ppo.num_rollout_samples",
                f"{ppo.num_rollout_samples} must be a multiple of model.global_batch_size {m.global_batch_size}",
            )
        if m.global_batch_size % m.micro_batch_size:
            raise InvalidArgument("model.global_batch_size", "must be a multiple of model.micro_batch_size")

    @staticmethod
    def _seq_length(cfg: PpoConfig, checkpoint_length: int) -> int:
        """The policy checkpoint's sequence length, or a shorter model.encoder_seq_length."""
        length = cfg.model.encoder_seq_length or checkpoint_length
        if length > checkpoint_length:
            raise InvalidArgument(
                "model.encoder_seq_length", f"{length} exceeds the policy checkpoint's {checkpoint_length}"
            )
        if cfg.model.ppo.length_params.max_length >= length:
            raise InvalidArgument(
                "model.ppo.length_params.max_length",
                f"{cfg.model.ppo.length_params.max_length} leaves no room for a prompt in the "
                f"sequence length {length}",
            )
        pad = cfg.remote_critic_rm.pad_to_length
        if pad is not None and pad > length:
            raise InvalidArgument("remote_critic_rm.pad_to_length", f"exceeds the sequence length {length}")
        return length

    @staticmethod
    def _max_steps(cfg: PpoConfig, num_prompts: int) -> int:
        """PPO steps of the run: trainer.ppo.max_steps, capped by max_epochs passes over the
        prompts (a step takes model.ppo.num_rollout_samples of them); either one may be unset
        (<= 0), not both."""
        tcfg, per_step = cfg.trainer.ppo, cfg.model.ppo.num_rollout_samples
        by_epochs = None
        if tcfg.max_epochs > 0:
            by_epochs = tcfg.max_epochs * num_prompts // per_step
            if by_epochs < 1:
                raise InvalidArgument(
                    "trainer.ppo.max_epochs",
                    f"{tcfg.max_epochs} epoch(s) of {num_prompts} prompts is less than one step of "
                    f"model.ppo.num_rollout_samples={per_step}",
                )
        if tcfg.max_steps > 0:
            return min(tcfg.max_steps, by_epochs) if by_epochs is not None else tcfg.max_steps
        if by_epochs is None:
            raise InvalidArgument("trainer.ppo.max_steps", "set it or trainer.ppo.max_epochs (> 0)")
        return by_epochs

    def _data_path(self, split: str) -> str:
        paths = self.cfg.model.data.data_prefix.get(split) or []
        if not paths:
            raise InvalidArgument(f"model.data.data_prefix.{split}", "needs a prompts .jsonl file")
        return paths[0]

    def _on_main(self, what: str, fn):
        """Rank 0 runs `fn()` (a service call); every rank returns its result or raises its error."""
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except BaseException as exc:
                if self.world_size > 1:
                    down = isinstance(exc, ServiceDown)
                    error = ("error", f"{what}: {exc}", down, down and exc.service == self.scorer.critic_service)
                    dist.broadcast_object_list([error], src=0)
                raise
        if self.world_size > 1:
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        if outcome[0] == "error":
            raise PeerFailed(*outcome[1:])
        return outcome[1]

    def _should_stop(self) -> bool:
        """Rank 0's stop request (signal or Stop RPC), the same answer on every rank."""
        stop = [self.stop_requested.is_set()]
        if self.world_size > 1:
            dist.broadcast_object_list(stop, src=0)
        return stop[0]

    def connect(self) -> None:
        """Fail fast with the endpoint's name when a service is not there; then push the policy."""

        def wait_for_services() -> int:
            timeout_s = self.cfg.remote.connect_timeout_s
            self.scorer.wait_ready(timeout_s)
            if self.step_index == 0:  # a fresh run: the critic may have trained for an earlier one
                self.critic_step = self.scorer.reset_critic()
            return self.generator.wait_ready(timeout_s)

        # Generation may still hold newer weights from an earlier run: versions only grow.
        self.policy_version = max(self.policy_version, self._on_main("connect", wait_for_services))
        self._on_main("generation engine", self._check_engine)
        self.sync_weights()

    def _check_engine(self) -> None:
        """trainer.ppo.trt_llm.enable: the run expects TensorRT-LLM generation, which here is the
        generation service's engine; every replica must run it."""
        engines = self.generator.engines()
        if self.cfg.trainer.ppo.trt_llm.enable and engines != {"tensorrt_llm"}:
            raise InvalidArgument(
                "trainer.ppo.trt_llm.enable",
                f"is true but the generation service runs {', '.join(sorted(engines))}; start it with "
                "engine=tensorrt_llm (aligner serve generation)",
            )
        if not self.cfg.trainer.ppo.trt_llm.enable and "tensorrt_llm" in engines:
            notice("trainer.ppo.trt_llm.enable", False, "the generation service runs TensorRT-LLM all the same")

    def sync_weights(self) -> None:
        """Push the actor's weights to generation as the next policy version (a collective)."""
        weights = full_state_dict(self.actor)  # TP shards gathered: generation holds the whole model
        if self.is_main:
            self._pushed_weights = weights
        self.policy_version = self._on_main("weight sync", self._push_weights)
        metrics.PPO_POLICY_VERSION.set(self.policy_version)

    def _push_weights(self) -> int:
        """Rank 0: push the last gathered weights to every generation replica, as a version newer
        than any of them serves (replicas that miss it are resynced before they generate)."""
        version = max(self.policy_version, self.generator.served_version()) + 1
        self.generator.push_weights(self._pushed_weights, version)
        self.policy_version = version
        return version

    # --- one PPO step ------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        cfg, ppo = self.cfg, self.cfg.model.ppo
        timings: dict[str, float] = {}
        step_start = time.perf_counter()

        consumed, sampler_state = self.consumed_samples, self.sampler.state_dict()
        indices = self.sampler.take(ppo.num_rollout_samples)
        # The data position of each sample (its seed) counts every prompt ever drawn.
        prompts = [(consumed + i, self.prompts.tokens[index]) for i, index in enumerate(indices)]
        self.phase = "generate"
        try:
            samples, collect_times = self._on_main("rollout", lambda: self._collect(prompts))
        except BaseException:
            # A failed rollout gives its prompts back: a checkpoint taken now resumes with them.
            self.sampler.load_state_dict(sampler_state)
            raise
        self.consumed_samples += len(indices)
        timings |= collect_times
        rollout = rollout_from_samples(samples, self.tokenizer.pad_id)

        with self._phase("logprobs", timings):
            logprobs = sequence_logprobs(self.actor, rollout.sequences(), ppo.forward_micro_batch_size)
            rollout.old_logprobs = pad_rows(logprobs, rollout.tokens.shape[1] - 1)
        stats = compute_advantages(
            rollout,
            kl_coef=cfg.trainer.ppo.initial_policy_kl_penalty,
            kl_estimator=ppo.kl_estimator,
            gamma=ppo.discount_factor,
            lam=ppo.gae_lambda,
            normalize=cfg.trainer.ppo.normalize_advantages,
            reward_mean=ppo.reward_standardization_mean,
            reward_std=ppo.reward_standardization_std,
        )

        # The critic trains on its own server while the actor trains here.
        critic_start = time.perf_counter()
        # The rollout id names this step of this run: a retried Train never trains twice.
        rollout_id = f"{self.run_id}:{self.step_index + 1}"
        critic_future = self.critic_pool.submit(self._train_critic, rollout, rollout_id) if self.is_main else None
        actor_stats: dict[str, float] = {}
        if self.step_index >= cfg.trainer.ppo.critic_warmup_steps:
            with self._phase("actor_train", timings):
                actor_stats = actor_train(
                    self.actor, self.optimizer, self.scheduler, rollout,
                    global_batch_size=cfg.model.global_batch_size,
                    micro_batch_size=cfg.model.micro_batch_size,
                    ratio_eps=ppo.ratio_eps,
                    entropy_bonus=ppo.entropy_bonus,
                    gradient_clip_val=cfg.trainer.ppo.gradient_clip_val,
                    offload_adam_states=ppo.offload_adam_states,
                )  # fmt: skip
        self.phase = "critic_train"
        critic_stats = self._on_main("critic training", critic_future.result if self.is_main else None)
        timings["critic_train"] = time.perf_counter() - critic_start

        if actor_stats:
            with self._phase("weight_sync", timings):
                self.sync_weights()

        self.step_index += 1
        step_time = time.perf_counter() - step_start
        response_tokens = float((rollout.response_ends - rollout.prompt_lengths).sum())
        result = stats | actor_stats | critic_stats | {f"time_{k}": v for k, v in timings.items()}
        result |= {"step": self.step_index, "step_time": step_time, "tokens_per_second": response_tokens / step_time,
                   "policy_version": self.policy_version, "consumed_samples": self.consumed_samples}
        self._publish(result, timings)
        return result

    def _collect(self, prompts):
        """Rank 0: the scored rollout. When the critic lost its state meanwhile, its values came
        from a critic that is not this run's: it gets its checkpoint back and scores them again."""
        samples, times = self.collector.collect(prompts, self._sampling(greedy=False), self.policy_version)
        step = self.scorer.critic_step()
        if step != self.critic_step:
            self._recover_critic(f"it is at step {step} after scoring, expected {self.critic_step}")
            _, values = self.scorer.score([torch.tensor(s.tokens) for s in samples])
            for sample, value in zip(samples, values, strict=True):
                sample.values = value
        return samples, times

    def _sampling(self, greedy: bool):
        return sampling_params(self.cfg.model.ppo, self.tokenizer.eos_id, greedy)

    def _train_critic(self, rollout, rollout_id: str) -> dict[str, float]:
        lengths = rollout.response_ends - 1
        rows = lambda t: [t[i, : int(n)] for i, n in enumerate(lengths)]  # noqa: E731

        def train() -> dict[str, float]:
            return self.scorer.train_critic(
                rollout_id, rollout.sequences(), rows(rollout.mask), rows(rollout.returns), rows(rollout.values),
                chunk_size=self.cfg.model.ppo.rollout_micro_batch_size,
            )  # fmt: skip

        result = train()
        before = int(result["critic_step"] - result["critic_optimizer_steps"])
        if before != self.critic_step:  # it trained a critic that had lost its state: not this run's
            self._recover_critic(f"it was at step {before} before rollout {rollout_id}, expected {self.critic_step}")
            result = train()  # the reloaded critic has not seen this rollout id
        self.critic_step = int(result["critic_step"])
        return result

    def _check_critic(self) -> None:
        """Before saving the critic: it must still hold this run's state."""
        step = self.scorer.critic_step()
        if step != self.critic_step:
            self._recover_critic(f"it is at step {step}, expected {self.critic_step}")

    def _recover_critic(self, why: str) -> None:
        """A critic that lost its state (restarted) is never trained on: it gets this run's last
        critic checkpoint back, or the run stops when there is none."""
        if self.critic_checkpoint is None:
            raise CriticLost(
                f"the critic lost its state ({why}) and this run has no critic checkpoint to reload; "
                "resume the run from its last checkpoint or start it again"
            )
        self.critic_step = self.scorer.load_critic(self.critic_checkpoint)
        log.warning("critic lost its state: reloaded its last checkpoint", why=why, path=self.critic_checkpoint,
                    critic_step=self.critic_step)  # fmt: skip

    @contextmanager
    def _phase(self, name: str, timings: dict[str, float] | None = None):
        self.phase = name
        start = time.perf_counter()
        try:
            yield
        finally:
            if timings is not None:
                timings[name] = time.perf_counter() - start

    def _publish(self, result: dict[str, float], timings: dict[str, float]) -> None:
        self.last_metrics = {k: float(v) for k, v in result.items()}
        metrics.PPO_STEP.set(self.step_index)
        metrics.PPO_LAST_STEP_TIMESTAMP.set(time.time())
        metrics.PPO_POLICY_VERSION.set(self.policy_version)
        metrics.PPO_STEP_SECONDS.observe(result["step_time"])
        for phase in metrics.PPO_PHASES:
            metrics.PPO_PHASE_SECONDS.labels(phase).set(timings.get(phase, 0.0))
        for gauge, key in (
            (metrics.PPO_REWARD_MEAN, "reward_mean"), (metrics.PPO_REWARD_STD, "reward_std"),
            (metrics.PPO_KL, "kl"), (metrics.PPO_ENTROPY, "entropy"),
            (metrics.PPO_CLIP_FRACTION, "clip_fraction"), (metrics.PPO_VALUE_LOSS, "critic_value_loss"),
            (metrics.PPO_POLICY_LOSS, "policy_loss"), (metrics.PPO_RESPONSE_LENGTH, "response_length"),
            (metrics.PPO_TOKENS_PER_SECOND, "tokens_per_second"),
        ):  # fmt: skip
            if key in result:
                gauge.set(result[key])
        bind_context(step=self.step_index)
        if self.is_main:
            values = {k: v for k, v in self.last_metrics.items() if k != "step"}
            self.metrics_log.log("metrics", self.step_index, values)
            self.metrics_log.flush()
            log.info("ppo step", **{k: round(v, 5) for k, v in self.last_metrics.items()})

    # --- validation --------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        """Greedy responses on the first `num_val_samples` validation prompts, scored by the RM."""
        self.phase = "validate"
        count = min(self.cfg.model.ppo.num_val_samples, len(self.val_prompts))
        # Validation prompts get data positions of their own (negative), so their seeds never
        # collide with training prompts'.
        prompts = [(-1 - i, self.val_prompts.tokens[i]) for i in range(count)]

        def run_validation() -> dict[str, float]:
            samples, _ = self.collector.collect(prompts, self._sampling(greedy=True), self.policy_version)
            rewards = torch.tensor([s.rm_score for s in samples])
            result = {"step": self.step_index, "val_reward_mean": float(rewards.mean()),
                      "val_response_length": float(np.mean([len(s.response) for s in samples]))}  # fmt: skip
            self.metrics_log.log("validation", self.step_index, {k: v for k, v in result.items() if k != "step"})
            self.metrics_log.flush()
            log.info("validation", **result)
            return result

        result = self._on_main("validation", run_validation)
        metrics.PPO_VAL_REWARD.set(result["val_reward_mean"])
        return result

    # --- checkpoints -------------------------------------------------------------------------

    def save(self, with_critic: bool = True) -> Path:
        """An atomic checkpoint: the critic's first (the critic service writes it), then the
        actor's, whose appearance marks the pair complete. Without the critic (it is down), a
        resume keeps whatever critic the service then has."""
        self.phase = "save"
        path = checkpoint.step_checkpoint_path(self.run_dir, self.step_index)
        critic_path = (self.run_dir / CRITIC_CHECKPOINTS / path.name).resolve()
        if with_critic:

            def save_critic() -> None:
                self._check_critic()
                self.scorer.save_critic(str(critic_path))
                self.critic_checkpoint = str(critic_path)

            self._on_main("critic save", save_critic)
        extra = {
            "policy_version": self.policy_version,
            "critic_path": str(critic_path) if with_critic else None,
            "sampler": self.sampler.state_dict(),
        }
        checkpoint.save_checkpoint(
            path, self.actor, self.optimizer, self.scheduler, step=self.step_index, config=to_dict(self.cfg),
            arch=self.arch, tokenizer=self.tokenizer, consumed_samples=self.consumed_samples, extra=extra,
        )  # fmt: skip
        if self.is_main:
            checkpoint.prune_checkpoints(self.run_dir, keep_last=self.cfg.exp_manager.checkpoint_keep_last)
            kept = {p.name for p in checkpoint.list_checkpoints(self.run_dir)}
            for critic_dir in (self.run_dir / CRITIC_CHECKPOINTS).glob("step_*"):
                if critic_dir.name not in kept and critic_dir.name < path.name:
                    shutil.rmtree(critic_dir, ignore_errors=True)
        self.last_saved_step = self.step_index
        log.info("checkpoint saved", path=str(path))
        return path

    def restore(self, path: Path) -> None:
        meta = checkpoint.load_checkpoint(path, self.actor, self.optimizer, self.scheduler)
        extra = meta.extra
        self.step_index = meta.step
        self.consumed_samples = meta.consumed_samples
        self.sampler.load_state_dict(extra["sampler"])
        self.policy_version = extra["policy_version"]
        if extra.get("critic_path"):

            def load_critic() -> None:
                self.critic_step = self.scorer.load_critic(extra["critic_path"])
                self.critic_checkpoint = extra["critic_path"]

            self._on_main("critic load", load_critic)
        else:
            log.warning("checkpoint has no critic state: the critic service keeps its current weights")
            self.critic_step = self._on_main("critic step", self.scorer.critic_step)
        # The steps after the checkpoint run again: what a crashed run logged for them goes.
        self.metrics_log.close()
        self.metrics_log = MetricsLog(self.run_dir, self.cfg.exp_manager, self.cfg, resume_step=self.step_index,
                                      enabled=self.is_main)  # fmt: skip
        log.info("resumed", path=str(path), step=self.step_index)

    # --- the loop ----------------------------------------------------------------------------

    def run(self, progress=None) -> None:
        tcfg = self.cfg.trainer.ppo
        try:
            while self.step_index < self.max_steps and not self._should_stop():
                self.step()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(reward=f"{self.last_metrics['reward_mean']:.3f}",
                                         kl=f"{self.last_metrics['kl']:.3f}")
                done = self.step_index >= self.max_steps
                if tcfg.val_check_interval > 0 and (self.step_index % tcfg.val_check_interval == 0 or done):
                    self.validate()
                if tcfg.save_interval > 0 and (self.step_index % tcfg.save_interval == 0 or done):
                    self.save()
            save_on_stop = self._on_main("stop", lambda: self.save_on_stop) if self.step_index < self.max_steps else False
            if save_on_stop and self.last_saved_step != self.step_index:
                self.save()
        except (ServiceDown, PeerFailed) as failure:
            if isinstance(failure, PeerFailed) and not failure.service_down:
                raise
            # Keep what has been learnt: the actor, and the critic unless it is what went down.
            critic_down = (
                failure.critic_down if isinstance(failure, PeerFailed) else failure.service == self.scorer.critic_service
            )
            log.error("a service stayed down: saving a checkpoint before stopping", step=self.step_index)
            try:
                self.save(with_critic=not critic_down)
            except Exception as exc:  # noqa: BLE001 - the original error matters more
                log.error("checkpoint after service failure failed", error=str(exc))
            raise
        finally:
            self.phase = "done"
            if self.is_main:
                self.collector.close()
                self.critic_pool.shutdown(wait=False)

    def close(self) -> None:
        """Close the service clients and the metric logs (rank 0)."""
        if self.is_main:
            self.scorer.close()
            self.generator.close()
            self.metrics_log.close()
