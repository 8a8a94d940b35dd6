"""NeMo-Aligner's RLHF tutorial, command line by command line, with Aligner.

The command lines are read out of the tutorial itself (tests/fixtures/nemo_aligner_rlhf_tutorial.txt,
copied verbatim): every `python ... <script>.py` line of its code blocks, continuation lines
joined, shell variables expanded from `ENV` (the paths of this test's tiny files, and what Slurm
would set). Only the program and the paths change (`PROGRAMS`, `LITERAL_PATHS`); every key and
value stays as written. How far each line runs on this machine (no GPU, 2 cores, no wandb):

| line | runs |
|---|---|
| data processing | to the end: comparisons and prompts files |
| reward model, terminal | to the end on 8 ranks (`trainer.devices=8`, torchrun like NeMo's launcher): one step, the final model |
| critic server, terminal | serves (one model copy; a notice says the other 7 devices are replicas); Score, Values and Train answer, and the critic's metrics land under `exp_manager.explicit_log_dir` |
| the three Slurm lines | stop at `exp_manager.create_wandb_logger=True` when wandb is not installed, with its one-line reason (PPO: at `trainer.devices=8` first, checked against the job) |
| PPO actor, terminal | every key taken (the NeMo-only ones log their notices), then stops at `trainer.devices=8` against its one process, one line |
| TensorRT-LLM variant | the generation engine's capability check stops it with its one-line reason; the PPO line with the five flags takes them all (notices) |
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "tests" / "fixtures" / "nemo_aligner_rlhf_tutorial.txt"
HH_FIXTURE = ROOT / "tests" / "fixtures" / "hh"

# The tutorial's scripts -> `aligner` commands. download_and_process.py downloads Anthropic-HH;
# here the same conversion runs on local files (its input and output folders are paths).
PROGRAMS = {
    "download_and_process.py": ["data", "hh"],
    "train_reward_model.py": ["train-rm"],
    "serve_ppo_critic.py": ["serve", "ppo-critic"],
    "train_gpt_ppo_actor.py": ["ppo"],
}
# Each line the tutorial has, as (script, Slurm?).
EXPECTED_LINES = [
    ("download_and_process.py", False),
    ("train_reward_model.py", False),
    ("train_reward_model.py", True),
    ("serve_ppo_critic.py", False),
    ("train_gpt_ppo_actor.py", False),
    ("serve_ppo_critic.py", True),
    ("train_gpt_ppo_actor.py", True),
]
TRT_LLM_KEYS = [
    "trainer.ppo.trt_llm.enable", "trainer.ppo.trt_llm.reshard", "trainer.ppo.trt_llm.unload_engine_train",
    "trainer.trt_llm.model_type", "trainer.ppo.batch_iterator.use_flask",
]  # fmt: skip

_PYTHON = re.compile(r"\bpython\s+(?:-u\s+)?(\S+\.py)\b(.*)$")
_VARIABLE = re.compile(r"\$\{(\w+)\}|\$(\w+)")

try:
    import wandb  # noqa: F401

    HAVE_WANDB = True
except ImportError:
    HAVE_WANDB = False


def tutorial_lines(text: str) -> list[tuple[str, bool, str]]:
    """(script, inside a Slurm script, its arguments as written) for every python command line."""
    joined = re.sub(r"\\\s*\n\s*", " ", text)  # continuation lines
    lines = []
    for match in re.finditer(r"^.*$", joined, re.MULTILINE):
        found = _PYTHON.search(match.group(0))
        if found is None:
            continue
        block_start = joined.rfind(".. code-block::", 0, match.start())
        slurm = "#SBATCH" in joined[block_start : match.start()]
        lines.append((Path(found.group(1)).name, slurm, found.group(2).strip()))
    return lines


def trt_llm_flags(text: str) -> list[str]:
    """The `key=value` flags of the "Speed up PPO with TensorRT-LLM" list."""
    section = text[text.index("Speed up PPO with TensorRT-LLM") : text.index("PPO Results with TensorRT-LLM")]
    return re.findall(r"^#\. `([\w.]+=\w+)`", section, re.MULTILINE)


def expand(arguments: str, env: dict[str, str], literal_paths: dict[str, str]) -> list[str]:
    """Shell expansion of the line's variables (each must be in `env`), then its words; a value
    that is one of the tutorial's literal paths becomes this test's path."""
    expanded = _VARIABLE.sub(lambda m: env[m.group(1) or m.group(2)], arguments)
    words = []
    for word in shlex.split(expanded):
        key, eq, value = word.partition("=")
        words.append(f"{key}={literal_paths[value]}" if eq and value in literal_paths else word)
    return words


# ---------------------------------------------------------------------------------------------
# The tiny world the lines run in
# ---------------------------------------------------------------------------------------------

SEQ_LENGTH = 2048  # the tutorial pads scoring batches to 2048 (remote_critic_rm.pad_to_length)
NUM_TRAIN, NUM_TEST = 560, 24  # one RM step and one PPO step of 512 (the tutorial's batch sizes)


def _hh_records(num: int, seed: int) -> list[dict]:
    import random

    from trainer.data.synthetic import sample_pair, sample_task

    rng = random.Random(seed)
    records = []
    for _ in range(num):
        task = sample_task(rng)
        chosen, rejected = sample_pair(rng, task)
        records.append({"chosen": task.prompt + chosen, "rejected": task.prompt + rejected})
    return records


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Anthropic-HH-format input files, a tokenizer, an SFT checkpoint (sequence length 2048), the
    shell variables of the tutorial's scripts and its literal paths."""
    from common.config import ModelArchConfig
    from trainer import parallel
    from trainer.checkpoint import save_checkpoint
    from trainer.model import build_model
    from trainer.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("tutorial")
    hh = root / "hh"
    hh.mkdir()
    for split, num, seed in (("train", NUM_TRAIN, 1), ("test", NUM_TEST, 2)):
        with open(hh / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in _hh_records(num, seed))
    texts = [r["chosen"] for r in _hh_records(200, 3)]
    tokenizer = train_bpe(texts, vocab_size=320, out_dir=root / "tokenizer")
    arch = ModelArchConfig(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2,
                           num_query_groups=1, vocab_size=320, encoder_seq_length=SEQ_LENGTH)  # fmt: skip
    parallel.init_parallel(seed=1)
    save_checkpoint(root / "sft", build_model(arch, seed=1), step=0, arch=arch, tokenizer=tokenizer)
    data = root / "data"  # where download_and_process.py writes its files
    env = {
        "GPFS": str(ROOT), "PYTHONPATH": "", "NAME": "tutorial", "PROJECT": "tutorial",
        "TRAIN_DATA_PATH": str(data / "train_comparisons.jsonl"),
        "VALID_DATA_PATH": str(data / "test_comparisons.jsonl"),
        "PRETRAINED_CHECKPOINT_NEMO_FILE": str(root / "sft"), "PRETRAINED_ACTOR_NEMO_FILE": str(root / "sft"),
        "ACTOR_NEMO_FILE": str(root / "sft"),
        # The reward model the terminal RM line trains ("/results" below).
        "CHECKPOINT_NEMO_FILE": str(root / "results" / "final"), "RM_NEMO_FILE": str(root / "results" / "final"),
        "RESULTS_DIR": str(root / "critic_results_dir"), "CRITIC_LOG_DIR": str(root / "critic_results"),
        "ACTOR_LOG_DIR": str(root / "actor_results"), "CRITIC_NAME": "critic", "ACTOR_NAME": "actor",
        "CRITIC_PORT": "0", "host_critic": "127.0.0.1",
        # What Slurm sets in the scripts' jobs: one node per job here.
        "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NUM_NODES_HET_GROUP_0": "1", "SLURM_JOB_NUM_NODES_HET_GROUP_1": "1",
    }  # fmt: skip
    literal_paths = {
        "/path/to/megatron_gpt_sft.nemo": str(root / "sft"),
        "/results": str(root / "results"),
        "/rlhf/actor_test": str(root / "actor_test"),
    }
    text = TUTORIAL.read_text()
    lines = {(script, slurm): expand(args, env, literal_paths) for script, slurm, args in tutorial_lines(text)}
    return {"root": root, "hh": hh, "data": data, "env": env, "lines": lines, "text": text}


def _command(script: str, args: list[str], world, ranks: int = 1) -> list[str]:
    program = list(PROGRAMS[script])
    if script == "download_and_process.py":
        program += ["--input", str(world["hh"]), "--output", str(world["data"])]
    launcher = [sys.executable, "-m", "services.cli"]
    if ranks > 1:  # what NeMo's launcher (or srun's tasks) does: one process per device
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                    "-m", "services.cli"]  # fmt: skip
    return [*launcher, *program, *args]


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_line(world, key: tuple[str, bool], *, ranks: int = 1, extra: list[str] = (), timeout: float = 600):
    script = key[0]
    args = world["lines"][key] + list(extra)
    return subprocess.run(_command(script, args, world, ranks), cwd=world["root"], env=_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# The lines
# ---------------------------------------------------------------------------------------------


def test_the_tutorial_holds_the_lines_this_file_runs():
    text = TUTORIAL.read_text()
    assert [(script, slurm) for script, slurm, _ in tutorial_lines(text)] == EXPECTED_LINES
    assert [flag.split("=")[0] for flag in trt_llm_flags(text)] == TRT_LLM_KEYS
    # Every line's keys, as written, load into its schema (the PPO lines and the servers' too).
    from common.config import ModelServiceConfig, PpoConfig, TrainRmConfig, load_config

    schemas = {"train_reward_model.py": TrainRmConfig, "serve_ppo_critic.py": ModelServiceConfig,
               "train_gpt_ppo_actor.py": PpoConfig}  # fmt: skip
    env = {name: "1" for pair in _VARIABLE.findall(text) for name in pair if name}  # any value parses
    for script, _slurm, args in tutorial_lines(text):
        if script in schemas:
            load_config(schemas[script], None, expand(args, env, {}))


def test_data_processing(world):
    result = run_line(world, ("download_and_process.py", False), timeout=120)
    assert result.returncode == 0, result.stderr
    pairs = (world["data"] / "train_comparisons.jsonl").read_text().count("\n") // 2
    prompts = (world["data"] / "train_prompts.jsonl").read_text().count("\n")
    assert pairs == NUM_TRAIN and prompts == NUM_TRAIN


@pytest.mark.integration
@pytest.mark.slow
def test_reward_model_terminal_line_trains_on_8_ranks(world):
    if not (world["data"] / "train_comparisons.jsonl").exists():
        test_data_processing(world)
    result = run_line(world, ("train_reward_model.py", False), ranks=8)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = world["root"] / "results"
    assert (run_dir / "final").is_dir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]  # 560 pairs, global batch 512: one step an epoch
    assert list((run_dir / "tensorboard").iterdir())


@pytest.mark.integration
@pytest.mark.skipif(HAVE_WANDB, reason="wandb is installed: the line would train on 8 ranks")
@pytest.mark.parametrize(
    "script, reason",
    [
        ("train_reward_model.py", "aligner train-rm: error: exp_manager.create_wandb_logger: wandb is not installed"),
        ("serve_ppo_critic.py", "aligner serve: error: exp_manager.create_wandb_logger: wandb is not installed"),
        # The actor checks its job size first: 8 devices, one process here.
        ("train_gpt_ppo_actor.py", "aligner ppo: error: trainer.devices: trainer.num_nodes x trainer.devices = 1 x 8"),
    ],
)
def test_slurm_lines_stop_with_one_line(world, script, reason):
    result = run_line(world, (script, True), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert _last_line(result.stderr).startswith(reason), result.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.slow
def test_critic_server_terminal_line_serves_and_logs_training(world):
    import torch

    from services.critic.client import CriticClient
    from services.reward.client import RewardClient

    if not (world["root"] / "results" / "final").is_dir():
        pytest.skip("needs the reward model of the terminal RM line")
    ports = world["root"] / "critic.ports.json"
    log_path = world["root"] / "critic.log"
    args = world["lines"][("serve_ppo_critic.py", False)]
    with open(log_path, "w") as log:  # --ports-file: where the launcher learns the port (like srun -o)
        proc = subprocess.Popen(_command("serve_ppo_critic.py", ["--ports-file", str(ports), *args], world),
                                cwd=world["root"], env=_env(), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not ports.exists():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        target = f"127.0.0.1:{json.loads(ports.read_text())['port']}"
        from common.grpc_client import wait_for_health

        wait_for_health(target, timeout=240)
        sequences = [torch.arange(3, 40), torch.arange(5, 25)]
        critic = CriticClient(target)
        scores = RewardClient(target).score(tokens=sequences)  # the combined server: both services
        values = critic.values(sequences)
        assert len(scores.rewards) == 2 and [len(v) for v in values] == [36, 19]
        masks = [torch.ones(len(s) - 1) for s in sequences]
        critic.train(sequences, masks, [torch.zeros(len(s) - 1) for s in sequences], values, rollout_id="tutorial:1")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    log = log_path.read_text()
    assert proc.returncode == 0, log[-3000:]
    for key in ("trainer.devices=8", "model.mcore_gpt=True", "model.megatron_amp_O2=True"):
        assert f"notice: {key}" in log, key
    records = [json.loads(line) for line in (Path(world["env"]["RESULTS_DIR"]) / "critic.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and "value_loss" in records[0]
    assert list((Path(world["env"]["RESULTS_DIR"]) / "tensorboard").iterdir())


@pytest.mark.integration
def test_ppo_actor_terminal_line_takes_every_key_then_checks_the_job_size(world):
    result = run_line(world, ("train_gpt_ppo_actor.py", False), timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert _last_line(result.stderr).startswith(
        "aligner ppo: error: trainer.devices: trainer.num_nodes x trainer.devices = 1 x 8 but this job has 1"
    ), result.stderr[-3000:]
    for key in ("model.mcore_gpt=True", "model.megatron_amp_O2=True"):
        assert f"notice: {key}" in result.stderr, key


@pytest.mark.integration
def test_trt_llm_variant_reaches_the_engine_check(world):
    from services.generation.trtllm_engine import unavailable_reasons

    if not unavailable_reasons():
        pytest.skip("TensorRT-LLM can run here: the variant needs a full GPU run")
    flags = trt_llm_flags(world["text"])
    # The generation service that trainer.ppo.trt_llm.enable=True asks for.
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "generation",
         f"checkpoint_path={world['env']['ACTOR_NEMO_FILE']}", "engine=tensorrt_llm"],
        cwd=world["root"], env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert _last_line(result.stderr).startswith("aligner serve: error: TensorRT-LLM engine unavailable: "), result.stderr
    # The actor's line with the five flags: every flag taken (the mapped ones say what they mean).
    result = run_line(world, ("train_gpt_ppo_actor.py", False), extra=flags, timeout=300)
    assert result.returncode == 2 and "error: trainer.devices" in _last_line(result.stderr), result.stderr[-3000:]
    for key in ("trainer.ppo.trt_llm.reshard", "trainer.ppo.trt_llm.unload_engine_train",
                "trainer.ppo.batch_iterator.use_flask"):  # fmt: skip
        assert f"notice: {key}=True" in result.stderr or f"notice: {key}=False" in result.stderr, key
