"""The Helm chart, checked with the real tools: `helm lint --strict`, `helm template` for every
value set, every manifest through kubernetes-validate (strict, oldest and a recent supported
Kubernetes), the Prometheus Operator resources through the Operator's CRD schemas, and the
rendered job configs through the project's own config schemas. Then what the manifests must say:
GPU requests, probes, headless Services, the torchrun Job, Secrets, volumes, monitoring toggles.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import shutil
import socket

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from deploy_support import CHART, NAMESPACE, RELEASE, TOOLS, VALUE_SETS, run

from common.config import GenerationServiceConfig, ModelServiceConfig, PpoConfig, load_config

# The chart's kubeVersion floor, and a recent release.
KUBE_VERSIONS = ("1.28.0", "1.33.0")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
FULLNAME = "aligner"  # release "aligner" contains the chart name
MODEL_COMPONENTS = {"generation", "reference", "reward-critic", "reward", "critic", "scoring"}


def by_kind(documents: list[dict], kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents if doc["kind"] == kind}


def workloads(documents: list[dict]) -> dict[str, dict]:
    """component -> Deployment/StatefulSet/Job."""
    return {doc["metadata"]["labels"]["app.kubernetes.io/component"]: doc
            for doc in documents if doc["kind"] in ("Deployment", "StatefulSet", "Job")}


def container(workload: dict) -> dict:
    (main,) = workload["spec"]["template"]["spec"]["containers"]
    return main


def configs(documents: list[dict]) -> dict[str, dict]:
    config_map = by_kind(documents, "ConfigMap")[f"{FULLNAME}-config"]
    return {name: yaml.safe_load(text) for name, text in config_map["data"].items()}


# --- the tools ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_strict(chart, value_set):
    result = chart.lint(VALUE_SETS[value_set])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


@pytest.fixture(scope="module")
def cached_schemas():
    """kubernetes_validate parses its schema files (the definitions file is large) on every call;
    the same files, read once, make the many validations below ~10x faster."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kubernetes_validate.utils, "schema_contents",
                      functools.lru_cache(maxsize=None)(kubernetes_validate.utils.schema_contents))
        yield


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_manifest_validates_strictly(chart, value_set, cached_schemas):
    documents = chart.documents(value_set)
    crds = []
    for doc in documents:
        if doc["kind"] in CRD_KINDS:  # not in kubernetes-validate's schemas: checked below
            crds.append(doc)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message} "
                            f"at {'.'.join(str(p) for p in exc.path)}")
    assert len(documents) - len(crds) >= 12  # workloads, Services, ConfigMap, PVCs, ServiceAccount


def test_strict_validation_catches_a_misplaced_field(chart, cached_schemas):
    """The validator really is strict: a field in the wrong place is an error, not ignored."""
    deployment = copy.deepcopy(by_kind(chart.documents("default"), "Deployment")[f"{FULLNAME}-generation"])
    container(deployment)["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def validate_crds(tool, resources: list[dict]) -> tuple[int, str]:
    modules = TOOLS / "node_modules"
    if not (modules / "@kubernetes-models" / "prometheus-operator").is_dir():
        pytest.fail("@kubernetes-models/prometheus-operator not in .tools: run `make tools`", pytrace=False)
    result = run([tool("node"), str(CHART.parents[1] / "tests" / "deploy" / "validate_crds.mjs"), str(modules)],
                 input=json.dumps(resources))
    return result.returncode, result.stdout + result.stderr


def test_operator_resources_validate_against_the_crd_schemas(chart, tool):
    resources = [doc for doc in chart.documents("monitoring") if doc["kind"] in CRD_KINDS]
    assert {doc["kind"] for doc in resources} == CRD_KINDS
    code, output = validate_crds(tool, resources)
    assert code == 0, output
    assert output.count("ok ") == len(resources), output


def test_crd_schema_check_rejects_a_bad_resource(chart, tool):
    (monitor,) = [doc for doc in chart.documents("monitoring") if doc["kind"] == "ServiceMonitor"]
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["interval"] = "every 30 seconds"
    broken["spec"]["endpoints"][0]["honorLabels"] = "yes"
    code, output = validate_crds(tool, [broken])
    assert code == 1 and "interval" in output and "honorLabels" in output, output


# --- configs: what the processes will load -----------------------------------------------------

SCHEMAS = {"generation.yaml": GenerationServiceConfig, "ppo.yaml": PpoConfig}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_configs_load_with_the_project_schemas(chart, value_set, tmp_path):
    """Each ConfigMap entry is a valid config of its schema (unknown keys and wrong types are
    errors there), and each container's --config names an entry that exists."""
    rendered = configs(chart.documents(value_set))
    for name, data in rendered.items():
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        config = load_config(SCHEMAS.get(name, ModelServiceConfig), path)
        if name != "ppo.yaml":
            assert config.server.host == "0.0.0.0" and config.server.metrics_port == 9400
            assert config.server.reflection is False  # grpcReflection: off unless asked for
    for component, workload in workloads(chart.documents(value_set)).items():
        args = container(workload)["args"]
        config_file = args[args.index("--config") + 1]
        assert config_file.removeprefix("/etc/aligner/") in rendered, (component, config_file)


def cluster_dns(documents: list[dict]) -> dict[str, list[str]]:
    """What the cluster's DNS would answer for this release once every pod is ready: a headless
    Service's name -> one IP per pod of the workload it selects; a StatefulSet pod's own name
    (<pod>.<governing Service>) -> that pod's IP."""
    found = workloads(documents)
    answers = {}
    for index, (name, service) in enumerate(sorted(by_kind(documents, "Service").items())):
        if service["spec"].get("clusterIP") != "None":
            continue
        workload = found[service["spec"]["selector"]["app.kubernetes.io/component"]]
        pods = workload["spec"].get("replicas", workload["spec"].get("parallelism"))
        ips = [f"10.0.{index}.{pod}" for pod in range(pods)]
        answers[f"{name}.{NAMESPACE}.svc.cluster.local"] = ips
        if workload["kind"] == "StatefulSet" and workload["spec"]["serviceName"] == name:
            for pod, ip in enumerate(ips):
                answers[f"{workload['metadata']['name']}-{pod}.{name}.{NAMESPACE}.svc.cluster.local"] = [ip]
    return answers


def test_ppo_endpoints_point_at_rendered_services(chart):
    """Every endpoint names a Service of the release (or the one pod of a StatefulSet behind its
    governing Service) on a port that Service serves."""
    for value_set in ("default", "separate-reward-critic"):
        documents = chart.documents(value_set)
        services = by_kind(documents, "Service")
        ppo = configs(documents)["ppo.yaml"]
        endpoints = [ppo["remote"]["generation"], ppo["remote"]["generation_control"], ppo["remote"]["reference"],
                     ppo["remote_critic_rm"]["reward_model"], ppo["remote_critic_rm"]["critic"]]
        dns = cluster_dns(documents)
        for endpoint in endpoints:
            assert "replicas" not in endpoint, endpoint
            assert endpoint["ip"] in dns, endpoint
            labels = endpoint["ip"].split(".")
            name = labels[1] if labels[1] in services else labels[0]
            assert endpoint["port"] in [p["port"] for p in services[name]["spec"]["ports"]], endpoint
        combined = value_set == "default"
        assert ppo["remote_critic_rm"]["combine_rm_and_critic_server"] is combined
        trainer = f"{FULLNAME}-reward-critic" if combined else f"{FULLNAME}-critic"
        assert ppo["remote_critic_rm"]["critic"]["ip"] == f"{trainer}-0.{trainer}.{NAMESPACE}.svc.cluster.local"


@pytest.mark.parametrize("value_set", ["default", "separate-reward-critic", "scaled-out", "example-8b"])
def test_the_orchestrator_sees_every_replica_and_one_critic(chart, value_set, tmp_path, monkeypatch):
    """The rendered ppo.yaml, read by the orchestrator's own client layer against what the
    cluster's DNS answers: one generation replica per pod, each pod's Triton and weight-push
    ports paired on the same IP (so a push reaches every pod that generates), every reference
    (and reward) pod, and exactly one critic: pod 0 of its StatefulSet."""
    from services.orchestrator.clients import addresses, expand, generation_pairs, single  # imports megatron

    documents = chart.documents(value_set)
    found = workloads(documents)
    dns = cluster_dns(documents)

    def getaddrinfo(host, port, *args, **kwargs):
        assert host in dns, f"{host} is not a name the cluster's DNS answers"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, 0)) for ip in dns[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump(configs(documents)["ppo.yaml"]))
    cfg = load_config(PpoConfig, path)

    generation = found["generation"]["spec"]["replicas"]
    generation_ips = dns[f"{FULLNAME}-generation.{NAMESPACE}.svc.cluster.local"]
    assert len(generation_ips) == generation
    pairs = generation_pairs(cfg.remote.generation, cfg.remote.generation_control)
    assert pairs == [f"{ip}:8001+{ip}:5558" for ip in generation_ips]

    reference = expand(addresses(cfg.remote.reference, "remote.reference"), "remote.reference")
    assert len(reference) == found["reference"]["spec"]["replicas"]
    trainer = "reward-critic" if cfg.remote_critic_rm.combine_rm_and_critic_server else "critic"
    (critic,) = single(cfg.remote_critic_rm.critic, "remote_critic_rm.critic")
    assert critic.split(":")[0] == dns[f"{FULLNAME}-{trainer}-0.{FULLNAME}-{trainer}.{NAMESPACE}.svc.cluster.local"][0]
    if trainer == "critic":
        reward = expand(addresses(cfg.remote_critic_rm.reward_model, "k"), "k")
        assert len(reward) == found["reward"]["spec"]["replicas"]


@pytest.mark.parametrize("value_set", ["default", "scaled-out", "example-8b"])
def test_generation_is_one_headless_name_for_both_endpoints(chart, value_set):
    """Pushes and rollouts resolve the same name, the generation Service without a cluster IP:
    DNS answers with the IP of every ready pod (never a virtual IP that load-balances, which
    would land a push on one pod and rollouts on another)."""
    documents = chart.documents(value_set)
    ppo = configs(documents)["ppo.yaml"]["remote"]
    service = by_kind(documents, "Service")[f"{FULLNAME}-generation"]
    assert ppo["generation"]["ip"] == ppo["generation_control"]["ip"] == (
        f"{FULLNAME}-generation.{NAMESPACE}.svc.cluster.local")
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses")  # only pods that serve
    ports = {p["port"] for p in service["spec"]["ports"]}
    assert {ppo["generation"]["port"], ppo["generation_control"]["port"]} <= ports


# --- topology ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value_set", "expected"), [
    ("default", {"generation", "reference", "reward-critic", "orchestrator"}),
    ("separate-reward-critic", {"generation", "reference", "reward", "critic", "scoring", "orchestrator"}),
])
def test_combined_or_separate_reward_and_critic(chart, value_set, expected):
    documents = chart.documents(value_set)
    found = workloads(documents)
    assert set(found) == expected
    for component, workload in found.items():
        # The critic trains (optimizer state, checkpoints): a one-replica StatefulSet.
        kind = {"reward-critic": "StatefulSet", "critic": "StatefulSet", "orchestrator": "Job"}.get(component,
                                                                                                    "Deployment")
        assert workload["kind"] == kind, component
        if kind == "StatefulSet":
            assert workload["spec"]["replicas"] == 1
            mounts = {m["name"]: m for m in container(workload)["volumeMounts"]}
            assert "readOnly" not in mounts["checkpoints"]
            # Its Save/Load paths are confined to the volume, where the orchestrator's run folder is.
            root = configs(documents)[f"{component}.yaml"]["server"]["checkpoint_root"]
            assert root == mounts["checkpoints"]["mountPath"]
            assert configs(documents)["ppo.yaml"]["exp_manager"]["explicit_log_dir"].startswith(root + "/")


SERVE_ROLES = {"generation": "generation", "reference": "reference", "reward-critic": "reward-critic",
               "reward": "reward", "critic": "critic", "scoring": "reward"}


def test_model_pods_with_several_gpus_run_torchrun_with_tp_equal_to_gpus(chart):
    """gpus > 1: one model sharded over the pod's GPUs (torchrun, one rank per GPU, TP = gpus);
    gpus 1: the plain `aligner serve`."""
    tp = chart.template(sets=["combineRewardAndCritic=false", "reward.gpus=2", "critic.gpus=4", "reference.gpus=8",
                              "generation.gpus=2", "scoring.enabled=true", "scoring.gpus=2", "scoring.auth.token=t"])
    assert tp.returncode == 0, tp.stderr
    rendered = {"tp": [doc for doc in yaml.safe_load_all(tp.stdout) if doc], "default": chart.documents("default"),
                "example-70b": chart.documents("example-70b")}
    seen = set()
    for name, documents in rendered.items():
        for component, workload in workloads(documents).items():
            if component == "orchestrator":
                continue
            main = container(workload)
            gpus = main["resources"]["limits"]["nvidia.com/gpu"]
            serve = ["serve", SERVE_ROLES[component], "--config", f"/etc/aligner/{component}.yaml"]
            if gpus > 1:
                seen.add((name, component, gpus))
                assert main["command"] == ["python", "-m", "torch.distributed.run"], (name, component)
                assert main["args"] == [f"--nproc-per-node={gpus}", "--standalone", "-m", "services.cli", *serve,
                                        f"model.tensor_model_parallel_size={gpus}"], (name, component)
            else:
                assert "command" not in main and main["args"] == serve, (name, component)
        if name != "default":
            generation = configs(documents)["generation.yaml"]
            assert generation["engine"] == "torch" and generation["decode"] == "megatron", name
    assert {("tp", "reward", 2), ("tp", "critic", 4), ("tp", "reference", 8), ("tp", "generation", 2),
            ("tp", "scoring", 2), ("example-70b", "reference", 4), ("example-70b", "generation", 8)} <= seen


@pytest.mark.parametrize(("setting", "message"), [
    ("critic.replicas=2", "critic.replicas is 2 but must be 1: the critic server trains the critic, which is "
                          "single-writer"),
    ("critic.replicas=0", "critic.replicas is 0 but must be 1"),
    ("rewardCritic.replicas=3", "rewardCritic.replicas is 3 but must be 1: the reward-critic server trains the "
                                "critic, which is single-writer"),
    ("generation.gpus=2,generation.config.engine=tensorrt_llm",
     "generation.gpus is 2 with generation.config.engine=tensorrt_llm, which cannot run"),
    ("generation.gpus=2,generation.config.decode=fused", "generation.config.decode=fused with generation.gpus 2"),
    ("reference.gpus=4,reference.config.model.tensor_model_parallel_size=2",
     "reference.config.model.tensor_model_parallel_size is 2 but reference.gpus is 4"),
    ("critic.extraArgs={model.tensor_model_parallel_size=2}", 'critic.extraArgs: "model.tensor_model_parallel_size=2"'),
])
def test_combinations_that_cannot_run_fail_with_the_reason(chart, setting, message):
    sets = [setting, "combineRewardAndCritic=false"] if setting.startswith("critic.extraArgs") else [setting]
    result = chart.template(sets=sets)
    assert result.returncode != 0, setting
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert message in line, line


def test_scaled_out_replicas(chart):
    found = workloads(chart.documents("scaled-out"))
    assert found["generation"]["spec"]["replicas"] == 4
    assert found["reference"]["spec"]["replicas"] == 2
    job = found["orchestrator"]["spec"]
    assert job["completions"] == job["parallelism"] == 4 and job["completionMode"] == "Indexed"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_gpu_requests_node_selectors_and_tolerations(chart, value_set):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for path in VALUE_SETS[value_set]:
        overlay = yaml.safe_load(path.read_text())
        for key in ("generation", "reference", "rewardCritic", "reward", "critic", "scoring", "orchestrator",
                    "defaults"):
            values[key] = {**values[key], **overlay.get(key, {})}
    keys = {"generation": "generation", "reference": "reference", "reward-critic": "rewardCritic",
            "reward": "reward", "critic": "critic", "scoring": "scoring", "orchestrator": "orchestrator"}
    for component, workload in workloads(chart.documents(value_set)).items():
        section = values[keys[component]]
        gpus = section["gpusPerNode"] if component == "orchestrator" else section["gpus"]
        resources = container(workload)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == gpus, component
        assert resources["requests"]["nvidia.com/gpu"] == gpus, component
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("nodeSelector", {}) == (section.get("nodeSelector") or values["defaults"]["nodeSelector"])
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_grpc_probes_on_each_service_port(chart, value_set):
    documents = chart.documents(value_set)
    rendered = configs(documents)
    for component, workload in workloads(documents).items():
        main = container(workload)
        if component == "orchestrator":
            assert "readinessProbe" not in main  # a Job: the stall alert watches it instead
            continue
        port = rendered[f"{component}.yaml"]["server"]["port"]
        assert {"name": "grpc", "containerPort": port, "protocol": "TCP"} in main["ports"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if "exec" in main[probe]:  # TLS: the kubelet's gRPC probe cannot do it
                assert component == "scoring" and f"127.0.0.1:{port}" in main[probe]["exec"]["command"]
            else:
                assert main[probe]["grpc"] == {"port": port}, (component, probe)
        assert {"name": "ALIGNER_HEALTH_PORT", "value": str(port)} in main["env"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_services_are_headless_and_select_their_pods(chart, value_set):
    documents = chart.documents(value_set)
    found = workloads(documents)
    for name, service in by_kind(documents, "Service").items():
        component = service["spec"]["selector"]["app.kubernetes.io/component"]
        pod = found[component]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items() | {
            ("batch.kubernetes.io/job-completion-index", "0")}, name
        if component == "scoring":
            assert service["spec"].get("type") in ("ClusterIP", "LoadBalancer", "NodePort")
        else:
            assert service["spec"]["clusterIP"] == "None", name
        names = {p["name"] for p in container(found[component])["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in names, (name, port)


def test_orchestrator_runs_torchrun_across_pods(chart):
    documents = chart.documents("scaled-out")
    job = by_kind(documents, "Job")[f"{FULLNAME}-ppo"]
    pod = job["spec"]["template"]["spec"]
    main = container(job)
    assert main["command"] == ["python", "-m", "torch.distributed.run"]
    ranks = f"{FULLNAME}-ppo-ranks"
    assert pod["subdomain"] == ranks and pod["restartPolicy"] == "Never"
    assert main["args"][:5] == [
        "--nproc-per-node=8", "--nnodes=4", "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={FULLNAME}-ppo-0.{ranks}.{NAMESPACE}.svc.cluster.local", "--master-port=29500"]
    assert main["args"][5:] == ["-m", "services.cli", "ppo", "--config", "/etc/aligner/ppo.yaml", "--log-format", "json"]
    ranks_service = by_kind(documents, "Service")[ranks]["spec"]
    assert ranks_service["clusterIP"] == "None" and ranks_service["publishNotReadyAddresses"] is True
    ppo = configs(documents)["ppo.yaml"]
    assert ppo["trainer"]["num_nodes"] == 4 and ppo["trainer"]["devices"] == 8

    single = container(by_kind(chart.documents("single-node"), "Job")[f"{FULLNAME}-ppo"])
    assert single["args"][:2] == ["--nproc-per-node=4", "--standalone"]
    plain = container(by_kind(chart.documents("default"), "Job")[f"{FULLNAME}-ppo"])
    assert "command" not in plain
    assert plain["args"] == ["ppo", "--config", "/etc/aligner/ppo.yaml", "--log-format", "json"]


def test_orchestrator_waits_for_every_internal_service(chart):
    for value_set in ("default", "separate-reward-critic"):
        documents = chart.documents(value_set)
        job = by_kind(documents, "Job")[f"{FULLNAME}-ppo"]
        (init,) = job["spec"]["template"]["spec"]["initContainers"]
        command = init["command"]
        targets = {command[i + 1] for i, arg in enumerate(command) if arg == "--target"}
        ppo = configs(documents)["ppo.yaml"]
        expected = {f"{e['ip']}:{e['port']}" for e in (
            ppo["remote"]["generation_control"], ppo["remote"]["reference"],
            ppo["remote_critic_rm"]["reward_model"], ppo["remote_critic_rm"]["critic"])}
        assert targets == expected, value_set


# --- secrets, storage, monitoring --------------------------------------------------------------


def test_scoring_token_secret(chart):
    documents = chart.documents("monitoring")
    secret = by_kind(documents, "Secret")[f"{FULLNAME}-scoring-auth"]
    assert base64.b64decode(secret["data"]["token"]).decode() == "change-me-in-a-real-install"
    scoring = configs(documents)["scoring.yaml"]
    assert scoring["server"]["auth_token_file"] == "/etc/aligner-auth/token"
    # An existing Secret is used as it is: none made, the pod mounts the named one.
    separate = chart.documents("separate-reward-critic")
    assert not by_kind(separate, "Secret")
    volumes = {v["name"]: v for v in workloads(separate)["scoring"]["spec"]["template"]["spec"]["volumes"]}
    assert volumes["auth"]["secret"]["secretName"] == "scoring-token"
    assert volumes["tls"]["secret"]["secretName"] == "scoring-tls"
    tls = configs(separate)["scoring.yaml"]["server"]["tls"]
    assert tls == {"cert_file": "/etc/aligner-tls/tls.crt", "key_file": "/etc/aligner-tls/tls.key",
                   "client_ca_file": "/etc/aligner-tls/ca.crt"}


def test_auth_without_a_token_fails_at_install(chart):
    result = chart.template(sets=["scoring.enabled=true"])
    assert result.returncode != 0 and "scoring.auth.token" in result.stderr


def test_volumes_and_existing_claims(chart):
    default = by_kind(chart.documents("default"), "PersistentVolumeClaim")
    assert set(default) == {f"{FULLNAME}-data", f"{FULLNAME}-checkpoints"}
    for claim in default.values():
        assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    single = chart.documents("single-node")
    assert set(by_kind(single, "PersistentVolumeClaim")) == {f"{FULLNAME}-checkpoints"}
    for component, workload in workloads(single).items():
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "rlhf-data", "readOnly": True}, component


@pytest.mark.parametrize(("setting", "message"), [
    ("critic.replicas=one", "critic.replicas"),
    ("generation.gpus=-1", "generation.gpus"),
    ("generation.gpu=1", "Additional property gpu"),
    ("scoring.service.type=Ingress", "scoring.service.type"),
    ("monitoring.prometheusRule.serviceDownFor=5 minutes", "serviceDownFor"),
    ("orchestrator.nodes=0", "orchestrator.nodes"),
    ("models.policy=relative/path", "models.policy"),
    ("run.name=Bad_Name", "run.name"),
    ("generation.extraArgs={--resume}", "generation.extraArgs"),
])
def test_schema_rejects_bad_values(chart, setting, message):
    result = chart.template(sets=[setting])
    assert result.returncode != 0, setting
    assert message in result.stderr, result.stderr


def test_monitoring_is_off_by_default_and_complete_when_on(chart):
    kinds = {doc["kind"] for doc in chart.documents("default")}
    assert not kinds & CRD_KINDS
    assert not [n for n in by_kind(chart.documents("default"), "ConfigMap") if "dashboard" in n]
    documents = chart.documents("monitoring")
    (monitor,) = by_kind(documents, "ServiceMonitor").values()
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics", "triton-metrics"]
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    # Every Service with a metrics port is selected by the ServiceMonitor.
    for service in by_kind(documents, "Service").values():
        if any(p["name"] == "metrics" for p in service["spec"]["ports"]):
            assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    dashboards = {n: d for n, d in by_kind(documents, "ConfigMap").items() if "dashboard" in n}
    assert set(dashboards) == {f"{FULLNAME}-dashboard-ppo-training", f"{FULLNAME}-dashboard-services"}
    for config_map in dashboards.values():
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "RLHF"}
        (text,) = config_map["data"].values()
        assert json.loads(text)["uid"].startswith("aligner-")


def test_network_policy_fences_the_internal_services(chart):
    (policy,) = by_kind(chart.documents("separate-reward-critic"), "NetworkPolicy").values()
    expressions = {e["key"]: e for e in policy["spec"]["podSelector"]["matchExpressions"]}
    assert expressions["app.kubernetes.io/component"] == {
        "key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["scoring"]}
    same_release, metrics = policy["spec"]["ingress"]
    assert same_release["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}}}]
    assert {p["port"] for p in metrics["ports"]} == {9400, 8002}


def test_notes_tell_how_to_watch_and_call_the_scoring_endpoint(chart, tmp_path):
    """helm template does not print NOTES.txt: render it through a copy of the chart where it is
    wrapped in a template."""
    copy_dir = tmp_path / "aligner"
    shutil.copytree(CHART, copy_dir)
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    (copy_dir / "templates" / "_notes.tpl").write_text('{{- define "notes.text" -}}\n' + notes + "{{- end -}}\n")
    (copy_dir / "templates" / "notes.yaml").write_text('notes: |\n  {{- include "notes.text" . | nindent 2 }}\n')
    result = chart.template(VALUE_SETS["monitoring"], chart=copy_dir, extra=["--show-only", "templates/notes.yaml"])
    assert result.returncode == 0, result.stderr
    text = yaml.safe_load(result.stdout)["notes"]
    assert f"kubectl -n {NAMESPACE} logs -f job/{FULLNAME}-ppo -c orchestrator" in text
    assert "aligner.v1.Orchestrator/Status" in text
    assert '-H "authorization: Bearer $TOKEN"' in text and "aligner.v1.Reward/Score" in text
    assert f"get secret {FULLNAME}-scoring-auth" in text
