"""TRL's `PPOTrainer` (trl 1.12.0, the last release that has it) doing one PPO step per update,
timed. Runs in its own virtual environment (`benchmarks/requirements-trl.txt`), started by
`benchmarks/bench_ppo.py`; it imports nothing from this repository.

    python trl_ppo_step.py SPEC.json

SPEC.json (written by bench_ppo.py): `hf_config` (LlamaConfig kwargs), `tokenizer_dir` (a Hugging
Face tokenizer directory), `prompts` (token id lists, one PPO batch), `response_length`,
`threads`, `warmup_steps`, `steps`, `per_device_train_batch_size`,
`gradient_accumulation_steps`, `seed`, and `lockstep`.

The models are random-init `LlamaForCausalLM` (policy; the reference is TRL's copy of it) and
`LlamaForSequenceClassification` with one label (reward model, value model), the shapes TRL wants.
One update = generate responses for the batch, reference logprobs, values, rewards, advantages,
then `num_ppo_epochs=1` epoch of policy + value training (one optimizer step over
`per_device_train_batch_size * gradient_accumulation_steps` rollouts). Each update is timed from
one `on_step_end` callback to the next (the first, warm-up ones are dropped); TRL's
`batch_generation` is wrapped to time generation inside the update.

With `lockstep`, the caller paces the updates, to interleave them with other contenders: the
script prints `TRL_READY` when training starts and `TRL_STEP:{"seconds": .., "generate": ..}`
after each update, and each time waits for a line on stdin before going on (the wait is not
timed). At the end it prints one line `TRL_RESULT_JSON:{...}` with the per-step seconds.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

MARKER = "TRL_RESULT_JSON:"
STEP_MARKER = "TRL_STEP:"


def main(spec_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(int(spec["seed"]))

    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"], padding_side="left")
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    config = LlamaConfig(**(spec["hf_config"] | ids))
    policy = LlamaForCausalLM(config)
    value_config = LlamaConfig(**(spec["hf_config"] | ids), num_labels=1)
    reward_model = LlamaForSequenceClassification(value_config)
    value_model = LlamaForSequenceClassification(value_config)

    prompts = spec["prompts"]
    batch = int(spec["per_device_train_batch_size"]) * int(spec["gradient_accumulation_steps"])
    if len(prompts) != batch:
        raise SystemExit(f"trl_ppo_step: {len(prompts)} prompts but one PPO batch is {batch}")
    dataset = Dataset.from_dict({"input_ids": prompts})
    total_steps = int(spec["warmup_steps"]) + int(spec["steps"])

    # Generation time inside each update: TRL calls the module-level `batch_generation`.
    generation_seconds: list[float] = []
    original_batch_generation = ppo_module.batch_generation

    def timed_batch_generation(*args, **kwargs):
        start = time.perf_counter()
        result = original_batch_generation(*args, **kwargs)
        generation_seconds.append(time.perf_counter() - start)
        return result

    ppo_module.batch_generation = timed_batch_generation

    lockstep = bool(spec.get("lockstep", False))
    durations: list[float] = []
    eos_counts: list[float] = []
    started = [0.0]

    def wait_for_caller(message: str) -> None:
        print(message, flush=True)
        if not sys.stdin.readline():
            raise SystemExit("trl_ppo_step: stdin closed by the caller")

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if lockstep:
                wait_for_caller("TRL_READY")
            started[0] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            durations.append(time.perf_counter() - started[0])
            if lockstep:
                step = {
                    "seconds": durations[-1],
                    "generate": generation_seconds[-1],
                    "eos_tokens": eos_counts[-1],
                }
                wait_for_caller(STEP_MARKER + json.dumps(step))
            started[0] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "val/num_eos_tokens" in logs:
                eos_counts.append(logs["val/num_eos_tokens"])

    with tempfile.TemporaryDirectory() as out_dir:
        args = PPOConfig(
            output_dir=out_dir,
            per_device_train_batch_size=int(spec["per_device_train_batch_size"]),
            gradient_accumulation_steps=int(spec["gradient_accumulation_steps"]),
            num_mini_batches=1,
            num_ppo_epochs=1,
            local_rollout_forward_batch_size=batch,
            total_episodes=batch * total_steps,
            response_length=int(spec["response_length"]),
            temperature=1.0,
            stop_token="eos",  # responses end at EOS, as ours do
            learning_rate=1e-5,
            num_sample_generations=0,  # no extra sampling between updates
            use_cpu=True,
            bf16=False,  # fp32, as our side (PPOConfig defaults to bf16)
            fp16=False,
            gradient_checkpointing=False,  # ours does not recompute activations either
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=int(spec["seed"]),
            dataloader_num_workers=0,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tokenizer,
            model=policy,
            ref_model=None,  # TRL makes a frozen copy of the policy
            reward_model=reward_model,
            value_model=value_model,
            train_dataset=dataset,
            callbacks=[StepClock()],
        )
        trainer.train()

    if len(durations) != total_steps or len(generation_seconds) != total_steps:
        raise SystemExit(f"trl_ppo_step: expected {total_steps} updates, timed {len(durations)}")
    warm = int(spec["warmup_steps"])
    steps, generate = durations[warm:], generation_seconds[warm:]
    result = {
        "step_seconds": steps,
        "generate_seconds": generate,
        "median_step_seconds": statistics.median(steps),
        "median_generate_seconds": statistics.median(generate),
        "eos_tokens_per_step": eos_counts[warm:],
        "threads": torch.get_num_threads(),
        "versions": {
            "trl": trl.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: trl_ppo_step.py SPEC.json", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
