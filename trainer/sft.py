"""`aligner sft`: supervised fine-tuning, the loss on response tokens only.

    aligner sft [--config FILE] [--resume] [dotted overrides]
    torchrun --nproc-per-node 2 -m services.cli sft trainer.devices=2 ...     (data parallel)

Data: `"model.data.data_prefix={train: [sft_train.jsonl], validation: [sft_val.jsonl]}"` (the
validation split is optional), records `{"prompt", "response"}` or `{"text"}` (docs/data.md):
tokens are [BOS] prompt response [EOS] and only the response tokens and the EOS are trained on
(`trainer.data.datasets.SftDataset`). Schema: `common.config.SftConfig`; loop keys under
`trainer.sft` (max_epochs, max_steps, val_check_interval, save_interval, limit_val_batches,
gradient_clip_val). Run directory, starting weights, checkpoints and resume: `trainer/loop.py`;
the trained model is `<run_dir>/final`.

One optimizer step: the next `model.global_batch_size` examples in the sampler's seeded order;
data-parallel rank r trains on its contiguous share, `model.micro_batch_size` at a time, the
gradients accumulate and are averaged over the ranks. The loss is the mean over every response
token of the global batch, so each token weighs the same whichever micro-batch or rank it lands
on (a 2-rank run computes the same losses as a 1-rank run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.config import SftConfig, load_config
from common.logging import bind_context, configure_logging, get_logger
from trainer import loop

log = get_logger(__name__)

TRAIN_CURVES = ["loss", "lr", "grad_norm"]
VAL_CURVES = ["val_loss"]


@torch.no_grad()
def validation_loss(model, dataset, indices: list[int], micro_batch_size: int, pad_id: int, dp) -> float:
    """Mean next-token loss over the response tokens of `dataset[indices]` (all ranks together)."""
    from trainer.data.datasets import collate_sft
    from trainer.losses import sft_loss

    model.eval()
    nll_sum = num_tokens = 0.0
    for micro in loop.chunks(indices[dp.rank :: dp.size], micro_batch_size):
        batch = collate_sft([dataset[i] for i in micro], pad_id)
        tokens, mask = batch["tokens"].to(model.device), batch["loss_mask"].to(model.device)
        n = float(mask.sum())
        nll_sum += float(sft_loss(model(tokens).logits, tokens, mask)) * n
        num_tokens += n
    model.train()
    nll_sum, num_tokens = loop.sum_over_data_parallel([nll_sum, num_tokens], dp)
    return nll_sum / max(num_tokens, 1.0)


def train(cfg: SftConfig, resume: bool = False) -> Path:
    """Run (or continue) SFT; returns the run directory."""
    from trainer.checkpoint import load_pretrained
    from trainer.data.datasets import EpochSampler, SftDataset, collate_sft, shard
    from trainer.losses import sft_loss
    from trainer.model import build_model
    from trainer.optim import allreduce_gradients, build_optimizer, build_scheduler, optimizer_step
    from trainer.parallel import init_parallel
    from trainer.plots import plot_curves, read_metrics

    torch.set_num_threads(cfg.torch_threads)
    mcfg, tcfg = cfg.model, cfg.trainer.sft
    loop.check_data_impl(mcfg.data.data_impl)
    train_files = loop.data_files(mcfg.data.data_prefix, "train")
    val_files = loop.data_files(mcfg.data.data_prefix, "validation", required=False)
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

    max_length = min(mcfg.data.seq_length, arch.encoder_seq_length)
    train_set = SftDataset(train_files, tokenizer, max_length)
    val_set = SftDataset(val_files, tokenizer, max_length) if val_files else None
    num_steps = loop.total_steps(tcfg, len(train_set), mcfg.global_batch_size, "sft")
    log.info("sft data", train=len(train_set), truncated=train_set.num_truncated,
             dropped=train_set.num_dropped, validation=len(val_set) if val_set else 0, steps=num_steps,
             micro_batches_per_step=accumulation)  # fmt: skip

    model = build_model(arch, value_head=False, seed=cfg.seed)
    if resume_from is None and pretrained:
        load_pretrained(pretrained, model)
    optimizer = build_optimizer(model, mcfg.optim)
    scheduler = build_scheduler(optimizer, mcfg.optim, num_steps)
    sampler = EpochSampler(len(train_set), seed=cfg.seed, shuffle=mcfg.data.shuffle)
    step, consumed = 0, 0
    if resume_from is not None:
        step, consumed = loop.restore_step_checkpoint(resume_from, model, optimizer, scheduler, sampler)

    if dp.is_main:
        loop.save_config(run_dir, cfg)
    metrics = loop.MetricsLog(run_dir, cfg.exp_manager, cfg, resume_step=step, enabled=dp.is_main)
    val_indices = (
        loop.validation_indices(len(val_set), mcfg.global_batch_size, tcfg.limit_val_batches)
        if val_set
        else []
    )

    # --- the loop -----------------------------------------------------------------------------
    model.train()
    progress = tqdm(total=num_steps, initial=step, desc="sft", unit="step", disable=not dp.is_main)
    while step < num_steps:
        started = time.perf_counter()
        examples = [train_set[i] for i in shard(sampler.take(mcfg.global_batch_size), dp.rank, dp.size)]
        # Every response token of the global batch weighs the same: normalise by their total.
        (num_tokens,) = loop.sum_over_data_parallel([sum(float(e["loss_mask"].sum()) for e in examples)], dp)
        nll_sum = 0.0
        for micro in loop.chunks(examples, mcfg.micro_batch_size):
            batch = collate_sft(micro, tokenizer.pad_id)
            tokens, mask = batch["tokens"].to(model.device), batch["loss_mask"].to(model.device)
            n = mask.sum()
            loss = sft_loss(model(tokens).logits, tokens, mask)  # mean over this micro-batch's tokens
            # Weighted by its share of the global batch's tokens; x dp.size because the gradient
            # all-reduce averages over the ranks.
            (loss * n * dp.size / max(num_tokens, 1.0)).backward()
            nll_sum += float(loss.detach()) * float(n)
        lr = optimizer.param_groups[0]["lr"]
        allreduce_gradients(model, dp.group)
        grad_norm = optimizer_step(model, optimizer, scheduler, tcfg.gradient_clip_val, dp.tp_group)
        (nll_sum,) = loop.sum_over_data_parallel([nll_sum], dp)
        step += 1
        consumed += mcfg.global_batch_size
        loss_value = nll_sum / max(num_tokens, 1.0)
        metrics.log("metrics", step, {
            "loss": loss_value, "lr": lr, "grad_norm": grad_norm, "response_tokens": num_tokens,
            "consumed_samples": consumed, "epoch": consumed / len(train_set),
            "step_time": time.perf_counter() - started,
        })  # fmt: skip
        progress.update(1)
        progress.set_postfix(loss=f"{loss_value:.4f}")

        if val_indices and loop.is_boundary(step, tcfg.val_check_interval, num_steps):
            val_loss = validation_loss(
                model, val_set, val_indices, mcfg.micro_batch_size, tokenizer.pad_id, dp
            )
            metrics.log("validation", step, {"val_loss": val_loss})
            log.info("validation", step=step, val_loss=round(val_loss, 5))
        if loop.is_boundary(step, tcfg.save_interval, num_steps) or step == num_steps:
            loop.save_step_checkpoint(
                run_dir, step, model, optimizer, scheduler, sampler, cfg=cfg, arch=arch, tokenizer=tokenizer,
                consumed_samples=consumed, keep_last=cfg.exp_manager.checkpoint_keep_last,
            )  # fmt: skip
            metrics.flush()
    progress.close()

    # --- outputs ------------------------------------------------------------------------------
    final = loop.save_final(run_dir, step, model, cfg=cfg, arch=arch, tokenizer=tokenizer)
    metrics.close()
    if dp.is_main:
        plot_curves(
            read_metrics(run_dir / "metrics.jsonl"), TRAIN_CURVES, run_dir / "sft_curves.png", title="SFT"
        )
        plot_curves(read_metrics(run_dir / "validation.jsonl"), VAL_CURVES, run_dir / "sft_validation.png")
        log.info("sft finished", steps=step, final_model=str(final), run_dir=str(run_dir))
    return run_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aligner sft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--config", help="YAML config (schema: common.config.SftConfig)")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the run directory's last checkpoint"
    )
    parser.add_argument("--log-format", choices=["json", "console"], default="console")
    parser.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. trainer.sft.max_steps=100 ++model.optim.lr=1e-3"
    )
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(SftConfig, args.config, args.overrides)
    configure_logging("sft", fmt=args.log_format)
    train(cfg, resume=args.resume)
    return 0
