"""`aligner train-rm`: a Bradley-Terry reward model on preference pairs.

    aligner train-rm [--config FILE] [--resume] [dotted overrides]
    torchrun --nproc-per-node 2 -m services.cli train-rm trainer.devices=2 ...   (data parallel)

It takes the seed's (NeMo-Aligner's) command lines, e.g.

    aligner train-rm pretrained_checkpoint.restore_from_path=runs/sft/final \\
        ++model.micro_batch_size=2 ++model.global_batch_size=16 ++model.data.data_impl=jsonl \\
        "model.data.data_prefix={train: [train_comparisons.jsonl], validation: [test_comparisons.jsonl], test: [test_comparisons.jsonl]}" \\
        exp_manager.explicit_log_dir=runs/rm trainer.rm.val_check_interval=10 \\
        trainer.rm.save_interval=50 trainer.rm.limit_val_batches=8 trainer.rm.max_epochs=1

Data: comparisons files where lines 2i and 2i+1 are the chosen and the rejected full texts of one
pair (`{"text": ...}`); an odd number of lines or an empty file is an error. Schema:
`common.config.TrainRmConfig`; loop keys under `trainer.rm`. Run directory, starting weights,
checkpoints and resume: `trainer/loop.py`; the trained reward model is `<run_dir>/final`, and the
test split's accuracy and loss at the end are in `<run_dir>/test_metrics.json`.

Model: the starting (SFT) trunk plus a value head; the reward of a text is the head's output at
its last token. Encoding convention (`encode_for_reward`, shared with the reward service): BOS,
the prompt, the response, EOS, the prompt and response (split at the last Assistant marker,
`trainer/data/format.py`) encoded separately exactly as SFT examples and PPO rollouts are, so
the reward is read at the EOS whether the sequence came from text or from a rollout.

`model.global_batch_size` and `model.micro_batch_size` count pairs. One optimizer step: the next
global batch of pairs in the sampler's seeded order; each data-parallel rank trains on its share
with gradient accumulation; loss = mean over the global batch of -log sigmoid(r_chosen -
r_rejected), accuracy = fraction of pairs with r_chosen > r_rejected. See docs/ppo.md (reward
model) for the maths.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.config import TrainRmConfig, load_config
from common.logging import bind_context, configure_logging, get_logger
from trainer import loop

log = get_logger(__name__)

TRAIN_CURVES = ["loss", "accuracy", "lr", "grad_norm"]
VAL_CURVES = ["val_accuracy", "val_loss"]
TEST_METRICS_FILE = "test_metrics.json"


def encode_for_reward(tokenizer, text: str) -> list[int]:
    """The token ids a reward model scores for `text`: [BOS] + prompt + response + [EOS], prompt
    and response encoded separately (a text without dialogue markers is all response). The
    reward is the value head's output at the last id, the EOS."""
    from trainer.data.datasets import encode_dialogue

    return encode_dialogue(tokenizer, text)[0]


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of a `collate_comparisons` batch (rows :B chosen, B: rejected) -> ([B], [B])."""
    tokens, lengths = batch["tokens"].to(model.device), batch["lengths"].to(model.device)
    values = model(tokens).values  # [2B, L]
    rewards = values[torch.arange(len(lengths), device=values.device), lengths - 1]
    half = len(lengths) // 2
    return rewards[:half], rewards[half:]


@torch.no_grad()
def evaluate_pairs(
    model, dataset, indices: list[int], micro_batch_size: int, pad_id: int, dp
) -> dict[str, float]:
    """Bradley-Terry loss and accuracy over `dataset[indices]`, all data-parallel ranks together."""
    from trainer.data.datasets import collate_comparisons
    from trainer.losses import bradley_terry_loss

    was_training = model.training
    model.eval()
    loss_sum = correct = reward_chosen = reward_rejected = 0.0
    for micro in loop.chunks(indices[dp.rank :: dp.size], micro_batch_size):
        chosen, rejected = pair_rewards(model, collate_comparisons([dataset[i] for i in micro], pad_id))
        loss, accuracy = bradley_terry_loss(chosen, rejected)
        loss_sum += float(loss) * len(micro)
        correct += float(accuracy) * len(micro)
        reward_chosen += float(chosen.sum())
        reward_rejected += float(rejected.sum())
    model.train(was_training)
    loss_sum, correct, reward_chosen, reward_rejected = loop.sum_over_data_parallel(
        [loss_sum, correct, reward_chosen, reward_rejected], dp
    )
    n = max(len(indices), 1)
    return {
        "loss": loss_sum / n, "accuracy": correct / n, "num_pairs": len(indices),
        "reward_chosen_mean": reward_chosen / n, "reward_rejected_mean": reward_rejected / n,
    }  # fmt: skip


def train(cfg: TrainRmConfig, resume: bool = False) -> Path:
    """Run (or continue) reward-model training; returns the run directory."""
    from trainer.checkpoint import load_pretrained
    from trainer.data.datasets import ComparisonDataset, EpochSampler, collate_comparisons, shard
    from trainer.losses import bradley_terry_loss
    from trainer.model import build_model
    from trainer.optim import allreduce_gradients, build_optimizer, build_scheduler, optimizer_step
    from trainer.parallel import init_parallel
    from trainer.plots import plot_curves, read_metrics

    torch.set_num_threads(cfg.torch_threads)
    mcfg, tcfg = cfg.model, cfg.trainer.rm
    loop.check_data_impl(mcfg.data.data_impl)
    files = {
        split: loop.data_files(mcfg.data.data_prefix, split) for split in ("train", "validation", "test")
    }
    loop.check_loggers(cfg.exp_manager)

    # --- processes, run directory, model, tokenizer, data ------------------------------------
    init_parallel(mcfg.tensor_model_parallel_size, mcfg.pipeline_model_parallel_size, seed=cfg.seed)
    loop.check_world_size(cfg.trainer.num_nodes, cfg.trainer.devices)
    dp = loop.data_parallel()
    bind_context(rank=torch.distributed.get_rank())  # every rank logs; say which
    accumulation = loop.check_batch_sizes(mcfg.global_batch_size, mcfg.micro_batch_size, dp.size)
    run_dir = loop.run_directory(cfg.exp_manager)
    resume_from = loop.find_resume_checkpoint(run_dir, resume, cfg.exp_manager)
    pretrained = cfg.pretrained_checkpoint.restore_from_path
    arch = loop.starting_arch(mcfg, resume_from or pretrained)
    tokenizer = loop.load_tokenizer(cfg.tokenizer_path, [pretrained, resume_from], arch)

    # Pairs longer than the model's context are dropped (cutting them would cut off the EOS).
    max_length = min(mcfg.data.seq_length, arch.encoder_seq_length)
    data = {split: ComparisonDataset(paths, tokenizer, max_length) for split, paths in files.items()}
    train_set, val_set, test_set = data["train"], data["validation"], data["test"]
    num_steps = loop.total_steps(tcfg, len(train_set), mcfg.global_batch_size, "rm")
    log.info("rm data", steps=num_steps, micro_batches_per_step=accumulation,
             **{f"{s}_pairs": len(d) for s, d in data.items()},
             **{f"{s}_dropped": d.num_dropped for s, d in data.items()})  # fmt: skip

    model = build_model(arch, value_head=True, seed=cfg.seed)
    if resume_from is None and pretrained:
        load_pretrained(pretrained, model)  # an SFT trunk keeps the fresh value head
    # The reward comes from the value head: the LM output layer never gets a gradient. Frozen,
    # it stays out of the optimizer (whose checkpointed state then covers every parameter).
    if getattr(model.gpt.output_layer, "weight", None) is not None:  # None when tied to the embedding
        model.gpt.output_layer.weight.requires_grad_(False)
    optimizer = build_optimizer(model, mcfg.optim)
    scheduler = build_scheduler(optimizer, mcfg.optim, num_steps)
    sampler = EpochSampler(len(train_set), seed=cfg.seed, shuffle=mcfg.data.shuffle)
    step, consumed = 0, 0
    if resume_from is not None:
        step, consumed = loop.restore_step_checkpoint(resume_from, model, optimizer, scheduler, sampler)

    if dp.is_main:
        loop.save_config(run_dir, cfg)
    metrics = loop.MetricsLog(run_dir, cfg.exp_manager, cfg, resume_step=step, enabled=dp.is_main)
    val_indices = loop.validation_indices(len(val_set), mcfg.global_batch_size, tcfg.limit_val_batches)
    pairs_per_rank = mcfg.global_batch_size // dp.size

    # --- the loop -----------------------------------------------------------------------------
    model.train()
    progress = tqdm(total=num_steps, initial=step, desc="train-rm", unit="step", disable=not dp.is_main)
    while step < num_steps:
        started = time.perf_counter()
        pairs = [train_set[i] for i in shard(sampler.take(mcfg.global_batch_size), dp.rank, dp.size)]
        loss_sum = correct = 0.0
        for micro in loop.chunks(pairs, mcfg.micro_batch_size):
            chosen, rejected = pair_rewards(model, collate_comparisons(micro, tokenizer.pad_id))
            loss, accuracy = bradley_terry_loss(chosen, rejected)  # means over this micro-batch
            # Each pair weighs 1/global batch; the gradient all-reduce averages over the ranks.
            (loss * len(micro) / pairs_per_rank).backward()
            loss_sum += float(loss.detach()) * len(micro)
            correct += float(accuracy) * len(micro)
        lr = optimizer.param_groups[0]["lr"]
        allreduce_gradients(model, dp.group)
        grad_norm = optimizer_step(model, optimizer, scheduler, tcfg.gradient_clip_val, dp.tp_group)
        loss_sum, correct = loop.sum_over_data_parallel([loss_sum, correct], dp)
        step += 1
        consumed += mcfg.global_batch_size
        record = {"loss": loss_sum / mcfg.global_batch_size, "accuracy": correct / mcfg.global_batch_size}
        metrics.log("metrics", step, {
            **record, "lr": lr, "grad_norm": grad_norm, "consumed_samples": consumed,
            "epoch": consumed / len(train_set), "step_time": time.perf_counter() - started,
        })  # fmt: skip
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")

        if val_indices and loop.is_boundary(step, tcfg.val_check_interval, num_steps):
            result = evaluate_pairs(model, val_set, val_indices, mcfg.micro_batch_size, tokenizer.pad_id, dp)
            metrics.log("validation", step, {"val_loss": result["loss"], "val_accuracy": result["accuracy"]})
            log.info(
                "validation",
                step=step,
                val_loss=round(result["loss"], 5),
                val_accuracy=round(result["accuracy"], 4),
            )
        if loop.is_boundary(step, tcfg.save_interval, num_steps) or step == num_steps:
            loop.save_step_checkpoint(
                run_dir, step, model, optimizer, scheduler, sampler, cfg=cfg, arch=arch, tokenizer=tokenizer,
                consumed_samples=consumed, keep_last=cfg.exp_manager.checkpoint_keep_last,
            )  # fmt: skip
            metrics.flush()
    progress.close()

    # --- outputs: the final model, the test split, plots --------------------------------------
    final = loop.save_final(run_dir, step, model, cfg=cfg, arch=arch, tokenizer=tokenizer)
    test = evaluate_pairs(
        model, test_set, list(range(len(test_set))), mcfg.micro_batch_size, tokenizer.pad_id, dp
    )
    test.update(step=step, num_dropped=test_set.num_dropped, checkpoint=str(final), files=files["test"])
    metrics.close()
    if dp.is_main:
        (run_dir / TEST_METRICS_FILE).write_text(json.dumps(test, indent=2) + "\n")
        plot_curves(
            read_metrics(run_dir / "metrics.jsonl"),
            TRAIN_CURVES,
            run_dir / "rm_curves.png",
            title="Reward model",
        )
        plot_curves(read_metrics(run_dir / "validation.jsonl"), VAL_CURVES, run_dir / "rm_validation.png",
                    title="Reward model: validation")  # fmt: skip
        log.info("rm finished", steps=step, test_accuracy=round(test["accuracy"], 4),
                 test_loss=round(test["loss"], 5), final_model=str(final))  # fmt: skip
    return run_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aligner train-rm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", help="YAML config (schema: common.config.TrainRmConfig)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last checkpoint"
    )
    parser.add_argument("--log-format", choices=["json", "console"], default="console")
    parser.add_argument("overrides", nargs="*", help="dotted overrides (seed style: key=value, ++key=value)")
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(TrainRmConfig, args.config, args.overrides)
    configure_logging("train-rm", fmt=args.log_format)
    train(cfg, resume=args.resume)
    return 0
