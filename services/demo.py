"""`aligner demo [--workdir runs/demo]`: the whole pipeline on a tiny model, on CPU.

1. synthetic data with a hidden ground truth (`aligner data synthetic`)
2. a byte-level BPE tokenizer (`aligner tokenizer train`)
3. SFT (`aligner sft`), then the reward model (`aligner train-rm`) from the SFT model
4. generation, reward-critic and reference as local services (`aligner up`'s launcher)
5. PPO over them (`aligner ppo`)
6. the SFT and PPO policies on held-out prompts, scored by the reward model and the ground truth
7. `report.md` and PNG plots in the work directory

Each stage runs as the same command a user would type (printed as it starts), configured by
`configs/demo/*.yaml`. A stage whose output exists is skipped, and the trainers resume, so an
interrupted demo continues where it stopped. `--fresh` starts over.

The console shows each stage's progress bars, its warnings and errors and what it prints, then the
report; everything a stage writes goes to `<workdir>/logs/<stage>.log` (and each service's log to
`<workdir>/services/logs/`). `aligner --verbose demo` shows every line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common.config import LaunchConfig
from common.errors import AlignerError
from common.logging import configure_logging, verbose

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"

# A stage's output, as the console renderer of common.logging and tqdm write it.
_RECORD = re.compile(rb"\d{4}-\d\d-\d\dT[\d:.]+Z \[(\w+)\s*\]")  # "2026-...Z [info     ] event ..."
_BAR = re.compile(rb"^[\w-]+: +\d+%\|")  # tqdm: "sft:  50%|#####     | 1/2 [00:01<00:01, ...]"
_SHOWN_LEVELS = {b"warning", b"error", b"critical", b"exception"}


class StageConsole:
    """What the console shows of a stage's output: its progress bars (redrawn in place on a
    terminal; elsewhere only the last state of each), records at warning and above, and plain
    lines (what the command prints, tracebacks). Info records, and their continuation lines, stay
    in the stage's log file. With --verbose every line is shown."""

    def __init__(self, out, tty: bool, show_all: bool = False):
        self.out, self.tty, self.show_all = out, tty, show_all
        self.pending = b""
        self.bar = b""  # the bar drawn last and not yet ended by a newline
        self.continuation_shown = True  # indented lines follow the record (or line) above them

    def feed(self, data: bytes) -> None:
        # tqdm redraws with "\r", records end with "\n": either ends a piece.
        pieces = re.split(rb"[\r\n]", self.pending + data)
        self.pending = pieces.pop()
        for piece in pieces:
            self._piece(piece)

    def close(self) -> None:
        if self.pending:
            self._piece(self.pending)
            self.pending = b""
        self._end_bar()

    def _piece(self, text: bytes) -> None:
        if not text.strip():
            return
        if _BAR.match(text):
            # A record written while a bar is drawn lands on the bar's line: split it off.
            glued = _RECORD.search(text)
            self.bar = text[: glued.start()] if glued else text
            if self.tty:
                self._write(b"\r" + self.bar + b"\x1b[K")  # \x1b[K: clear what a longer bar left
            if glued:
                self._piece(text[glued.start() :])
            return
        record = _RECORD.match(text)
        if record:
            shown = self.continuation_shown = record.group(1).lower() in _SHOWN_LEVELS
        elif text[:1].isspace():
            shown = self.continuation_shown
        else:
            shown = self.continuation_shown = True
        if shown or self.show_all:
            self._end_bar()
            self._write(text + b"\n")

    def _end_bar(self) -> None:
        if self.bar:
            self._write(b"\n" if self.tty else self.bar + b"\n")
            self.bar = b""

    def _write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()


def _aligner(stage: str, args: list[str], log_dir: Path, threads: int) -> float:
    """Run `aligner <args>` as a subprocess: all of its output to a log file, the part a person
    follows (`StageConsole`) to the console."""
    print(f"\n== {stage}: aligner {' '.join(args)}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    console = StageConsole(sys.stdout.buffer, tty=sys.stdout.isatty(), show_all=verbose())
    with open(log_dir / f"{stage}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=env)  # fmt: skip
        # Read what is there, not line by line: tqdm's redraws end in "\r", not "\n".
        while chunk := os.read(proc.stdout.fileno(), 65536):
            log.write(chunk)
            console.feed(chunk)
        console.close()
        code = proc.wait()
    if code != 0:
        raise AlignerError(f"stage {stage} failed (exit {code}); log: {log_dir / f'{stage}.log'}")
    return time.perf_counter() - started


def _model_overrides() -> list[str]:
    arch = yaml.safe_load((CONFIGS / "model.yaml").read_text())
    return [f"model.{key}={value}" for key, value in arch.items()]


def _data_prefix(train: Path, validation: Path, test: Path | None = None) -> str:
    splits = {"train": [str(train)], "validation": [str(validation)]} | ({"test": [str(test)]} if test else {})
    return "model.data.data_prefix=" + json.dumps(splits).replace('"', "")


def run_pipeline(work: Path, ppo_steps: int | None, ppo_config: Path = CONFIGS / "ppo.yaml") -> dict[str, float]:
    data, tokenizer, logs = work / "data", work / "tokenizer", work / "logs"
    sft_dir, rm_dir, ppo_dir = work / "sft", work / "rm", work / "ppo"
    timings: dict[str, float] = {}

    if not (data / "ground_truth.json").exists():
        timings["data"] = _aligner("data", ["data", "synthetic", "--output", str(data), "--seed", "1234"], logs, 1)
    if not (tokenizer / "tokenizer.json").exists():
        timings["tokenizer"] = _aligner("tokenizer", ["tokenizer", "train", "--input", str(data / "sft_train.jsonl"),
                                                      "--vocab-size", "512", "--out", str(tokenizer)], logs, 1)
    if not (sft_dir / "final").exists():
        timings["sft"] = _aligner("sft", [
            "sft", "--config", str(CONFIGS / "sft.yaml"), *_model_overrides(), f"tokenizer_path={tokenizer}",
            _data_prefix(data / "sft_train.jsonl", data / "sft_val.jsonl"), f"exp_manager.explicit_log_dir={sft_dir}",
        ], logs, 2)  # fmt: skip
    if not (rm_dir / "final").exists():
        timings["reward_model"] = _aligner("rm", [
            "train-rm", "--config", str(CONFIGS / "rm.yaml"), f"pretrained_checkpoint.restore_from_path={sft_dir / 'final'}",
            _data_prefix(data / "train_comparisons.jsonl", data / "test_comparisons.jsonl", data / "test_comparisons.jsonl"),
            f"exp_manager.explicit_log_dir={rm_dir}",
        ], logs, 2)  # fmt: skip

    from services.launch.processes import ServiceGroup
    from services.launch.up import ppo_overrides, service_processes

    # The critic saves its checkpoints into the PPO run's folder, inside the work directory.
    launch = LaunchConfig(run_dir=str(work / "services"), policy_checkpoint=str(sft_dir / "final"),
                          reward_checkpoint=str(rm_dir / "final"), torch_threads=1,
                          reward=["model.optim.lr=1e-4", "model.optim.sched.warmup_steps=0",
                                  f"server.checkpoint_root={work.resolve()}"])  # fmt: skip
    print("\n== services: generation, reward-critic, reference on 127.0.0.1", flush=True)
    started = time.perf_counter()
    with ServiceGroup(service_processes(launch), timeout_s=launch.startup_timeout_s) as group:
        timings["services_start"] = time.perf_counter() - started
        steps = [f"trainer.ppo.max_steps={ppo_steps}"] if ppo_steps else []
        timings["ppo"] = _aligner("ppo", [
            "ppo", "--config", str(ppo_config), *ppo_overrides(group, combined=True), *steps,
            f"pretrained_checkpoint.restore_from_path={sft_dir / 'final'}",
            _data_prefix(data / "train_prompts.jsonl", data / "test_prompts.jsonl"),
            f"exp_manager.explicit_log_dir={ppo_dir}",
        ], logs, 1)  # fmt: skip
    return timings


def evaluate(work: Path) -> dict:
    """SFT vs PPO policy on the held-out prompts: reward model, ground truth, KL to the SFT policy."""
    import torch
    from tqdm import tqdm

    from trainer.checkpoint import load_model_for_inference
    from trainer.data.datasets import read_texts
    from trainer.data.synthetic import ground_truth_score
    from trainer.policy_eval import evaluate_policy

    torch.set_num_threads(2)
    prompts = read_texts(work / "data" / "test_prompts.jsonl")[:128]
    sft, _, tokenizer = load_model_for_inference(work / "sft" / "final")
    ppo, _, _ = load_model_for_inference(work / "ppo")  # the run's latest checkpoint
    reward_model, _, _ = load_model_for_inference(work / "rm" / "final", value_head=True)
    results = {}
    runs = [(name, policy, mode, greedy) for name, policy in (("sft", sft), ("ppo", ppo))
            for mode, greedy in (("greedy", True), ("sampled", False))]  # fmt: skip
    for name, policy, mode, greedy in tqdm(runs, desc="evaluation", unit="run"):
        result = evaluate_policy(policy, reward_model, tokenizer, prompts, max_new_tokens=24, greedy=greedy,
                                 seed=7, reference=sft, ground_truth=ground_truth_score)  # fmt: skip
        results[f"{name}_{mode}"] = result.as_dict() | {"examples": result.examples[:4]}
    return results


def write_report(work: Path, timings: dict[str, float], results: dict, total_s: float) -> Path:
    from trainer.plots import read_metrics

    ppo_steps = read_metrics(work / "ppo" / "metrics.jsonl")
    rm_test = json.loads((work / "rm" / "test_metrics.json").read_text())
    kls = [r["kl"] for r in ppo_steps]
    rows = [
        f"| {name} | {r['reward_mean']:.3f} | {r['ground_truth_mean']:.3f} | {r['kl_to_reference']:.3f} | "
        f"{r['response_length']:.1f} | {r['ended_fraction']:.2f} |"
        for name, r in results.items()
    ]
    improved = results["ppo_sampled"]["ground_truth_mean"] > results["sft_sampled"]["ground_truth_mean"]
    lines = [
        "# Aligner demo report", "",
        "Synthetic task: \"say WORD N times\" with a hidden ground truth (`trainer/data/synthetic.py`).", "",
        f"- Reward model test accuracy: **{rm_test['accuracy']:.2%}** (loss {rm_test['loss']:.3f})",
        f"- PPO steps: {len(ppo_steps)}; training KL (sum over response tokens, per sequence): first "
        f"{kls[0]:.3f}, last {kls[-1]:.3f}, max {max(kls):.3f}",
        f"- Ground truth (sampled responses): SFT {results['sft_sampled']['ground_truth_mean']:.3f} -> PPO "
        f"{results['ppo_sampled']['ground_truth_mean']:.3f} ({'raised' if improved else 'NOT raised'})",
        f"- Wall time: {total_s / 60:.1f} min (" + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + ")", "",
        "| policy | RM reward | ground truth | KL to SFT | response tokens | ended |",
        "|---|---|---|---|---|---|", *rows, "",
        "![PPO curves](ppo/ppo_curves.png)", "", "![PPO validation](ppo/ppo_validation.png)", "",
        "## Example responses (greedy)", "",
    ]  # fmt: skip
    for name in ("sft_greedy", "ppo_greedy"):
        lines.append(f"### {name}")
        for ex in results[name]["examples"]:
            lines.append(f"- `{ex['prompt'].strip()}` -> `{ex['response'].strip()}` (reward {ex['reward']:.2f}, "
                         f"truth {ex['ground_truth']:.2f})")  # fmt: skip
        lines.append("")
    report = work / "report.md"
    report.write_text("\n".join(lines))
    (work / "report.json").write_text(json.dumps({"timings": timings, "results": results, "rm_test": rm_test,
                                                  "total_seconds": total_s}, indent=2))  # fmt: skip
    return report


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="aligner demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/demo", help="where every stage writes (default runs/demo)")
    parser.add_argument("--ppo-steps", type=int, help="override trainer.ppo.max_steps of configs/demo/ppo.yaml")
    parser.add_argument("--ppo-config", type=Path, default=CONFIGS / "ppo.yaml", help="the PPO stage's config")
    parser.add_argument("--fresh", action="store_true", help="delete the work directory first")
    args = parser.parse_args(argv)
    configure_logging("demo", fmt="console")  # the launcher's lines: which service started, its pid and ports
    work = Path(args.workdir).resolve()
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timings = run_pipeline(work, args.ppo_steps, args.ppo_config)
    print("\n== evaluation: SFT vs PPO on held-out prompts", flush=True)
    eval_started = time.perf_counter()
    results = evaluate(work)
    timings["evaluation"] = time.perf_counter() - eval_started
    report = write_report(work, timings, results, time.perf_counter() - started)
    print("\n" + report.read_text().split("\n## Example")[0])
    print(f"report: {report}")
    return 0
