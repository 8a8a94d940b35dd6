{{/*
The job config of every process, as YAML documents of the schemas in common/config.py
(GenerationServiceConfig, ModelServiceConfig, PpoConfig). Each is: what the chart derives from the
values (paths), then the user's `config` for that component, then what the chart must own (bind
address and ports, which the Services and probes depend on; auth and TLS files).
Output: a map file name -> config.
*/}}
{{- define "aligner.configs" -}}
{{- $v := .Values -}}
{{- $p := $v.ports -}}
{{- $configs := dict -}}
{{- $listen := dict "host" "0.0.0.0" "metrics_port" $p.metrics "reflection" $v.grpcReflection -}}

{{- /* generation */ -}}
{{- $base := dict "checkpoint_path" $v.models.policy -}}
{{- if $v.models.tokenizer }}{{ $_ := set $base "tokenizer_path" $v.models.tokenizer }}{{ end -}}
{{- /* The fused decode step covers tensor-parallel size 1 only (aligner.validate refuses it with more). */ -}}
{{- if gt (int $v.generation.gpus) 1 }}{{ $_ := set $base "decode" "megatron" }}{{ end -}}
{{- $fixed := dict "name" "generation" "triton_grpc_port" $p.tritonGrpc "triton_http_port" $p.tritonHttp
      "triton_metrics_port" $p.tritonMetrics "server" (merge (dict "port" $p.generation) $listen) -}}
{{- $_ := set $configs "generation.yaml" (mustMergeOverwrite (dict) $base (deepCopy $v.generation.config) $fixed) -}}

{{- /* model servers */ -}}
{{- range $component, $svc := (include "aligner.modelServices" . | fromYaml) -}}
{{- $values := index $v $svc.key -}}
{{- $checkpoint := $v.models.rewardModel -}}
{{- if eq $component "reference" }}{{ $checkpoint = $v.models.policy }}{{ end -}}
{{- if eq $component "scoring" }}{{ $checkpoint = default $v.models.rewardModel $v.scoring.checkpoint }}{{ end -}}
{{- $base := dict "checkpoint_path" $checkpoint -}}
{{- if and $svc.trains $v.models.critic }}{{ $_ := set $base "critic_checkpoint_path" $v.models.critic }}{{ end -}}
{{- if $v.models.tokenizer }}{{ $_ := set $base "tokenizer_path" $v.models.tokenizer }}{{ end -}}
{{- $server := merge (dict "port" $svc.port) $listen -}}
{{- /* The critic's Save/Load stay on the checkpoint volume (it is mounted there). */ -}}
{{- if $svc.trains }}{{ $_ := set $server "checkpoint_root" $v.storage.checkpoints.mountPath }}{{ end -}}
{{- if $svc.public -}}
{{- if $v.scoring.auth.enabled }}{{ $_ := set $server "auth_token_file" "/etc/aligner-auth/token" }}{{ end -}}
{{- if $v.scoring.tls.enabled -}}
{{- $tls := dict "cert_file" "/etc/aligner-tls/tls.crt" "key_file" "/etc/aligner-tls/tls.key" -}}
{{- if $v.scoring.tls.clientAuth }}{{ $_ := set $tls "client_ca_file" "/etc/aligner-tls/ca.crt" }}{{ end -}}
{{- $_ := set $server "tls" $tls -}}
{{- end -}}
{{- end -}}
{{- $fixed := dict "name" $component "server" $server
      "trainer" (dict "ppo" (dict "combine_rm_and_critic_server" $v.combineRewardAndCritic)) -}}
{{- $_ := set $configs (printf "%s.yaml" $component) (mustMergeOverwrite (dict) $base (deepCopy $values.config) $fixed) -}}
{{- end -}}

{{- /* the PPO orchestrator.
Its endpoints (services/orchestrator/clients.py spreads calls over every address an endpoint
resolves to, re-resolving every remote.resolve_interval_s):
- generation: ONE name for both endpoints, the headless Service (clusterIP: None), whose DNS
  answer is the IP of every ready pod. The orchestrator pairs the two ports per IP, so each pod is
  one replica whose weight pushes and rollouts reach that same pod; a push goes to every replica
  it knows; a pod that appears later or missed a push is resynced before it generates. Chosen over
  explicit per-pod `replicas` lists (StatefulSet pod names): such a list is fixed at install
  (`kubectl scale` would not be seen), the Deployment would have to become a StatefulSet, and a
  name that does not resolve (a pod not yet scheduled or not ready) fails the whole list when the
  orchestrator starts, while the Service name simply lists the pods that can serve; readiness
  (gRPC health SERVING) is what admits a pod.
- reference, reward (separate mode): their headless Services, any number of replicas.
- critic, reward-critic: the DNS name of pod 0 of the one-replica StatefulSet. The critic is
  single-writer, and that name can only ever be one pod, even if someone scaled the StatefulSet
  by hand; the orchestrator also refuses a critic endpoint that resolves to several addresses.
  In combined mode the reward endpoint is that same pod. */ -}}
{{- $rewardHost := include "aligner.endpointHost" (dict "root" . "component" (ternary "reward-critic" "reward" $v.combineRewardAndCritic)) -}}
{{- $criticHost := include "aligner.endpointHost" (dict "root" . "component" (ternary "reward-critic" "critic" $v.combineRewardAndCritic)) -}}
{{- $generationHost := include "aligner.endpointHost" (dict "root" . "component" "generation") -}}
{{- $base := dict
      "pretrained_checkpoint" (dict "restore_from_path" $v.models.policy)
      "model" (dict "data" (dict "data_prefix" (dict "train" $v.prompts.train "validation" $v.prompts.validation "test" $v.prompts.test)))
      "exp_manager" (dict "explicit_log_dir" (printf "%s/%s" $v.storage.checkpoints.mountPath $v.run.name) "resume_if_exists" true) -}}
{{- if $v.models.tokenizer }}{{ $_ := set $base "tokenizer_path" $v.models.tokenizer }}{{ end -}}
{{- $fixed := dict
      "run_id" $v.run.name
      "host" "0.0.0.0" "control_port" $p.orchestrator "metrics_port" $p.metrics
      "trainer" (dict "num_nodes" $v.orchestrator.nodes "devices" $v.orchestrator.gpusPerNode)
      "remote_critic_rm" (dict
        "combine_rm_and_critic_server" $v.combineRewardAndCritic
        "reward_model" (dict "ip" $rewardHost "port" $p.reward)
        "critic" (dict "ip" $criticHost "port" (ternary $p.reward $p.critic $v.combineRewardAndCritic)))
      "remote" (dict
        "generation" (dict "ip" $generationHost "port" $p.tritonGrpc)
        "generation_control" (dict "ip" $generationHost "port" $p.generation)
        "reference" (dict "ip" (include "aligner.endpointHost" (dict "root" . "component" "reference")) "port" $p.reference)) -}}
{{- $_ := set $configs "ppo.yaml" (mustMergeOverwrite (dict) $base (deepCopy $v.orchestrator.config) $fixed) -}}
{{- toYaml $configs -}}
{{- end -}}

{{/* sha256 of one component's config, for a pod annotation that rolls the pods when it changes. */}}
{{- define "aligner.configChecksum" -}}
{{- index (include "aligner.configs" .root | fromYaml) (printf "%s.yaml" .component) | toYaml | sha256sum -}}
{{- end -}}
