"""A real Prometheus (the Debian package's, beside promtool) on 127.0.0.1 for the live monitoring
tests: one scrape job per process, named as the chart's ServiceMonitor names them (the Kubernetes
Service: aligner-<component>, namespace rlhf), every second, with the chart's alert rules loaded;
queries go through the HTTP API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from deploy_support import ROOT, find_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return reply.read()


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


class Prometheus:
    def __init__(self, url: str):
        self.url = url

    def query(self, expr: str, at: float | None = None) -> dict:
        """An instant query, evaluated now or at Unix time `at`."""
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        url = f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}"
        try:
            return json.loads(http_get(url))
        except urllib.error.HTTPError as exc:  # 400: the query did not parse or execute
            return json.loads(exc.read())

    def series(self, expr: str, at: float | None = None) -> list[dict]:
        """The result of a query that must succeed; [] while Prometheus is not answering yet."""
        try:
            reply = self.query(expr, at)
        except (urllib.error.URLError, ConnectionError):
            return []
        assert reply["status"] == "success", (expr, reply.get("error"))
        return reply["data"]["result"]

    def rules(self) -> dict[str, dict]:
        groups = json.loads(http_get(f"{self.url}/api/v1/rules"))["data"]["groups"]
        return {rule["name"]: rule for group in groups for rule in group["rules"]}


def start_prometheus(workdir: Path, targets: dict[str, int]) -> tuple[Process, Prometheus]:
    """Prometheus scraping 127.0.0.1:<port> as job <name> for each of `targets`, with the chart's
    rules (default values) evaluated every second. The caller stops the returned Process."""
    from test_monitoring import rules_module

    prometheus_bin = Path(find_tool("promtool")).parent / "prometheus"
    if not prometheus_bin.is_file():
        pytest.fail("prometheus not found beside promtool: run `make tools`", pytrace=False)
    (workdir / "rules.yaml").write_text(yaml.safe_dump(rules_module.render_rules(), sort_keys=False, width=1000))
    scrape = [{"job_name": job, "honor_labels": True, "scrape_interval": "1s",
               "static_configs": [{"targets": [f"127.0.0.1:{port}"], "labels": {"namespace": "rlhf"}}]}
              for job, port in targets.items()]
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "rule_files": ["rules.yaml"],
              "scrape_configs": scrape}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = f"127.0.0.1:{free_port()}"
    process = Process("prometheus", [str(prometheus_bin), f"--config.file={workdir / 'prometheus.yml'}",
                                     f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address={web}"],
                      workdir)
    return process, Prometheus(f"http://{web}")


def wait_until(predicate, timeout: float, what: str, log: Callable[[], str] | None = None):
    """predicate()'s first truthy value, polled every half second; on timeout the error shows log()."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}" + (f":\n{log()}" if log else ""))
        time.sleep(0.5)


def panel_queries():
    """(dashboard, panel title, query) for every target of every panel, with Grafana's variables
    substituted and rate windows of 30s (the processes live for a minute or two)."""
    from test_monitoring import dashboards_module, grafana_substituted

    for name, build in dashboards_module.DASHBOARDS.items():
        board = json.loads(dashboards_module.render(build))
        for panel in board["panels"]:
            for target in panel.get("targets") or []:
                yield name, panel["title"], grafana_substituted(target["expr"]).replace("[1m]", "[30s]")
