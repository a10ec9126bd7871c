{{/* Chart name. */}}
{{- define "bbo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: resource name prefix, also the leader-election Lease name. */}}
{{- define "bbo.fullname" -}}
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

{{- define "bbo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "bbo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "bbo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "bbo.labels" -}}
helm.sh/chart: {{ include "bbo.chart" . }}
{{ include "bbo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: bitbucket-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "bbo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "bbo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "bbo.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when leader election is on: forced by replicas > 1. */}}
{{- define "bbo.leaderElection" -}}
{{- if or (gt (int .Values.replicas) 1) .Values.leaderElection.enabled }}true{{ else }}false{{ end }}
{{- end }}

{{/* The namespaced rules: custom resources, Secrets, Events. */}}
{{- define "bbo.namespacedRules" -}}
- apiGroups: ["connectors.dev"]
  resources: ["bitbucketconnectors", "bitbucketaccessgrants"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["connectors.dev"]
  resources: ["bitbucketconnectors/status", "bitbucketaccessgrants/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["connectors.dev"]
  resources: ["bitbucketconnectors/finalizers", "bitbucketaccessgrants/finalizers"]
  verbs: ["patch", "update"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: {{ if .Values.rbac.secretWrite }}["get", "list", "watch", "update", "patch"]{{ else }}["get", "list", "watch"]{{ end }}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* The cluster-scoped rules: authentication of HTTP API callers. */}}
{{- define "bbo.authRules" -}}
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
- apiGroups: ["authorization.k8s.io"]
  resources: ["subjectaccessreviews"]
  verbs: ["create"]
{{- end }}
