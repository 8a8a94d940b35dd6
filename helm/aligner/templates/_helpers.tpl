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
