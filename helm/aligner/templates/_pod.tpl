{{/*
The pod template shared by every workload. Call with a dict:
  root        the chart's root context ($)
  component   generation | reference | reward | critic | reward-critic | scoring | orchestrator
  values      that component's values section
  image       its entry in .Values.images
  command     container command (list; optional: the image's entrypoint `aligner` otherwise)
  args        container args (list)
  ports       container ports (list of {name, containerPort})
  healthPort  the gRPC port probed through grpc.health.v1 (0 = no probes: the orchestrator)
  execProbe   a command for exec probes instead of the kubelet's gRPC probe (TLS), optional
  checkpoints mount the checkpoint volume read-write (the critic and the orchestrator)
  scoring     mount the scoring endpoint's token and TLS Secrets
  initContainers  YAML list, optional
  podSpec     extra pod spec fields (dict), optional
*/}}
{{- define "aligner.pod" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $d := $v.defaults -}}
{{- $values := .values -}}
metadata:
  labels:
    {{- include "aligner.componentLabels" (dict "root" $root "component" .component) | nindent 4 }}
  annotations:
    checksum/config: {{ include "aligner.configChecksum" (dict "root" $root "component" (ternary "ppo" .component (eq .component "orchestrator"))) }}
    {{- with (merge (dict) $values.podAnnotations $d.podAnnotations) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "aligner.serviceAccountName" $root }}
  # Nothing here talks to the Kubernetes API; no service links either (they would only add
  # environment variables named after every Service in the namespace).
  automountServiceAccountToken: false
  enableServiceLinks: false
  terminationGracePeriodSeconds: {{ $d.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $d.podSecurityContext | nindent 4 }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $d.nodeSelector $values.nodeSelector) }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $d.tolerations $values.tolerations) }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (default $d.affinity $values.affinity) }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .podSpec }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with .initContainers }}
  initContainers:
    {{- . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "aligner.image" (dict "root" $root "image" .image) }}
      imagePullPolicy: {{ .image.pullPolicy }}
      {{- with .command }}
      command:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      args:
        {{- toYaml .args | nindent 8 }}
      {{- $env := concat $d.env $values.env }}
      {{- if .healthPort }}
      {{- $env = prepend $env (dict "name" "ALIGNER_HEALTH_PORT" "value" (toString .healthPort)) }}
      {{- end }}
      {{- with $env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        {{- range .ports }}
        - name: {{ .name }}
          containerPort: {{ .containerPort }}
          protocol: TCP
        {{- end }}
      {{- $resources := deepCopy (default (dict) $values.resources) }}
      {{- $gpus := int (default 0 (coalesce $values.gpus $values.gpusPerNode)) }}
      {{- if gt $gpus 0 }}
      {{- $_ := set $resources "limits" (merge (dict $v.gpuResource $gpus) (default (dict) $resources.limits)) }}
      {{- $_ := set $resources "requests" (merge (dict $v.gpuResource $gpus) (default (dict) $resources.requests)) }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml $d.securityContext | nindent 8 }}
      {{- if .healthPort }}
      {{- $check := dict "grpc" (dict "port" .healthPort) }}
      {{- if .execProbe }}{{ $check = dict "exec" (dict "command" .execProbe) }}{{ end }}
      startupProbe:
        {{- toYaml (merge (deepCopy $check) $d.probes.startup) | nindent 8 }}
      livenessProbe:
        {{- toYaml (merge (deepCopy $check) $d.probes.liveness) | nindent 8 }}
      readinessProbe:
        {{- toYaml (merge (deepCopy $check) $d.probes.readiness) | nindent 8 }}
      {{- end }}
      volumeMounts:
        - name: config
          mountPath: /etc/aligner
          readOnly: true
        - name: data
          mountPath: {{ $v.storage.data.mountPath }}
          readOnly: true
        {{- if .checkpoints }}
        - name: checkpoints
          mountPath: {{ $v.storage.checkpoints.mountPath }}
        {{- end }}
        - name: shm
          mountPath: /dev/shm
        {{- if and .scoring $v.scoring.auth.enabled }}
        - name: auth
          mountPath: /etc/aligner-auth
          readOnly: true
        {{- end }}
        {{- if and .scoring $v.scoring.tls.enabled }}
        - name: tls
          mountPath: /etc/aligner-tls
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ include "aligner.fullname" $root }}-config
    - name: data
      persistentVolumeClaim:
        claimName: {{ include "aligner.claimName" (dict "root" $root "volume" "data") }}
        readOnly: true
    {{- if .checkpoints }}
    - name: checkpoints
      persistentVolumeClaim:
        claimName: {{ include "aligner.claimName" (dict "root" $root "volume" "checkpoints") }}
    {{- end }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $d.shmSize }}
    {{- if and .scoring $v.scoring.auth.enabled }}
    - name: auth
      secret:
        secretName: {{ include "aligner.scoringSecretName" $root }}
        items:
          - key: {{ $v.scoring.auth.secretKey }}
            path: token
    {{- end }}
    {{- if and .scoring $v.scoring.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ required "scoring.tls.existingSecret: name the kubernetes.io/tls Secret holding the scoring endpoint's certificate" $v.scoring.tls.existingSecret }}
    {{- end }}
{{- end -}}
