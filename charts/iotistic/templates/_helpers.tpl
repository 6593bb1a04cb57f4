{{/*
Shared names and labels. Helpers that concern one target take a dict:
  (dict "root" $ "target" "<name>")   - root is the chart's top-level context.
*/}}

{{/* The chart's name, or nameOverride. */}}
{{- define "iotistic.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name for every resource, at most 63 characters. */}}
{{- define "iotistic.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* chart-name-version, for the helm.sh/chart label. */}}
{{- define "iotistic.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The name of one target's Deployment, Service and PodDisruptionBudget: <fullname>-<target>. */}}
{{- define "iotistic.targetName" -}}
{{- printf "%s-%s" (include "iotistic.fullname" .root) .target | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select a target's pods (or, with an empty target, the release's). */}}
{{- define "iotistic.selectorLabels" -}}
app.kubernetes.io/name: {{ include "iotistic.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .target }}
app.kubernetes.io/component: {{ .target }}
{{- end }}
{{- end }}

{{/* Every label of a resource. */}}
{{- define "iotistic.labels" -}}
helm.sh/chart: {{ include "iotistic.chart" .root }}
{{ include "iotistic.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: iotistic
{{- end }}

{{/*
The container image: repository:tag (tag defaults to the chart's appVersion), and @digest when
image.digest is set. The targets, the events-init Job and every instance (INSTANCE_IMAGE) run it.
*/}}
{{- define "iotistic.image" -}}
{{- $image := printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- with .Values.image.digest }}
{{- if not (regexMatch "^sha256:[0-9a-f]{64}$" .) }}
{{- fail "image.digest must be sha256:<64 hex digits>, the digest your registry printed" }}
{{- end }}
{{- $image = printf "%s@%s" $image . }}
{{- end }}
{{- $image }}
{{- end }}

{{/* The Secret of the secret settings: existingSecret, or the chart's own. */}}
{{- define "iotistic.secretName" -}}
{{- default (include "iotistic.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* The Secret of DATABASE_URL: the bundled Postgres's own, or that of the secret settings. */}}
{{- define "iotistic.databaseSecretName" -}}
{{- if .Values.postgresql.enabled }}
{{- include "iotistic.postgresqlSecretName" . }}
{{- else }}
{{- include "iotistic.secretName" . }}
{{- end }}
{{- end }}

{{/* The Secret of LICENSE_PRIVATE_KEY (licensing's pods only): existingSecret, or its own. */}}
{{- define "iotistic.licensingKeySecretName" -}}
{{- default (printf "%s-licensing-key" (include "iotistic.fullname" .) | trunc 63 | trimSuffix "-") .Values.secrets.existingSecret }}
{{- end }}

{{/* The bundled Postgres's StatefulSet, Service and Secret: <fullname>-postgresql. */}}
{{- define "iotistic.postgresqlName" -}}
{{- printf "%s-postgresql" (include "iotistic.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The bundled Postgres's Secret (password, DATABASE_URL): postgresql.existingSecret, or its own. */}}
{{- define "iotistic.postgresqlSecretName" -}}
{{- default (include "iotistic.postgresqlName" .) .Values.postgresql.existingSecret }}
{{- end }}

{{/* Labels that select the bundled Postgres's pod. */}}
{{- define "iotistic.postgresqlSelectorLabels" -}}
{{ include "iotistic.selectorLabels" (dict "root" . "target" "postgresql") }}
{{- end }}

{{/*
The secret settings each target reads, beyond DATABASE_URL (every target's): a dict of
target -> {required: [...], optional: [...]}. The one table of who holds which secret.
*/}}
{{- define "iotistic.secretKeys" -}}
signup:
  required: [ADMIN_TOKEN, SESSION_SECRET, LOGIN_RELAY_SECRET, DATA_KEYS_MASTER_KEY]
  optional: [NATS_URL]
licensing:
  required: [ADMIN_TOKEN, SESSION_SECRET]
  optional: [NATS_URL]
billing:
  required: [ADMIN_TOKEN, SESSION_SECRET, USAGE_SECRET, DATA_KEYS_MASTER_KEY]
  optional: [NATS_URL, STRIPE_SECRET_KEY, STRIPE_WEBHOOK_SECRET]
provisioner:
  required: [ADMIN_TOKEN, SESSION_SECRET, PROVISIONER_SECRET, USAGE_SECRET, LOGIN_RELAY_SECRET]
  optional: [NATS_URL]
{{- end }}

{{/*
One target's secret settings as container env entries (secretKeyRef, one key each), taking a
dict (root, target). A pod of another workload that runs as a target (e.g. a provisioner
worker) includes it with that target's name and gets exactly the same.
*/}}
{{- define "iotistic.secretEnv" -}}
{{- $root := .root }}
{{- $keys := index (include "iotistic.secretKeys" $root | fromYaml) .target }}
{{- $secret := include "iotistic.secretName" $root }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "iotistic.databaseSecretName" $root }}
      key: DATABASE_URL
{{- range $keys.required }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
{{- end }}
{{- range $keys.optional }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ . }}
      optional: true
{{- end }}
{{- if eq .target "licensing" }}
# Only licensing's pods hold the license signing key.
- name: LICENSE_PRIVATE_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "iotistic.licensingKeySecretName" $root }}
      key: LICENSE_PRIVATE_KEY
{{- end }}
{{- end }}

{{/* A target's URL inside the cluster: http://<fullname>-<target>.<namespace>.svc:<port>. */}}
{{- define "iotistic.serviceUrl" -}}
{{- printf "http://%s.%s.svc:%v" (include "iotistic.targetName" .) .root.Release.Namespace .root.Values.service.port }}
{{- end }}

{{/*
Settings the chart derives for one target (dict root, target), as env entries: the provisioner's
instance image, domain and the control-plane URLs it hands every instance; signup's proxy hops
and public URL.
*/}}
{{- define "iotistic.targetEnv" -}}
{{- $root := .root }}
{{- if eq .target "provisioner" }}
{{- $p := $root.Values.targets.provisioner }}
- name: INSTANCE_IMAGE
  value: {{ include "iotistic.image" $root | quote }}
- name: BASE_DOMAIN
  value: {{ include "iotistic.baseDomain" $root | quote }}
# Instances verify their license with licensing's keys, sign customers in through signup and
# report usage to billing, each at its Service.
- name: LICENSE_JWKS_URL
  value: {{ printf "%s/.well-known/jwks.json" (include "iotistic.serviceUrl" (dict "root" $root "target" "licensing")) | quote }}
- name: CONTROL_PLANE_URL
  value: {{ include "iotistic.serviceUrl" (dict "root" $root "target" "signup") | quote }}
- name: USAGE_URL
  value: {{ include "iotistic.serviceUrl" (dict "root" $root "target" "billing") | quote }}
{{- if $p.kubernetesBackend.enabled }}
{{- $worker := include "iotistic.targetName" (dict "root" $root "target" "provisioner-worker") }}
- name: PROVISIONER_BACKEND
  value: "kubernetes"
# The worker reads inside a tenant namespace only through the RoleBinding each tenant's
# manifest set holds: this reader role (templates/provisioner-rbac.yaml) bound to the worker.
- name: KUBERNETES_TENANT_READER_ROLE
  value: {{ printf "%s-tenant-reader" $worker | quote }}
- name: KUBERNETES_WORKER_SERVICE_ACCOUNT
  value: {{ printf "%s:%s" $root.Release.Namespace $worker | quote }}
{{- end }}
# What each tenant's HTTPRoute and NetworkPolicies name: this release's namespace and name
# label (the services instances may call), its Gateway and where the Gateway's proxies run.
- name: KUBERNETES_NAMESPACE_PREFIX
  value: {{ $p.kubernetesBackend.namespacePrefix | quote }}
- name: KUBERNETES_CONTROL_PLANE_NAMESPACE
  value: {{ $root.Release.Namespace | quote }}
- name: KUBERNETES_CONTROL_PLANE_NAME
  value: {{ include "iotistic.name" $root | quote }}
- name: KUBERNETES_GATEWAY_NAME
  value: {{ $root.Values.gateway.name | quote }}
- name: KUBERNETES_GATEWAY_PROXY_NAMESPACE
  value: {{ $root.Values.gateway.namespace | quote }}
- name: KUBERNETES_GATEWAY_TRAFFIC_POLICY
  value: {{ $root.Values.gateway.envoyGateway.enabled | toString | quote }}
{{- end }}
{{- if and (eq .target "signup") $root.Values.gateway.enabled }}
- name: TRUSTED_PROXY_HOPS
  value: {{ $root.Values.gateway.trustedProxyHops | toString | quote }}
{{- end }}
{{- if eq .target "signup" }}
# The base of the links signup mails (reset, verification): the public API address, never a
# request's Host header. targets.signup.publicUrl overrides it (a gateway of your own, say).
- name: PUBLIC_URL
  value: {{ $root.Values.targets.signup.publicUrl | default (printf "https://api.%s" (include "iotistic.baseDomain" $root)) | quote }}
{{- end }}
{{- end }}

{{/* baseDomain, required, without a leading "*." or dot. */}}
{{- define "iotistic.baseDomain" -}}
{{- $domain := required "baseDomain is required: the platform's domain (api.<baseDomain> serves the API, <customer>.<baseDomain> each instance), e.g. --set baseDomain=example.com" .Values.baseDomain }}
{{- if not (regexMatch "^([a-z0-9]([-a-z0-9]*[a-z0-9])?\\.)+[a-z]{2,63}$" $domain) }}
{{- fail (printf "baseDomain %q is not a lower-case DNS name such as example.com" $domain) }}
{{- end }}
{{- $domain }}
{{- end }}

{{/*
The bundled NATS's client Service (and so the default NATS_URL): <release>-nats, the name the
official NATS chart gives it too, so NATS_URL stays put when an operator moves to that chart.
*/}}
{{- define "iotistic.natsFullname" -}}
{{- printf "%s-nats" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The NATS StatefulSet and its headless Service, as nats.conf's routes name them
(<statefulSetName>-<i>.<headlessService>): natsConfig's names, or <release>-nats and
<release>-nats-headless. The bundled StatefulSet takes its names from here, so its pods are
always the routes' peers.
*/}}
{{- define "iotistic.natsStatefulSetName" -}}
{{- default (include "iotistic.natsFullname" .) .Values.natsConfig.statefulSetName | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "iotistic.natsHeadlessServiceName" -}}
{{- default (printf "%s-headless" (include "iotistic.natsFullname" .)) .Values.natsConfig.headlessService | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the bundled NATS's pods. */}}
{{- define "iotistic.natsSelectorLabels" -}}
{{ include "iotistic.selectorLabels" (dict "root" . "target" "nats") }}
{{- end }}

{{/* NATS_URL for the ConfigMap: config.NATS_URL, or the bundled NATS's Service. */}}
{{- define "iotistic.natsUrl" -}}
{{- if index .Values.config "NATS_URL" }}
{{- index .Values.config "NATS_URL" }}
{{- else if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc:4222" (include "iotistic.natsFullname" .) .Release.Namespace }}
{{- end }}
{{- end }}

{{/* The Secret of the NATS server's configuration (templates/bus.yaml): <release>-nats-bus. */}}
{{- define "iotistic.natsConfigSecretName" -}}
{{- printf "%s-nats-bus" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Secret of the bus users' passwords (keys signup ... operator): bus.existingSecret, or the chart's own. */}}
{{- define "iotistic.busSecretName" -}}
{{- default (printf "%s-bus" (include "iotistic.fullname" .) | trunc 63 | trimSuffix "-") .Values.bus.existingSecret }}
{{- end }}

{{/* Where each target and the events-init Job find their bus password: NATS_CREDENTIALS_DIR. */}}
{{- define "iotistic.busCredentialsDir" -}}
/run/iotistic/nats
{{- end }}

{{/* Egress rules every target needs beyond DNS: the bundled NATS and Postgres. */}}
{{- define "iotistic.networkPolicy.backendEgress" -}}
{{- if .Values.nats.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "iotistic.natsSelectorLabels" . | nindent 10 }}
  ports:
    - {protocol: TCP, port: 4222}
{{- end }}
{{- if .Values.postgresql.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "iotistic.postgresqlSelectorLabels" . | nindent 10 }}
  ports:
    - {protocol: TCP, port: 5432}
{{- end }}
{{- end }}
