"""A real Prometheus scraping a short PPO run: generation, reward-critic and reference started by
the real launcher, `aligner ppo` against them, every process scraped each second under the
chart's job names (aligner-orchestrator for the orchestrator). The reference is killed and
restarted mid-run so that the orchestrator retries (the "Service retries" panel). While the run
is still stepping, every PPO dashboard query must return finite data from the orchestrator only
(the services export the PPO gauges as 0 and must stay filtered out), and every alert expression
must execute, each PPO alert's selectors matching the orchestrator's series.

The e2e fixtures (tiny synthetic task, checkpoints, launcher) are reused from tests/e2e.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import promql_parser
import pytest
from live_prometheus import free_port, panel_queries, start_prometheus, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

E2E = Path(__file__).resolve().parents[1] / "e2e"
ORCHESTRATOR = "aligner-orchestrator"
PPO_ALERTS = {"AlignerTrainingStalled", "AlignerKLHigh", "AlignerRewardCollapse"}
STEPS = 4  # finished steps (and validations at 2 and 4) before the panels are checked


def _load(name: str, path: Path):
    """A module by path: importlib mode puts no test folder on sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


_e2e_fixtures = _load("aligner_e2e_fixtures", E2E / "conftest.py")
_e2e_ppo = _load("aligner_e2e_ppo", E2E / "test_ppo_e2e.py")
# The e2e fixtures, as fixtures of this module.
assets, services, ppo_config = _e2e_fixtures.assets, _e2e_fixtures.services, _e2e_fixtures.ppo_config
start_ppo, finish = _e2e_ppo.start_ppo, _e2e_ppo.finish


def orchestrator_value(prometheus, metric: str, at: float | None = None) -> float | None:
    found = prometheus.series(f'{metric}{{job="{ORCHESTRATOR}"}}', at)
    return float(found[0]["value"][1]) if found else None


def restart_reference(group, prometheus) -> None:
    """Kill the reference (as a crash would), wait until the orchestrator has retried a call to it,
    and start it again on the same gRPC and metrics ports."""
    reference = group["reference"]
    os.killpg(reference.proc.pid, signal.SIGKILL)
    reference.proc.wait()
    wait_until(lambda: prometheus.series(f'aligner_ppo_service_retries_total{{job="{ORCHESTRATOR}", '
                                         'target="reference"}'), 120, "the orchestrator to retry the reference")
    reference.restart_on_its_ports(120)


def scraped_moment(prometheus, targets: int) -> float | None:
    """A past instant at which the orchestrator had finished STEPS steps (and so a validation) and
    the last scrape of every target succeeded, or None. The queries are evaluated there: a scrape
    that times out on the busy machine marks a target's series stale until the next one, and would
    empty a panel for a second. Scrapes time out after the 1s interval, so none of those before
    now - 2s is still running."""
    at = time.time() - 2
    stepped = prometheus.series(f'aligner_ppo_step{{job="{ORCHESTRATOR}"}} >= {STEPS}', at)
    # Scraped while it stepped: Prometheus saw the step gauge change at least twice.
    changed = prometheus.series(f'changes(aligner_ppo_step{{job="{ORCHESTRATOR}"}}[5m]) >= 2', at)
    return at if stepped and changed and len(prometheus.series('up{namespace="rlhf"} == 1', at)) == targets else None


def check_ppo_panels(prometheus, run_dir: Path, at: float) -> set[str]:
    """Every query of the PPO dashboard returns finite values at `at`, from the orchestrator only."""
    checked = set()
    for board, title, expr in panel_queries():
        if board != "ppo-training.json":
            continue
        reply = prometheus.query(expr, at)
        assert reply["status"] == "success", f"{title}: {reply.get('error')}\n{expr}"
        result = reply["data"]["result"]
        assert result, f"PPO panel {title!r} shows no data during a PPO run\n{expr}"
        values = [float(series["value"][1]) for series in result]
        assert any(math.isfinite(v) for v in values), f"{title}: only {values}\n{expr}"
        jobs = {series["metric"].get("job") for series in result} - {None}  # aggregations drop the label
        assert jobs <= {ORCHESTRATOR}, f"{title}: data from {sorted(jobs)} (only the orchestrator runs PPO)"
        checked.add(title)
    # The panels show this run's numbers: each gauge holds a value the run logged.
    for metric, file, key in (("aligner_ppo_reward_mean", "metrics.jsonl", "reward_mean"),
                              ("aligner_ppo_validation_reward_mean", "validation.jsonl", "val_reward_mean")):
        value = orchestrator_value(prometheus, metric, at)

        def logged(file=file, key=key, value=value) -> bool:  # the gauge is set before the line is written
            records = [json.loads(line) for line in (run_dir / file).read_text().splitlines()]
            return any(value == pytest.approx(record[key], rel=1e-6, abs=1e-9) for record in records)

        wait_until(logged, 10, f"{metric} = {value} among {key} in {file}")
    return checked


def vector_selectors(expr: str) -> list[str]:
    """The selectors of a PromQL expression as text, e.g. `aligner_ppo_kl{namespace="rlhf"}`."""
    found = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            found.append(str(node))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def check_alert_expressions(prometheus, at: float) -> None:
    """Every alert loads and executes; each PPO alert's selectors match the orchestrator's series
    (job and namespace as the chart's ServiceMonitor labels them), so the alert can fire."""
    rules = prometheus.rules()
    assert PPO_ALERTS <= set(rules)
    for name, rule in rules.items():
        assert rule["health"] in ("ok", "unknown"), (name, rule.get("lastError"))
        reply = prometheus.query(rule["query"], at)
        assert reply["status"] == "success", (name, reply.get("error"))
        if name not in PPO_ALERTS:
            continue
        selectors = vector_selectors(rule["query"])
        assert selectors, name
        for selector in selectors:
            jobs = {series["metric"]["job"] for series in prometheus.series(selector, at)}
            assert ORCHESTRATOR in jobs, f"{name}: {selector} selects no orchestrator series ({sorted(jobs)})"


def test_a_ppo_run_fills_every_ppo_panel_and_alert_expression(services, assets, ppo_config, tmp_path):
    group, overrides = services
    metrics_port = free_port()
    targets = {f"aligner-{s.name}": s.info["metrics_port"] for s in group.services} | {ORCHESTRATOR: metrics_port}
    prometheus_process, prometheus = start_prometheus(tmp_path, targets)
    run_dir = tmp_path / "run"
    config = ppo_config(assets, run_dir, trainer={"ppo": {"save_interval": 0}})
    log_path = tmp_path / "ppo.log"
    ppo, code, log = None, None, ""
    try:
        ppo = start_ppo(config, [*overrides, f"metrics_port={metrics_port}", "trainer.ppo.max_steps=500"], log_path)

        def ppo_log() -> str:
            return log_path.read_text(errors="replace")[-3000:]

        def step() -> float:
            assert ppo.poll() is None, f"aligner ppo exited with {ppo.returncode}:\n{ppo_log()}"
            return orchestrator_value(prometheus, "aligner_ppo_step") or 0

        wait_until(lambda: step() >= 1, 240, "the first PPO step in Prometheus", ppo_log)
        restart_reference(group, prometheus)
        wait_until(lambda: step() >= STEPS, 240, f"{STEPS} PPO steps in Prometheus", ppo_log)
        at = wait_until(lambda: scraped_moment(prometheus, len(targets)), 60, "every target scraped", ppo_log)

        checked = check_ppo_panels(prometheus, run_dir, at)
        assert {"Reward", "KL to the initial policy", "Entropy", "Clip fraction", "Response length",
                "Step time by phase", "Step time", "Response tokens / s", "Policy version",
                "Service retries"} <= checked
        check_alert_expressions(prometheus, at)
        os.killpg(ppo.pid, signal.SIGTERM)  # finish the step in flight, save, exit 3 (stopped early)
    finally:
        if ppo is not None:
            code, log = finish(ppo, log_path, timeout=120)
        prometheus_process.stop()
    assert code == 3, log[-3000:]
    assert "service unavailable, retrying" in log
