{{/* Names, labels and the pieces every aimesh pod shares. */}}

{{- define "aimesh.labels" -}}
app.kubernetes.io/name: aimesh-tasks
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{- define "aimesh.selector" -}}
app.kubernetes.io/name: aimesh-tasks
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Pods that may reach Redis, Postgres and RabbitMQ (their NetworkPolicies admit these). */}}
{{- define "aimesh.clientLabel" -}}
aimesh-tasks/client: "true"
{{- end }}

{{- define "aimesh.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "aimesh.secretName" -}}
{{ .Values.secrets.existingSecret | default (printf "%s-secrets" .Release.Name) }}
{{- end }}

{{- define "aimesh.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
{{- end }}

{{- define "aimesh.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop:
    - ALL
{{- end }}

{{- define "aimesh.envFrom" -}}
envFrom:
- configMapRef:
    name: {{ .Release.Name }}-config
- secretRef:
    name: {{ include "aimesh.secretName" . }}
{{- end }}

{{/* An aimesh container: name, command and resources from the dict; image, env, security. */}}
{{- define "aimesh.container" -}}
- name: {{ .name }}
  image: {{ include "aimesh.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command:
  {{- toYaml .command | nindent 2 }}
  {{- include "aimesh.envFrom" .root | nindent 2 }}
  {{- if .metricsPort }}
  env:
  - name: AIMESH_WORKER_METRICS_PORT
    value: {{ .metricsPort | quote }}
  - name: PROMETHEUS_MULTIPROC_DIR
    value: /tmp/aimesh-metrics
  {{- else if .multiproc }}
  env:
  - name: PROMETHEUS_MULTIPROC_DIR
    value: /tmp/aimesh-metrics
  {{- end }}
  {{- include "aimesh.containerSecurity" . | nindent 2 }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
  - name: tmp
    mountPath: /tmp
  {{- with .port }}
  ports:
  - name: {{ .name }}
    containerPort: {{ .number }}
  {{- end }}
{{- end }}

{{/* The broker's host and the URLs the Secret carries. */}}
{{- define "aimesh.redisHost" -}}
{{- if .Values.redis.enabled -}}
{{ .Release.Name }}-redis.{{ .Release.Namespace }}.svc.cluster.local
{{- else -}}
{{ required "redis.host: give your Redis server's host (or redis.enabled: true)" .Values.redis.host }}
{{- end }}
{{- end }}

{{- define "aimesh.postgresHost" -}}
{{- if .Values.postgres.enabled -}}
{{ .Release.Name }}-postgres.{{ .Release.Namespace }}.svc.cluster.local
{{- else -}}
{{ required "postgres.host: give your Postgres server's host (or postgres.enabled: true)" .Values.postgres.host }}
{{- end }}
{{- end }}

{{- define "aimesh.rabbitmqHost" -}}
{{- if .Values.rabbitmq.enabled -}}
{{ .Release.Name }}-rabbitmq.{{ .Release.Namespace }}.svc.cluster.local
{{- else -}}
{{ required "rabbitmq.host: give your RabbitMQ server's host (or rabbitmq.enabled: true)" .Values.rabbitmq.host }}
{{- end }}
{{- end }}

{{/* A Deployment of `aimesh worker` and how it scales: a KEDA ScaledObject on its queues
     (keda) or a fixed count (replicas). */}}
{{- define "aimesh.worker" -}}
{{- $root := .root }}
{{- $scaling := .scaling }}
{{- if and $scaling.keda (hasKey $scaling "replicas") }}
{{- fail (printf "%s: give replicas or keda, not both" .where) }}
{{- end }}
{{- if not (or $scaling.keda (hasKey $scaling "replicas")) }}
{{- fail (printf "%s: give replicas (a fixed count) or keda (bounds for the scaler)" .where) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "aimesh.labels" . | nindent 4 }}
    {{- with .group }}
    aimesh-tasks/endpoint-group: {{ . }}
    {{- end }}
spec:
  {{- if not $scaling.keda }}
  replicas: {{ $scaling.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "aimesh.selector" . | nindent 6 }}
      {{- with .group }}
      aimesh-tasks/endpoint-group: {{ . }}
      {{- end }}
  template:
    metadata:
      labels:
        {{- include "aimesh.selector" . | nindent 8 }}
        {{- with .group }}
        aimesh-tasks/endpoint-group: {{ . }}
        {{- end }}
        {{- include "aimesh.clientLabel" . | nindent 8 }}
      annotations:
        prometheus.io/scrape: "true"
        prometheus.io/port: "9100"
        prometheus.io/path: /metrics
    spec:
      {{- include "aimesh.podSecurity" . | nindent 6 }}
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      containers:
      {{- include "aimesh.container" (dict "root" $root "name" "worker" "command" .command "resources" .resources "metricsPort" "9100" "port" (dict "name" "metrics" "number" 9100)) | nindent 6 }}
      volumes:
      - name: tmp
        emptyDir: {}
{{- with $scaling.keda }}
---
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata:
  name: {{ $.name }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "aimesh.labels" $ | nindent 4 }}
spec:
  scaleTargetRef:
    name: {{ $.name }}
  {{- /* not `default`: a minimum of 0 (scale to zero) is empty to it */}}
  minReplicaCount: {{ if hasKey . "minReplicas" }}{{ .minReplicas }}{{ else }}1{{ end }}
  maxReplicaCount: {{ .maxReplicas }}
  pollingInterval: {{ .pollingInterval | default 10 }}
  cooldownPeriod: {{ .cooldownPeriod | default 120 }}
  triggers:
  {{- $length := .queueLength | default 20 }}
  {{- range $.queues }}
  {{- include "aimesh.trigger" (dict "root" $root "queue" . "length" $length) | nindent 2 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* One KEDA trigger on one queue's length, for the broker in use. Redis: KEDA reads the
     plain list; messages published with a priority wait in kombu's sub-queues, which
     aimesh_queue_depth_messages (the exporter) includes. */}}
{{- define "aimesh.trigger" -}}
{{- if eq .root.Values.broker "rabbitmq" -}}
- type: rabbitmq
  metadata:
    protocol: amqp
    queueName: {{ .queue }}
    mode: QueueLength
    value: {{ .length | quote }}
    activationValue: "1"
  authenticationRef:
    name: {{ .root.Release.Name }}-broker
{{- else -}}
- type: redis
  metadata:
    address: {{ include "aimesh.redisHost" .root }}:6379
    databaseIndex: "0"
    listName: {{ .queue }}
    listLength: {{ .length | quote }}
    activationListLength: "1"
  authenticationRef:
    name: {{ .root.Release.Name }}-broker
{{- end }}
{{- end }}

{{/* The NetworkPolicy of a data store: only aimesh client pods (and KEDA's operator when
     `keda` is set) may open its port. */}}
{{- define "aimesh.storePolicy" -}}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ .root.Release.Name }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "aimesh.labels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "aimesh.selector" . | nindent 6 }}
  policyTypes:
  - Ingress
  ingress:
  - from:
    - podSelector:
        matchLabels:
          app.kubernetes.io/instance: {{ .root.Release.Name }}
          {{- include "aimesh.clientLabel" . | nindent 10 }}
    {{- if .keda }}
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: {{ .root.Values.keda.namespace }}
      podSelector:
        matchLabels:
          {{- toYaml .root.Values.keda.operatorLabels | nindent 10 }}
    {{- end }}
    ports:
    - protocol: TCP
      port: {{ .port }}
{{- end }}

{{/* A ClusterIP Service in front of one component's port. */}}
{{- define "aimesh.service" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .root.Release.Name }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "aimesh.labels" . | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "aimesh.selector" . | nindent 4 }}
  ports:
  - name: {{ .portName }}
    port: {{ .port }}
    targetPort: {{ .portName }}
{{- end }}
