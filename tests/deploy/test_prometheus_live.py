"""A real Prometheus (the Debian package's, on 127.0.0.1) scraping real services: `aligner serve
reward` and `aligner serve generation` on tiny models, under scrape jobs named like the chart's
(aligner-<component>, namespace rlhf) and with the chart's alert rules loaded. After real traffic,
every dashboard query and every alert expression runs through Prometheus' HTTP API: each must
execute, and each services-dashboard panel whose metrics those two services export must return
data, and the PPO dashboard none (no PPO step ran; a PPO run scraped here is still to do).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent import futures
from pathlib import Path

import pytest
import yaml
from deploy_support import ROOT, find_tool
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Process:
    """A subprocess with its log in a file; stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], workdir: Path):
        self.name = name
        self.log_path = workdir / f"{name}.log"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for_file(path: Path, process: Process, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited with {process.proc.returncode}:\n{process.log()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{process.name} did not start in {timeout}s:\n{process.log()}")
        time.sleep(0.1)
    return json.loads(path.read_text())


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read()


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str) -> dict:
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        try:
            return json.loads(http_get(url))
        except urllib.error.HTTPError as exc:  # 400: the query did not parse or execute
            return json.loads(exc.read())


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

    promtool_dir = Path(find_tool("promtool")).parent
    prometheus_bin = promtool_dir / "prometheus"
    if not prometheus_bin.is_file():
        pytest.fail("prometheus not found beside promtool: run `make tools`", pytrace=False)
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

    # The chart's rules (default values), and one scrape job per service as the ServiceMonitor names them.
    from test_monitoring import rules_module

    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules_module.render_rules(), sort_keys=False, width=1000))
    scrape = [{"job_name": f"aligner-{name}", "honor_labels": True, "scrape_interval": "1s",
               "static_configs": [{"targets": [f"127.0.0.1:{info[name]['metrics_port']}"],
                                   "labels": {"namespace": "rlhf"}}]} for name in info]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["rules.yaml"],
              "scrape_configs": scrape}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = f"127.0.0.1:{free_port()}"
    started.append(Process("prometheus", [str(prometheus_bin), f"--config.file={workdir / 'prometheus.yml'}",
                                          f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address={web}"],
                           workdir))
    prometheus = Prometheus(f"http://{web}")

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
    deadline = time.monotonic() + 60
    while True:
        try:
            scraped = prometheus.query('count_over_time(up{namespace="rlhf"}[1m]) > 3 and up == 1')
            if len(scraped.get("data", {}).get("result", [])) == 2:
                break
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"Prometheus did not scrape both services:\n{started[-1].log()}")
        time.sleep(0.5)
    yield prometheus


def panel_queries():
    from test_monitoring import dashboards_module, grafana_substituted

    for name, build in dashboards_module.DASHBOARDS.items():
        board = json.loads(dashboards_module.render(build))
        for panel in board["panels"]:
            for target in panel.get("targets") or []:
                yield name, panel["title"], grafana_substituted(target["expr"]).replace("[1m]", "[30s]")


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
