"""The Grafana dashboards, generated from code with grafana-foundation-sdk.

    python monitoring/dashboards.py            # writes helm/aligner/files/dashboards/*.json
    python monitoring/dashboards.py --check    # exits 1 when the committed JSON is stale

Two dashboards: "Aligner / PPO training" (the orchestrator's gauges) and "Aligner / Services"
(gRPC traffic, batching and queues of every model service). Every query names metrics of
`common.metrics` only (tests/deploy check it), so the dashboards follow the metrics module.

Each query is filtered by the `namespace` and `job` variables. Both default to All (".*"), which
also matches series without those labels, so the same JSON works with the chart's ServiceMonitor
(job = the Kubernetes Service) and with a plain Prometheus scraping local processes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as gcommon_b
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as gcommon
from grafana_foundation_sdk.models import dashboard as gmodel

OUT_DIR = Path(__file__).resolve().parent.parent / "helm" / "aligner" / "files" / "dashboards"
DATASOURCE = gmodel.DataSourceRef(type_val="prometheus", uid="${datasource}")
# The label filter every selector carries.
FILTER = 'namespace=~"$namespace", job=~"$job"'
# Keeps series of processes that have finished a PPO step (see ppo()).
STEPPED = f'and on (namespace, job, instance) aligner_ppo_last_step_timestamp_seconds{{{FILTER}}} > 0'
PHASES_NOTE = "generate, score, logprobs, actor_train, critic_train, weight_sync"


def sel(metric: str, extra: str = "") -> str:
    """`metric{namespace=~"$namespace", job=~"$job"[, extra]}`."""
    return f"{metric}{{{FILTER}{', ' + extra if extra else ''}}}"


def ppo(metric: str) -> str:
    """A PPO series, kept only for processes that have finished a PPO step: common.metrics is
    imported by every service, so each process exports the (unlabelled) PPO gauges as 0."""
    return f"({sel(metric)} {STEPPED})"


def ppo_rate(metric: str) -> str:
    """rate() of a PPO counter or histogram bucket, for processes that have finished a step."""
    return f"(rate({sel(metric)}[$__rate_interval]) {STEPPED})"


def query(expr: str, legend: str = "", ref: str = "A") -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    return q.legend_format(legend) if legend else q


def graph(title: str, queries: list[prometheus.Dataquery], unit: str = "short", description: str = "",
          width: int = 8, stack: bool = False) -> timeseries.Panel:
    panel = (
        timeseries.Panel().title(title).datasource(DATASOURCE).unit(unit).span(width).height(8)
        .line_width(1).fill_opacity(10 if not stack else 60).show_points(gcommon.VisibilityMode.NEVER)
    )
    if stack:
        panel = panel.stacking(gcommon_b.StackingConfig().mode(gcommon.StackingMode.NORMAL))
    if description:
        panel = panel.description(description)
    for index, q in enumerate(queries):
        panel = panel.with_target(q.ref_id(chr(ord("A") + index)))
    return panel


def single(title: str, expr: str, unit: str = "short", description: str = "", width: int = 4) -> stat.Panel:
    panel = (
        stat.Panel().title(title).datasource(DATASOURCE).unit(unit).span(width).height(4)
        .graph_mode(gcommon.BigValueGraphMode.AREA).with_target(query(expr))
    )
    return panel.description(description) if description else panel


def variables() -> list:
    namespace = (
        gd.QueryVariable("namespace").label("Namespace").datasource(DATASOURCE)
        .query("label_values(aligner_rpc_in_flight, namespace)")
        .include_all(True).all_value(".*").refresh(gmodel.VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    job = (
        gd.QueryVariable("job").label("Job").datasource(DATASOURCE)
        .query('label_values({__name__=~"aligner_.+", namespace=~"$namespace"}, job)')
        .include_all(True).all_value(".*").multi(True).refresh(gmodel.VariableRefresh.ON_TIME_RANGE_CHANGED)
    )
    return [gd.DatasourceVariable("datasource").label("Data source").type("prometheus"), namespace, job]


def base(title: str, uid: str, description: str) -> gd.Dashboard:
    board = (
        gd.Dashboard(title).uid(uid).description(description).tags(["aligner", "rlhf"])
        .refresh("30s").time("now-6h", "now").timezone("browser").editable()
        .tooltip(gmodel.DashboardCursorSync.CROSSHAIR)
    )
    for variable in variables():
        board = board.with_variable(variable)
    return board


def ppo_training() -> gd.Dashboard:
    board = base("Aligner / PPO training", "aligner-ppo-training",
                 "One PPO run: rewards, KL, policy statistics, step time by phase, throughput.")
    board = (
        board.with_row(gd.Row("Progress"))
        .with_panel(single("Step", ppo("aligner_ppo_step"), description="Last finished PPO step"))
        .with_panel(single("Policy version", ppo("aligner_ppo_policy_version"),
                           description="Weight version served by generation"))
        .with_panel(single("Since last step", f"time() - ({sel('aligner_ppo_last_step_timestamp_seconds')} > 0)", "s",
                           description="Seconds since the last step finished (stall alert: stallMinutes)"))
        .with_panel(single("Tokens / s", ppo("aligner_ppo_tokens_per_second"), "short"))
        .with_panel(single("Mean reward", ppo("aligner_ppo_reward_mean")))
        .with_panel(single("KL", ppo("aligner_ppo_kl")))
        .with_row(gd.Row("Reward and KL"))
        .with_panel(graph("Reward", [
            query(ppo("aligner_ppo_reward_mean"), "mean {{job}}"),
            query(ppo("aligner_ppo_reward_std"), "std {{job}}"),
            query(ppo("aligner_ppo_validation_reward_mean"), "validation mean {{job}}"),
        ], description="Reward-model score of each rollout, and of the greedy validation responses"))
        .with_panel(graph("KL to the initial policy", [query(ppo("aligner_ppo_kl"), "{{job}}")],
                          description="Mean per-sequence KL (estimator: model.ppo.kl_estimator)"))
        .with_panel(graph("Response length", [query(ppo("aligner_ppo_response_length"), "{{job}}")],
                          description="Mean response length of the rollout, tokens"))
        .with_row(gd.Row("Policy and critic"))
        .with_panel(graph("Entropy", [query(ppo("aligner_ppo_entropy"), "{{job}}")],
                          description="Mean per-token policy entropy in the actor update"))
        .with_panel(graph("Clip fraction", [query(ppo("aligner_ppo_clip_fraction"), "{{job}}")], "percentunit",
                          description="Fraction of tokens whose probability ratio was clipped (ratio_eps)"))
        .with_panel(graph("Losses", [
            query(ppo("aligner_ppo_policy_loss"), "policy {{job}}"),
            query(ppo("aligner_ppo_value_loss"), "value {{job}}"),
        ]))
        .with_row(gd.Row("Time and throughput"))
        .with_panel(graph("Step time by phase", [
            query(f"sum by (phase) ({ppo('aligner_ppo_phase_seconds')})", "{{phase}}"),
        ], "s", description=f"Wall time of each phase of the last step ({PHASES_NOTE}); phases overlap",
            width=12, stack=True))
        .with_panel(graph("Step time", [
            query("histogram_quantile(0.5, sum by (le) "
                  f"({ppo_rate('aligner_ppo_step_seconds_bucket')}))", "p50"),
            query("histogram_quantile(0.9, sum by (le) "
                  f"({ppo_rate('aligner_ppo_step_seconds_bucket')}))", "p90"),
        ], "s", width=12))
        .with_panel(graph("Response tokens / s", [query(ppo("aligner_ppo_tokens_per_second"), "{{job}}")]))
        .with_panel(graph("Policy version", [query(ppo("aligner_ppo_policy_version"), "{{job}}")]))
        .with_panel(graph("Service retries", [
            query(f"sum by (target) ({ppo_rate('aligner_ppo_service_retries_total')})",
                  "{{target}}"),
        ], "reqps", description="Calls the orchestrator retried because a service was unavailable"))
    )
    return board


def services() -> gd.Dashboard:
    board = base("Aligner / Services", "aligner-services",
                 "The gRPC model services: traffic, latency, errors, dynamic batching, generation.")
    rate = "[$__rate_interval]"
    board = (
        board.with_row(gd.Row("Traffic"))
        .with_panel(graph("Up", [query(sel("up"), "{{job}} {{instance}}")],
                          description="1 while Prometheus can scrape the process"))
        .with_panel(graph("Requests / s", [
            query(f"sum by (service, method) (rate({sel('aligner_rpc_requests_total')}{rate}))",
                  "{{service}} {{method}}"),
        ], "reqps"))
        .with_panel(graph("Errors / s", [
            query(f"sum by (service, method, code) (rate({sel('aligner_rpc_errors_total')}{rate}))",
                  "{{service}} {{method}} {{code}}"),
        ], "reqps", description="Calls that ended with a non-OK status, by code"))
        .with_panel(graph("Latency p50", [
            query("histogram_quantile(0.5, sum by (service, method, le) "
                  f"(rate({sel('aligner_rpc_latency_seconds_bucket')}{rate})))", "{{service}} {{method}}"),
        ], "s", width=12))
        .with_panel(graph("Latency p99", [
            query("histogram_quantile(0.99, sum by (service, method, le) "
                  f"(rate({sel('aligner_rpc_latency_seconds_bucket')}{rate})))", "{{service}} {{method}}"),
        ], "s", width=12))
        .with_panel(graph("In flight", [query(f"sum by (service) ({sel('aligner_rpc_in_flight')})", "{{service}}")]))
        .with_row(gd.Row("Batching"))
        .with_panel(graph("Mean batch size", [
            query(f"sum by (service) (rate({sel('aligner_batch_size_sum')}{rate})) "
                  f"/ sum by (service) (rate({sel('aligner_batch_size_count')}{rate}))", "{{service}}"),
        ], description="Sequences per forward pass after dynamic batching"))
        .with_panel(graph("Requests per batch", [
            query(f"sum by (service) (rate({sel('aligner_requests_per_batch_sum')}{rate})) "
                  f"/ sum by (service) (rate({sel('aligner_requests_per_batch_count')}{rate}))", "{{service}}"),
        ], description="Client requests merged into one batch (above 1: the batcher is working)"))
        .with_panel(graph("Queue depth", [query(f"sum by (service) ({sel('aligner_queue_depth')})", "{{service}}")],
                          description="Sequences waiting in the dynamic batcher"))
        .with_panel(graph("Sequences / s", [
            query(f"sum by (service) (rate({sel('aligner_sequences_total')}{rate}))", "{{service}}"),
        ]))
        .with_panel(graph("Tokens / s (forward)", [
            query(f"sum by (service) (rate({sel('aligner_tokens_total')}{rate}))", "{{service}}"),
        ]))
        .with_panel(graph("Model loaded", [query(sel("aligner_model_loaded"), "{{service}} {{instance}}")]))
        .with_row(gd.Row("Generation and critic"))
        .with_panel(graph("Generated tokens / s", [
            query(f"sum by (engine) (rate({sel('aligner_generated_tokens_total')}{rate}))", "{{engine}}"),
            query(f"sum by (engine) ({sel('aligner_generation_tokens_per_second')})", "{{engine}} last batch"),
        ]))
        .with_panel(graph("Weight updates", [
            query(f"sum by (engine) (increase({sel('aligner_weight_updates_total')}{rate}))", "{{engine}} versions"),
            query(f"sum by (engine) (rate({sel('aligner_weight_update_bytes_total')}{rate}))", "{{engine}} bytes/s"),
        ]))
        .with_panel(graph("Critic", [
            query(sel("aligner_critic_value_loss"), "value loss {{job}}"),
            query(f"sum by (job) (rate({sel('aligner_critic_train_steps_total')}{rate}))", "steps/s {{job}}"),
        ]))
    )
    return board


DASHBOARDS = {"ppo-training.json": ppo_training, "services.json": services}


def render(build) -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when the committed JSON differs")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = render(build)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"stale dashboards (run python monitoring/dashboards.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
