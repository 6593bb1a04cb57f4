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

{{/* The container image, repository:tag (tag defaults to the chart's appVersion). */}}
{{- define "iotistic.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The Secret holding DATABASE_URL and ADMIN_TOKEN: existingSecret, or the chart's own. */}}
{{- define "iotistic.secretName" -}}
{{- default (include "iotistic.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* The Secret of the bus users' passwords (keys signup ... operator): bus.existingSecret, or the chart's own. */}}
{{- define "iotistic.busSecretName" -}}
{{- default (printf "%s-bus" (include "iotistic.fullname" .) | trunc 63 | trimSuffix "-") .Values.bus.existingSecret }}
{{- end }}

{{/* Where each target and the events-init Job find their bus password: NATS_CREDENTIALS_DIR. */}}
{{- define "iotistic.busCredentialsDir" -}}
/run/iotistic/nats
{{- end }}
