"""A real Prometheus (the Debian package's, on 127.0.0.1) scraping real services: `aligner serve
reward` and `aligner serve generation` on tiny models, under scrape jobs named like the chart's
(aligner-<component>, namespace rlhf) and with the chart's alert rules loaded. After real traffic,
every dashboard query and every alert expression runs through Prometheus' HTTP API: each must
execute, and each services-dashboard panel whose metrics those two services export must return
data, and the PPO dashboard none (no PPO step ran here; test_monitoring_ppo.py scrapes a PPO run).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent import futures
from pathlib import Path

import pytest
from live_prometheus import Process, http_get, panel_queries, start_prometheus, wait_until
from omegaconf import OmegaConf

pytestmark = pytest.mark.integration

TEXTS = [
    "\n\nHuman: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "\n\nHuman: Say something kind.\n\nAssistant: You are doing great, keep going!",
    "\n\nHuman: Count to three.\n\nAssistant: One, two, three.",
]
# Panels that must show data with a reward server and a generation server running.
MUST_HAVE_DATA = {"Up", "Requests / s", "Errors / s", "Latency p50", "Latency p99", "In flight", "Mean batch size",
                  "Requests per batch", "Queue depth", "Sequences / s", "Tokens / s (forward)",
                  "Generated tokens / s"}


def wait_for_file(path: Path, process: Process, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.proc.returncode}:\n{process.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name} did not start in {timeout}s:\n{process.log()}")
        time.sleep(0.1)
    return json.loads(path.read_text())


def tiny_checkpoints(root: Path) -> dict[str, Path]:
    """A tiny reward model and policy with a BPE tokenizer, as the services load them."""
    from common.config import ModelArchConfig
    from trainer import parallel
    from trainer.checkpoint import save_checkpoint
    from trainer.model import build_model
    from trainer.tokenizer import train_bpe

    arch = ModelArchConfig(num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                           num_query_groups=2, vocab_size=320, encoder_seq_length=48)
    tokenizer = train_bpe(TEXTS * 20, vocab_size=300, out_dir=root / "tokenizer")
    parallel.init_parallel(seed=1234)
    save_checkpoint(root / "reward", build_model(arch, value_head=True, seed=11), step=0, arch=arch,
                    tokenizer=tokenizer)
    save_checkpoint(root / "policy", build_model(arch, value_head=False, seed=12), step=0, arch=arch,
                    tokenizer=tokenizer)
    return {"reward": root / "reward", "policy": root / "policy"}


@pytest.fixture(scope="module")
def live(tmp_path_factory, request):
    """Reward and generation servers, traffic through both, and Prometheus scraping them with the
    chart's rules; yields (Prometheus, dashboards module)."""
    from common.config import GenerationServiceConfig, ModelServiceConfig

    workdir = tmp_path_factory.mktemp("prometheus-live")
    checkpoints = tiny_checkpoints(workdir)
    started: list[Process] = []
    request.addfinalizer(lambda: [process.stop() for process in reversed(started)])

    reward_cfg = ModelServiceConfig(name="reward", checkpoint_path=str(checkpoints["reward"]))
    generation_cfg = GenerationServiceConfig(checkpoint_path=str(checkpoints["policy"]), max_batch_size=8)
    ports = {}
    for name, cfg in (("reward", reward_cfg), ("generation", generation_cfg)):
        cfg.server.grace_seconds = 2.0
        config_path = workdir / f"{name}.yaml"
        OmegaConf.save(OmegaConf.structured(cfg), config_path)
        ports_file = workdir / f"{name}.ports.json"
        process = Process(name, [sys.executable, "-m", "services.cli", "serve", name, "--config", str(config_path),
                                 "--ports-file", str(ports_file)], workdir)
        started.append(process)
        ports[name] = (process, ports_file)
    info = {name: wait_for_file(path, process) for name, (process, path) in ports.items()}

    # One scrape job per service as the ServiceMonitor names them, with the chart's rules.
    process, prometheus = start_prometheus(workdir, {f"aligner-{name}": info[name]["metrics_port"] for name in info})
    started.append(process)

    # Traffic: concurrent scores (batched), one malformed request, generations.
    from services.generation.client import GenerationClient
    from services.reward.client import RewardClient

    with RewardClient(f"127.0.0.1:{info['reward']['port']}", timeout=60) as reward:
        with futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: reward.score(texts=[TEXTS[i % 3]] * (1 + i % 3)), range(16)))
        with pytest.raises(Exception):  # noqa: B017 - INVALID_ARGUMENT, counted as an error
            reward.score(tokens=[[10_000]])
    with GenerationClient(f"127.0.0.1:{info['generation']['triton_grpc_port']}",
                          control_url=f"127.0.0.1:{info['generation']['port']}", timeout_s=120) as generation:
        generation.wait_ready(60)
        generation.generate([[5, 6, 7], [8, 9]], max_new_tokens=4, seed=1)

    # Prometheus up, both targets scraped a few times (rates need two samples).
    wait_until(lambda: len(prometheus.series('count_over_time(up{namespace="rlhf"}[1m]) > 3 and up == 1')) == 2,
               60, "Prometheus to scrape both services", process.log)
    yield prometheus


def test_every_dashboard_query_runs_and_services_panels_show_data(live):
    from test_monitoring import selected_metrics

    present = {series["metric"]["__name__"] for series in live.query('{__name__=~"aligner_.+|up", namespace="rlhf"}')["data"]["result"]}
    with_data = set()
    for board, title, expr in panel_queries():
        reply = live.query(expr)
        assert reply["status"] == "success", f"{board} {title}: {reply.get('error')}\n{expr}"
        if reply["data"]["result"]:
            # Every process exports the PPO gauges (as 0); the PPO dashboard shows only processes
            # that finished a step, and no PPO step ran here.
            assert board != "ppo-training.json", f"{title}: data from a process that ran no PPO step"
            with_data.add(title)
        elif board == "services.json" and selected_metrics(expr) <= present:
            pytest.fail(f"{title}: the services export {sorted(selected_metrics(expr))} but the query is empty\n{expr}")
    missing = MUST_HAVE_DATA - with_data
    assert not missing, f"panels without data: {sorted(missing)}"


def test_alert_rules_load_and_every_expression_runs(live):
    rules = json.loads(http_get(f"{live.url}/api/v1/rules"))["data"]["groups"]
    loaded = {rule["name"]: rule for group in rules for rule in group["rules"]}
    assert set(loaded) == {"AlignerTrainingStalled", "AlignerKLHigh", "AlignerRewardCollapse", "AlignerServiceDown",
                           "AlignerHighErrorRate"}
    for name, rule in loaded.items():
        assert rule["health"] in ("ok", "unknown"), (name, rule.get("lastError"))
        reply = live.query(rule["query"])
        assert reply["status"] == "success", (name, reply.get("error"))
    # Both services are up, so the service-down expression selects them and finds none down.
    assert len(live.query('up{namespace="rlhf", job=~"aligner-.+"}')["data"]["result"]) == 2
    assert live.query(loaded["AlignerServiceDown"]["query"])["data"]["result"] == []
