"""One whole PPO step: our orchestrator over the services (gRPC on loopback), the same step with
the services in the orchestrator's process (`services/orchestrator/in_process.py`), and TRL's
`PPOTrainer` (trl 1.12.0, `benchmarks/trl_ppo_step.py` in its own virtual environment) doing the
same work.

The work (issue #6's speed goal): the tiny Llama of the benchmarks (2 layers, hidden 128, vocab
512; policy, reference, reward model and critic all that size, random init, fp32), 16 prompts of
8-24 tokens (the same token ids on both sides), 32 new tokens sampled at temperature 1 (ending
early at EOS), then one PPO epoch: one optimizer step over the 16 rollouts in micro-batches of 4,
for the actor and for the critic. Ours runs `PpoRun.step()` (`services/orchestrator/run.py`) as
`aligner ppo` does, with the services started by the local launcher (`services/launch`); its
step reports the phases (generate, score, logprobs, actor_train, critic_train, weight_sync).

Threads (two cores shared by everyone): each of our service processes and the orchestrator run
`BENCH_SERVICE_THREADS` / `BENCH_THREADS` torch threads (default 1 each: four processes on two
cores); TRL is one process and is timed at each of `BENCH_TRL_THREADS` (default "1,2": one thread
like each of our processes, and both cores). `ratio_vs_trl` is against the TRL setting with the
lower median.

Timing: the contenders take turns, one whole step each per round (TRL waits between its updates,
`lockstep` in trl_ppo_step.py), the order rotating every round, so load from other processes on
the shared cores hits all alike. One warm-up round, then `BENCH_PPO_STEPS` rounds (default 7):
`seconds` is a contender's median step time and `best_seconds` its fastest (load only ever adds
time); the ratios are medians over rounds of the per-round ratios.

Knobs (environment): BENCH_PPO_STEPS, BENCH_TRL_THREADS, BENCH_SERVICE_THREADS,
BENCH_PPO_ROLLOUT_MICRO (rollout micro-batch: generation requests per call; default 16),
BENCH_PPO_GENERATION_OVERRIDES (space-separated overrides for the generation service, e.g.
"max_queue_delay_us=20000"), BENCH_SKIP_TRL=1 (ours only).
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from benchmarks.harness import ARCH, threads

HERE = Path(__file__).resolve().parent
TRL_VENV = HERE / ".venv-trl"
TRL_REQUIREMENTS = HERE / "requirements-trl.txt"

PROMPTS, NEW_TOKENS, MICRO_BATCH = 16, 32, 4
PHASES = ("generate", "score", "logprobs", "actor_train", "critic_train", "weight_sync")
GRPC, LOCAL = "aligner-grpc", "aligner-inprocess"
TEXTS = [
    f"{a} {b} said the {c} {n} times, and then the {d} answered."
    for n, (a, b, c, d) in enumerate(
        [
            ("alice", "quickly", "fox", "dog"),
            ("bob", "slowly", "cat", "owl"),
            ("carol", "twice", "bird", "bee"),
        ]
        * 40
    )
]


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


# ---------------------------------------------------------------------------------------------
# Shared setup: tokenizer, prompts, checkpoints
# ---------------------------------------------------------------------------------------------


def make_setup(root: Path) -> dict:
    """Tokenizer (byte-level BPE, vocab 512), 16 prompts as jsonl, random-init policy and reward
    model checkpoints of the benchmark's tiny Llama."""
    from trainer import parallel
    from trainer.checkpoint import save_checkpoint
    from trainer.data.datasets import PromptDataset
    from trainer.model import build_model
    from trainer.tokenizer import train_bpe

    tokenizer = train_bpe(TEXTS, vocab_size=ARCH.vocab_size, out_dir=root / "tokenizer")
    # Prompts of 8-24 tokens: word salad from the tokenizer's vocabulary, decoded to text (the
    # orchestrator reads text); both sides get the token ids the orchestrator reads back.
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(7, 24, (PROMPTS,), generator=g).tolist()
    texts = [tokenizer.decode(torch.randint(3, ARCH.vocab_size, (n,), generator=g).tolist()) for n in lengths]
    prompts_path = root / "prompts.jsonl"
    prompts_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prompt_ids = PromptDataset(prompts_path, tokenizer).tokens

    parallel.init_parallel(seed=1234)
    policy = build_model(ARCH, value_head=False, seed=1)
    reward = build_model(ARCH, value_head=True, seed=2)
    save_checkpoint(root / "policy", policy, step=0, arch=ARCH, tokenizer=tokenizer)
    save_checkpoint(root / "reward", reward, step=0, arch=ARCH, tokenizer=tokenizer)
    return {
        "root": root,
        "tokenizer": root / "tokenizer",
        "prompts": prompts_path,
        "prompt_ids": prompt_ids,
        "policy": root / "policy",
        "reward": root / "reward",
    }


# ---------------------------------------------------------------------------------------------
# TRL
# ---------------------------------------------------------------------------------------------


def ensure_trl_venv() -> Path:
    """benchmarks/.venv-trl with requirements-trl.txt installed (again when the file changes)."""
    python = TRL_VENV / "bin" / "python"
    stamp = TRL_VENV / ".requirements.sha256"
    digest = hashlib.sha256(TRL_REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    print(f"bench_ppo: installing TRL into {TRL_VENV} (a few minutes, once)", file=sys.stderr, flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-r",
            str(TRL_REQUIREMENTS),
        ],
        check=True,
    )
    stamp.write_text(digest + "\n")
    return python


class TrlProcess:
    """`trl_ppo_step.py` in lockstep: each `step()` lets TRL run one PPO update and returns its
    timing ({"seconds", "generate", "eos_tokens"})."""

    def __init__(self, setup: dict, n_threads: int, steps: int):
        from trainer import hf

        spec = {
            "hf_config": hf.hf_config_from_arch(ARCH),
            "tokenizer_dir": str(setup["tokenizer"]),
            "prompts": setup["prompt_ids"],
            "response_length": NEW_TOKENS,
            "threads": n_threads,
            "warmup_steps": 1,
            "steps": steps,
            "per_device_train_batch_size": MICRO_BATCH,
            "gradient_accumulation_steps": PROMPTS // MICRO_BATCH,
            "seed": 0,
            "lockstep": True,
        }
        root = setup["root"]
        spec_path = root / f"trl_spec_{n_threads}.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = root / f"trl_{n_threads}.log"
        env = dict(os.environ, OMP_NUM_THREADS=str(n_threads), MKL_NUM_THREADS=str(n_threads))
        env.pop("PYTHONPATH", None)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [str(ensure_trl_venv()), str(HERE / "trl_ppo_step.py"), str(spec_path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=root,
            )

    def _read(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix) :].strip()
        code = self.proc.wait()
        tail = "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-5:])
        raise RuntimeError(f"trl_ppo_step.py exited {code} before {prefix!r}: {tail}")

    def wait_ready(self) -> None:
        self._read("TRL_READY")

    def step(self) -> dict:
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self._read("TRL_STEP:"))

    def finish(self) -> dict:
        """Let the last update end; TRL's own summary (versions, ...)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.close()
        return json.loads(self._read("TRL_RESULT_JSON:"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def ppo_config(setup: dict, run_dir: Path, overrides: list[str], n_threads: int, rollout_micro: int):
    from omegaconf import OmegaConf

    from common.config import PpoConfig, load_config

    prompts = str(setup["prompts"])
    yaml = {
        "seed": 1234,
        "torch_threads": n_threads,
        "control_port": -1,
        "metrics_port": -1,
        "pretrained_checkpoint": {"restore_from_path": str(setup["policy"])},
        "trainer": {"ppo": {"max_steps": 1000, "val_check_interval": 0, "save_interval": 0}},
        "model": {
            "encoder_seq_length": ARCH.encoder_seq_length,
            "global_batch_size": PROMPTS,
            "micro_batch_size": MICRO_BATCH,
            "data": {"data_prefix": {"train": [prompts], "validation": [prompts]}},
            "ppo": {
                "num_rollout_samples": PROMPTS,
                "rollout_micro_batch_size": rollout_micro,
                "forward_micro_batch_size": PROMPTS,
                "length_params": {"max_length": NEW_TOKENS, "min_length": 0},
            },
        },
        "exp_manager": {"explicit_log_dir": str(run_dir)},
    }
    path = run_dir / "ppo.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(yaml), path)
    return load_config(PpoConfig, path, overrides)


def service_configs(group) -> dict:
    """Each launched service's config, as that service loaded it (its YAML + overrides)."""
    from common.config import GenerationServiceConfig, ModelServiceConfig, load_config

    schemas = {"generation": GenerationServiceConfig}
    return {
        s.name: load_config(schemas.get(s.name, ModelServiceConfig), s.config_path, s.overrides)
        for s in group.services
    }


@contextmanager
def launched_services(setup: dict, service_threads: int, generation_overrides: list[str] = ()):
    """generation, reward-critic and reference as processes on 127.0.0.1 (`services/launch`);
    yields (the ServiceGroup, the `aligner ppo` overrides pointing at it, each service's config
    as that service loaded it). Stopped on exit."""
    from common.config import LaunchConfig
    from services.launch.processes import ServiceGroup
    from services.launch.up import ppo_overrides, service_processes

    launch = LaunchConfig(
        run_dir=str(setup["root"] / "services"),
        policy_checkpoint=str(setup["policy"]),
        reward_checkpoint=str(setup["reward"]),
        tokenizer_path=str(setup["tokenizer"]),
        combine_rm_and_critic_server=True,
        torch_threads=service_threads,
        # The critic takes one optimizer step over the rollout in micro-batches of 4, as the actor.
        reward=[f"model.global_batch_size={PROMPTS}", f"model.micro_batch_size={MICRO_BATCH}"],
        generation=list(generation_overrides),
    )
    with ServiceGroup(service_processes(launch), timeout_s=launch.startup_timeout_s) as group:
        yield group, ppo_overrides(group, combined=True), service_configs(group)


@contextmanager
def ppo_runs(setup: dict, n_threads: int, service_threads: int, rollout_micro: int, generation_overrides=()):
    """{GRPC: a PpoRun over the launched services, LOCAL: a PpoRun over the same services'
    components in this process}, both connected (the initial policy pushed to generation)."""
    from services.orchestrator.in_process import InProcessServices
    from services.orchestrator.run import PpoRun

    root = setup["root"]
    with launched_services(setup, service_threads, generation_overrides) as (_group, overrides, configs):
        local = InProcessServices(configs["reward-critic"], configs["reference"], configs["generation"])
        runs = {
            GRPC: PpoRun(ppo_config(setup, root / GRPC, overrides, n_threads, rollout_micro), root / GRPC),
            LOCAL: PpoRun(ppo_config(setup, root / LOCAL, overrides, n_threads, rollout_micro), root / LOCAL,
                          scorer=local.scorer, generator=local.generator),
        }  # fmt: skip
        try:
            for run in runs.values():
                run.connect()
            yield runs
        finally:
            for run in runs.values():
                run.collector.close()
                run.critic_pool.shutdown(wait=True)
                run.close()
            local.close()


# ---------------------------------------------------------------------------------------------
# Rounds and rows
# ---------------------------------------------------------------------------------------------


def rounds(contenders: dict[str, Callable[[], dict]], count: int) -> dict[str, list[dict]]:
    """Each contender's step results over `count` rounds (after a warm-up round); within a round
    every contender steps once, and the order rotates from round to round."""
    names = list(contenders)
    results: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(1 + count):
        shift = i % len(names)
        times = {}
        for name in names[shift:] + names[:shift]:
            result = contenders[name]()
            times[name] = result.get("seconds", result.get("step_time"))
            if i > 0:
                results[name].append(result)
        print(f"bench_ppo: round {i}{' (warm-up)' if i == 0 else ''}: "
              + ", ".join(f"{n} {t:.2f}s" for n, t in times.items()), file=sys.stderr, flush=True)  # fmt: skip
    return results


def _median(values) -> float:
    return statistics.median(float(v) for v in values)


def _phase_seconds(result: dict, phase: str) -> float:
    """A phase's time in one step; "other" is what no phase covers (critic_train's span holds
    actor_train, which runs alongside it)."""
    if phase != "other":
        return float(result.get(f"time_{phase}", 0.0))
    covered = ("generate", "score", "logprobs", "critic_train", "weight_sync")
    return float(result["step_time"]) - sum(float(result.get(f"time_{p}", 0.0)) for p in covered)


def run() -> list[dict]:
    n_threads = threads()
    service_threads = _env_int("BENCH_SERVICE_THREADS", 1)
    steps = _env_int("BENCH_PPO_STEPS", 7)
    rollout_micro = _env_int("BENCH_PPO_ROLLOUT_MICRO", PROMPTS)
    trl_threads = [int(t) for t in os.environ.get("BENCH_TRL_THREADS", "1,2").split(",") if t.strip()]
    if os.environ.get("BENCH_SKIP_TRL") == "1":
        trl_threads = []
    work = f"{PROMPTS} prompts x {NEW_TOKENS} new tokens, 1 PPO epoch, micro-batch {MICRO_BATCH}"

    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp, ExitStack() as stack:
        setup = make_setup(Path(tmp))
        # TRL imports and builds its models while our services start; neither is timed.
        trl: dict[str, TrlProcess] = {}
        errors: list[dict] = []
        for t in trl_threads:
            name = f"trl-ppotrainer threads={t}"
            try:
                trl[name] = TrlProcess(setup, t, steps)
                stack.callback(trl[name].close)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append({"benchmark": "ppo_step", "variant": name, "error": f"TRL not started: {exc}"})
        generation_overrides = os.environ.get("BENCH_PPO_GENERATION_OVERRIDES", "").split()
        runs = stack.enter_context(
            ppo_runs(setup, n_threads, service_threads, rollout_micro, generation_overrides)
        )
        for name, process in list(trl.items()):
            try:
                process.wait_ready()
            except RuntimeError as exc:
                errors.append({"benchmark": "ppo_step", "variant": name, "error": str(exc)})
                del trl[name]
        contenders = {name: process.step for name, process in trl.items()}
        contenders |= {variant: run.step for variant, run in runs.items()}
        results = rounds(contenders, steps)
        summaries = {name: process.finish() for name, process in trl.items()}

    seconds = {name: [r["seconds"] for r in results[name]] for name in trl}
    seconds |= {variant: [r["step_time"] for r in results[variant]] for variant in (GRPC, LOCAL)}
    best_trl = min(trl, key=lambda name: _median(seconds[name]), default=None)

    rows: list[dict] = list(errors)
    for name, summary in summaries.items():
        rows.append(
            {
                "benchmark": "ppo_step",
                "variant": name,
                "seconds": _median(seconds[name]),
                "best_seconds": min(seconds[name]),
                "notes": f"trl {summary['versions']['trl']}, torch {summary['versions']['torch']}; {work}; "
                f"EOS tokens per step {[r['eos_tokens'] for r in results[name]]}",
            }
        )
    for variant in (GRPC, LOCAL):
        row = {
            "benchmark": "ppo_step",
            "variant": variant,
            "seconds": _median(seconds[variant]),
            "best_seconds": min(seconds[variant]),
            "notes": f"{service_threads} thread(s) per service, {n_threads} orchestrator; {work}; rollout "
            f"micro-batch {rollout_micro}; mean response {_median(r['response_length'] for r in results[variant]):.1f}",
        }
        if best_trl is not None:
            per_round = [t / o for t, o in zip(seconds[best_trl], seconds[variant], strict=True)]
            row["ratio_vs_trl"] = _median(per_round)
        rows.append(row)
    # Same seeds and weights: both variants sample and score the same rollouts.
    same = max(
        abs(a["reward_mean"] - b["reward_mean"]) for a, b in zip(results[GRPC], results[LOCAL], strict=True)
    )
    rows.append(
        {
            "benchmark": "ppo_transport",
            "variant": "grpc / in-process",
            "seconds": _median(seconds[GRPC]) - _median(seconds[LOCAL]),
            "ratio": _median(g / loc for g, loc in zip(seconds[GRPC], seconds[LOCAL], strict=True)),
            "notes": "ratio: step time over gRPC on loopback / in process (median of rounds); seconds: "
            f"difference of the medians; same rollouts both ways (largest reward_mean difference {same:.1e})",
        }
    )
    notes = {
        "critic_train": "wall time from the critic's start to its end; actor_train runs inside it",
        "other": "the rest of the step: rollout tensors, advantages, metrics and logs",
    }
    for variant in (GRPC, LOCAL):
        for phase in (*PHASES, "other"):
            rows.append(
                {
                    "benchmark": "ppo_phase",
                    "variant": variant,
                    "phase": phase,
                    "seconds": _median(_phase_seconds(r, phase) for r in results[variant]),
                    "notes": notes.get(phase, ""),
                }
            )
    for name in trl:
        rows.append(
            {
                "benchmark": "ppo_phase",
                "variant": name,
                "phase": "generate",
                "seconds": _median(r["generate"] for r in results[name]),
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
