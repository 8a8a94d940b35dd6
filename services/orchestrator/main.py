"""`aligner ppo --config FILE [--resume] [dotted overrides]`: a PPO run over the services."""

from __future__ import annotations

import argparse
import signal
import sys
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

from common.config import PpoConfig, ServerConfig, load_config, to_yaml
from common.logging import bind_context, configure_logging, get_logger
from trainer.plots import plot_curves, read_metrics

log = get_logger(__name__)

STOPPED_EARLY = 3  # exit code of a run stopped (Stop RPC, SIGTERM/SIGINT) before max_steps
CURVES = ["reward_mean", "kl", "entropy", "clip_fraction", "critic_value_loss", "response_length"]


def run_directory(cfg: PpoConfig, run_id: str) -> Path:
    if cfg.exp_manager.explicit_log_dir:
        return Path(cfg.exp_manager.explicit_log_dir)
    return Path(cfg.exp_manager.exp_dir) / cfg.exp_manager.name / run_id


def write_plots(run_dir: Path) -> None:
    plot_curves(read_metrics(run_dir / "metrics.jsonl"), CURVES, run_dir / "ppo_curves.png", title="PPO")
    plot_curves(read_metrics(run_dir / "validation.jsonl"), ["val_reward_mean"], run_dir / "ppo_validation.png")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aligner ppo", description=__doc__,
                                     epilog="Several actor ranks: torchrun --nproc-per-node N -m services.cli ppo ...")
    parser.add_argument("--config", help="YAML config (schema: common.config.PpoConfig)")
    parser.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    parser.add_argument("--log-format", choices=["json", "console"], default="console")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.ppo.max_steps=15")
    args = parser.parse_args(argv)
    cfg = load_config(PpoConfig, args.config, args.overrides)
    torch.set_num_threads(cfg.torch_threads)

    from trainer.parallel import init_parallel

    init_parallel(cfg.model.tensor_model_parallel_size, cfg.model.pipeline_model_parallel_size, cfg.seed)
    run_id = [cfg.run_id or uuid.uuid4().hex[:12]]
    torch.distributed.broadcast_object_list(run_id, src=0)  # every torchrun rank: one run, one directory
    run_id = run_id[0]
    configure_logging("orchestrator", fmt=args.log_format)
    bind_context(run_id=run_id)
    run_dir = run_directory(cfg, run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "ppo_config.yaml").write_text(to_yaml(cfg))

    from services.orchestrator.control import ControlServer
    from services.orchestrator.run import PpoRun
    from trainer.checkpoint import latest_checkpoint

    run = PpoRun(cfg, run_dir, run_id=run_id)
    control = None
    if cfg.control_port >= 0 and run.is_main:  # one control plane per run: rank 0's
        control = ControlServer(run, run_id, ServerConfig(host=cfg.host, port=cfg.control_port, metrics_port=cfg.metrics_port,
                                                          auth_token_file=cfg.control_auth_token_file)).start()
        log.info("control server", port=control.port, metrics_port=control.metrics_port, run_dir=str(run_dir))
    # SIGTERM/SIGINT: finish the step in flight, save, exit (Kubernetes sends SIGTERM on eviction).
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: run.stop_requested.set())
    try:
        last = latest_checkpoint(run_dir)
        if last is not None and (args.resume or cfg.exp_manager.resume_if_exists):
            run.restore(last)
        elif args.resume:
            log.warning("--resume: no checkpoint in the run directory, starting fresh", run_dir=str(run_dir))
        run.connect()
        with tqdm(total=run.max_steps, initial=run.step_index, desc="ppo", unit="step",
                  disable=not run.is_main) as progress:
            run.run(progress)
    finally:
        run.close()
        if run.is_main:
            write_plots(run_dir)
        if control is not None:
            control.stop()
    max_steps = run.max_steps  # trainer.ppo.max_steps, capped by max_epochs over the prompts
    if run.step_index < max_steps:  # a Stop request or a signal ended it early
        saved = " (checkpoint saved)" if run.last_saved_step == run.step_index else ""
        print(f"aligner ppo: stopped on request at step {run.step_index} of {max_steps}{saved}", file=sys.stderr)
        return STOPPED_EARLY
    log.info("ppo finished", step=run.step_index, run_dir=str(run_dir))
    return 0
