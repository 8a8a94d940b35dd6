{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "aligner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Room is left for the longest suffix ("-reward-critic", "-ppo-ranks") within 63 characters. */}}
{{- define "aligner.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 45 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "aligner.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "aligner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: aligner
{{- end -}}

{{/* Labels of one component; call with (dict "root" $ "component" "generation"). */}}
{{- define "aligner.componentLabels" -}}
{{ include "aligner.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "aligner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "aligner.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "aligner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "aligner.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The DNS name of a component's Service; call with (dict "root" $ "component" "reference"). */}}
{{- define "aligner.host" -}}
{{- printf "%s-%s.%s.svc.%s" (include "aligner.fullname" .root) .component .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* image: call with (dict "root" $ "image" .Values.images.generation). */}}
{{- define "aligner.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{- define "aligner.claimName" -}}
{{- $volume := index .root.Values.storage .volume -}}
{{- default (printf "%s-%s" (include "aligner.fullname" .root) .volume) $volume.existingClaim -}}
{{- end -}}

{{- define "aligner.scoringSecretName" -}}
{{- default (printf "%s-scoring-auth" (include "aligner.fullname" .)) .Values.scoring.auth.existingSecret -}}
{{- end -}}

{{/* Which model services run: component -> (values key, CLI role, gRPC port, config schema). */}}
{{- define "aligner.modelServices" -}}
{{- $p := .Values.ports -}}
{{- $services := dict "reference" (dict "key" "reference" "role" "reference" "port" $p.reference) -}}
{{- if .Values.combineRewardAndCritic -}}
{{- $_ := set $services "reward-critic" (dict "key" "rewardCritic" "role" "reward-critic" "port" $p.reward "trains" true) -}}
{{- else -}}
{{- $_ := set $services "reward" (dict "key" "reward" "role" "reward" "port" $p.reward) -}}
{{- $_ := set $services "critic" (dict "key" "critic" "role" "critic" "port" $p.critic "trains" true) -}}
{{- end -}}
{{- if .Values.scoring.enabled -}}
{{- $_ := set $services "scoring" (dict "key" "scoring" "role" "reward" "port" $p.reward "public" true) -}}
{{- end -}}
{{- toYaml $services -}}
{{- end -}}

{{/* The DNS name of pod 0 of a component's StatefulSet (its Service is the StatefulSet's
     governing headless Service): <release>-aligner-critic-0.<release>-aligner-critic.<ns>.svc.<domain>. */}}
{{- define "aligner.podHost" -}}
{{- $name := printf "%s-%s" (include "aligner.fullname" .root) .component -}}
{{- printf "%s-0.%s.%s.svc.%s" $name $name .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* The host the orchestrator calls a component at: the one pod of a component that trains
     (the critic, the reward-critic: single-writer, see aligner.configs), else the component's
     headless Service, whose DNS name lists every ready replica. Call with (dict "root" $ "component" "critic"). */}}
{{- define "aligner.endpointHost" -}}
{{- if has .component (list "critic" "reward-critic") -}}
{{- include "aligner.podHost" . -}}
{{- else -}}
{{- include "aligner.host" . -}}
{{- end -}}
{{- end -}}

{{/*
How a model pod starts its server. Call with (dict "root" $ "key" "reference" "role" "reference"
"config" "/etc/aligner/reference.yaml"); `key` is the component's section of the values.
Output: YAML {command: [...], args: [...]}.
  gpus 0 or 1: the image's entrypoint, `aligner serve <role> --config <file> <extraArgs>`.
  gpus N > 1:  one model copy sharded over the pod's N GPUs: torchrun with one rank per GPU and
    model.tensor_model_parallel_size=N (services/tensor_parallel.py: rank 0 serves gRPC/Triton
    and sends every model call to the other ranks). More copies are more replicas (pods), never
    more ranks in a pod. `python -m torch.distributed.run` is torchrun started by the image's
    venv interpreter: the base image's `torchrun` script starts its workers with the base's own
    Python, which does not see the venv that aligner is installed in.
The chart owns the TP size: a different one in `config` or any in `extraArgs` fails here, since
the pod's GPU request and the job's ranks are sized from `gpus`.
*/}}
{{- define "aligner.serveCommand" -}}
{{- $values := index .root.Values .key -}}
{{- $gpus := int (default 0 $values.gpus) -}}
{{- $tp := max $gpus 1 -}}
{{- $set := dig "model" "tensor_model_parallel_size" nil (default (dict) $values.config) -}}
{{- if and (not (kindIs "invalid" $set)) (ne (int $set) (int $tp)) -}}
{{- fail (printf "%s.config.model.tensor_model_parallel_size is %v but %s.gpus is %d: a model pod is one model copy sharded over all its GPUs, so the chart sets the tensor-parallel size to gpus; remove the key or change %s.gpus" .key $set .key $gpus .key) -}}
{{- end -}}
{{- range $values.extraArgs -}}
{{- if regexMatch "^\\+{0,2}model\\.tensor_model_parallel_size=" . -}}
{{- fail (printf "%s.extraArgs: %q: the chart sets model.tensor_model_parallel_size from %s.gpus (one model copy sharded over the pod's GPUs); remove it" $.key . $.key) -}}
{{- end -}}
{{- end -}}
{{- $serve := concat (list "serve" .role "--config" .config) (default (list) $values.extraArgs) -}}
{{- if gt $gpus 1 -}}
{{- toYaml (dict
      "command" (list "python" "-m" "torch.distributed.run")
      "args" (concat (list (printf "--nproc-per-node=%d" $gpus) "--standalone" "-m" "services.cli") $serve
                     (list (printf "model.tensor_model_parallel_size=%d" $gpus)))) -}}
{{- else -}}
{{- toYaml (dict "command" (list) "args" $serve) -}}
{{- end -}}
{{- end -}}

{{/*
Values that the schema cannot judge alone; each failure says why in one line.
*/}}
{{- define "aligner.validate" -}}
{{- $v := .Values -}}
{{- $training := dict
      "critic" (list "the critic server" "scoring scales with reward.replicas")
      "rewardCritic" (list "the reward-critic server" "to spread scoring, set combineRewardAndCritic: false and raise reward.replicas") -}}
{{- range $key, $about := $training -}}
{{- $replicas := int (index $v $key).replicas -}}
{{- if ne $replicas 1 -}}
{{- fail (printf "%s.replicas is %d but must be 1: %s trains the critic, which is single-writer (one optimizer state; each rollout id is applied at most once), so it runs as exactly one pod and the orchestrator refuses a critic endpoint with several addresses; %s" $key $replicas (index $about 0) (index $about 1)) -}}
{{- end -}}
{{- end -}}
{{- $g := $v.generation -}}
{{- $engine := dig "engine" "torch" (default (dict) $g.config) -}}
{{- if gt (int $g.gpus) 1 -}}
{{- if eq $engine "tensorrt_llm" -}}
{{- fail (printf "generation.gpus is %d with generation.config.engine=tensorrt_llm, which cannot run: the TensorRT-LLM engine is built for one GPU (tp_size 1, services/generation/trtllm_engine.py), so a model that needs %d GPUs would not load. Set generation.gpus: 1 and scale generation.replicas, or use engine: torch, which runs tensor-parallel over the pod's GPUs" (int $g.gpus) (int $g.gpus)) -}}
{{- end -}}
{{- if eq (dig "decode" "" (default (dict) $g.config)) "fused" -}}
{{- fail (printf "generation.config.decode=fused with generation.gpus %d: the fused decode step covers tensor-parallel size 1 only; remove the key (the chart sets decode: megatron when gpus > 1) or set generation.gpus: 1" (int $g.gpus)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
