"""Quiet by default: `aligner --help` and a short `aligner sft` run write no warnings to stderr;
the benign-warning filters match exact texts only and `--verbose` lifts them; tritonserver gets
`--allow-gpu-metrics False` where NVML cannot load; `aligner demo` shows a stage's progress bars,
warnings and prints, not its info records; the launcher says what it stopped."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import structlog

from common import logging as aligner_logging

ROOT = Path(__file__).resolve().parents[2]
MEGATRON_OPTIMIZER_WARNING = "Transformer Engine and Apex are not installed. Falling back to Torch optimizers."


@pytest.fixture
def clean_env():
    """os.environ as it was before the test (quiet_third_party sets defaults in it)."""
    saved = dict(os.environ)
    os.environ.pop(aligner_logging.VERBOSE_ENV, None)
    yield os.environ
    os.environ.clear()
    os.environ.update(saved)


def _shown(message: str, category: type[Warning], module: str) -> bool:
    """Whether a warning attributed to `module` gets through the filters now in place."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module, registry={})
    return bool(caught)


def test_benign_warnings_are_filtered_by_exact_text_category_and_module(clean_env):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        aligner_logging.quiet_third_party()
        assert not _shown(MEGATRON_OPTIMIZER_WARNING, UserWarning, "megatron.core.optimizer")
        assert _shown(MEGATRON_OPTIMIZER_WARNING + " And more.", UserWarning, "megatron.core.optimizer")
        assert _shown(MEGATRON_OPTIMIZER_WARNING, UserWarning, "megatron.core.optimizer.other")
        assert _shown(MEGATRON_OPTIMIZER_WARNING, RuntimeWarning, "megatron.core.optimizer")
        assert _shown("something new", UserWarning, "megatron.core.optimizer")


def test_verbose_shows_every_warning_and_debug_records(clean_env):
    aligner_logging.set_verbose()
    with warnings.catch_warnings():
        aligner_logging.quiet_third_party()
        assert _shown(MEGATRON_OPTIMIZER_WARNING, UserWarning, "megatron.core.optimizer")
        assert _shown("a deprecation", DeprecationWarning, "megatron.core.tensor_parallel.layers")
        stream = io.StringIO()
        aligner_logging.configure_logging("test", fmt="console", stream=stream)
        logging.getLogger("megatron.core.distributed.fsdp.src.megatron_fsdp.x").debug("picked an implementation")
    assert logging.getLogger().level == logging.DEBUG
    assert "picked an implementation" in stream.getvalue()


def test_chatty_third_party_info_is_hidden_by_default(clean_env):
    stream = io.StringIO()
    with warnings.catch_warnings():
        aligner_logging.configure_logging("test", fmt="console", stream=stream)
    logging.getLogger("megatron.core.distributed.fsdp.src.megatron_fsdp.mixed_precision").info("Using Megatron-FSDP")
    logging.getLogger("pytriton.triton").info("Infer function available as model")
    logging.getLogger("pytriton.triton").warning("a real problem")
    logging.getLogger("trainer.sft").info("ours")
    text = stream.getvalue()
    assert "Using Megatron-FSDP" not in text and "Infer function" not in text
    assert "a real problem" in text and "ours" in text


@pytest.mark.parametrize("nvml", [False, True])
def test_tritonserver_gpu_metrics_are_off_only_where_nvml_cannot_load(nvml, clean_env, monkeypatch):
    from pytriton.triton import Triton, TritonConfig

    monkeypatch.setattr(aligner_logging, "_nvml_loadable", lambda: nvml)
    os.environ.pop("PYTRITON_TRITON_CONFIG_ALLOW_GPU_METRICS", None)
    with warnings.catch_warnings():
        aligner_logging.quiet_third_party()
    # How the generation service builds it (services/generation/server.py start_triton).
    triton = Triton(config=TritonConfig(http_address="127.0.0.1", grpc_address="127.0.0.1"))
    try:
        args = triton._triton_server_config.to_args_list()
    finally:
        triton.stop()
    gpu_metrics = args[args.index("--allow-gpu-metrics") + 1] if "--allow-gpu-metrics" in args else None
    assert gpu_metrics == (None if nvml else "False")


def test_grpc_core_info_lines_are_off_unless_set(clean_env):
    os.environ.pop("GRPC_VERBOSITY", None)
    with warnings.catch_warnings():
        aligner_logging.quiet_third_party()
    assert os.environ["GRPC_VERBOSITY"] == "ERROR"
    os.environ["GRPC_VERBOSITY"] = "DEBUG"
    with warnings.catch_warnings():
        aligner_logging.quiet_third_party()
    assert os.environ["GRPC_VERBOSITY"] == "DEBUG"


def test_the_global_verbose_flag_reaches_the_environment(clean_env):
    from services import cli

    assert cli.main(["--verbose", "doctor", "--kind", "ppo"]) == 2  # a one-line usage error, quickly
    assert os.environ[aligner_logging.VERBOSE_ENV] == "1"


def test_the_demo_console_shows_bars_warnings_and_prints_not_info_records():
    from services.demo import StageConsole

    output = (
        b"2026-12-02T13:27:17.299972Z [info     ] sft data  [trainer.sft] steps=2\n"
        b"  an info record's second line\n"
        b"sft:   0%|          | 0/2 [00:00<?, ?step/s]\rsft:  50%|#####     | 1/2 [00:00<00:00]"
        b"2026-12-02T13:27:18.436434Z [info     ] validation [trainer.sft] val_loss=6.1\n"
        b"\rsft: 100%|##########| 2/2 [00:00<00:00]\n"
        b"2026-12-02T13:27:18.5Z [warning  ] disk almost full [trainer.checkpoint]\n"
        b"  its detail line\n"
        b"wrote runs/tok: vocab 512\n"
    )
    expected_off_terminal = (
        b"sft: 100%|##########| 2/2 [00:00<00:00]\n"
        b"2026-12-02T13:27:18.5Z [warning  ] disk almost full [trainer.checkpoint]\n"
        b"  its detail line\n"
        b"wrote runs/tok: vocab 512\n"
    )
    for chunk_size in (1, 7, len(output)):  # however the pipe splits it
        out = io.BytesIO()
        console = StageConsole(out, tty=False)
        for start in range(0, len(output), chunk_size):
            console.feed(output[start : start + chunk_size])
        console.close()
        assert out.getvalue() == expected_off_terminal, chunk_size

    out = io.BytesIO()
    console = StageConsole(out, tty=True)
    console.feed(output)
    console.close()
    shown = out.getvalue()
    assert b"\rsft:  50%|#####     | 1/2 [00:00<00:00]\x1b[K" in shown  # redrawn in place
    assert b"info" not in shown and b"second line" not in shown

    out = io.BytesIO()
    console = StageConsole(out, tty=False, show_all=True)
    console.feed(output)
    console.close()
    assert b"sft data" in out.getvalue() and b"an info record's second line" in out.getvalue()


def test_the_launcher_says_what_it_stopped(tmp_path):
    from services.launch.processes import ServiceProcess

    service = ServiceProcess(name="reference", config_path=tmp_path / "c.yaml", overrides=[],
                             log_path=tmp_path / "log", ports_file=tmp_path / "ports")  # fmt: skip
    service.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    with structlog.testing.capture_logs() as logs:
        code = service.stop()
    assert code == -15
    assert {"event": "service stopped", "service": "reference", "pid": service.proc.pid, "exit_code": -15,
            "log_level": "info"} in logs  # fmt: skip


def test_aligner_help_writes_nothing_to_stderr():
    done = subprocess.run([sys.executable, "-m", "services.cli", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "doctor" in done.stdout
    assert done.stderr == ""


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_a_short_sft_run_writes_no_warnings(tmp_path):
    from trainer.data import synthetic
    from trainer.data.datasets import read_texts
    from trainer.tokenizer import train_bpe

    data = tmp_path / "data"
    synthetic.generate(data, seed=3, num_train=48, num_test=16)
    train_bpe(read_texts(data / "sft_train.jsonl"), vocab_size=320, out_dir=data / "tok")
    args = [
        "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=160", "model.num_attention_heads=4",
        "model.num_query_groups=2", "model.vocab_size=512", "model.encoder_seq_length=64", "model.data.seq_length=64",
        "torch_threads=1", f"tokenizer_path={data / 'tok'}", f"exp_manager.explicit_log_dir={tmp_path / 'run'}",
        f"model.data.data_prefix={{train: [{data / 'sft_train.jsonl'}], validation: [{data / 'sft_val.jsonl'}]}}",
        "model.global_batch_size=8", "model.micro_batch_size=4", "trainer.sft.max_steps=2",
        "trainer.sft.val_check_interval=2", "trainer.sft.save_interval=2", "trainer.sft.limit_val_batches=1",
    ]  # fmt: skip
    env = {key: value for key, value in os.environ.items() if key != aligner_logging.VERBOSE_ENV}
    env["PYTHONWARNINGS"] = "default"  # DeprecationWarnings too, as pytest and -W show them
    done = subprocess.run([sys.executable, "-m", "services.cli", "sft", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sft finished" in done.stderr
    noise = [line for line in done.stderr.splitlines()
             if "Warning" in line or "[warning" in line or "py.warnings" in line or "megatron_fsdp" in line]  # fmt: skip
    assert noise == []
