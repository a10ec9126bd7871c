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
  verbs: ["get", "list", "watch"]
{{- if .Values.credentialRotation.enabled }}
# Credential rotation writes the rotated ConductorOne pair into an
# operator-owned Secret (<connector>-conductorone by default), never the
# user's. RBAC cannot limit create by name, so create is namespace-wide;
# update and patch are limited to secretNames when set. Never delete: the
# Secret is garbage-collected with its connector (owner reference).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
- apiGroups: [""]
  resources: ["secrets"]
  {{- with .Values.credentialRotation.secretNames }}
  resourceNames: {{ toJson . }}
  {{- end }}
  verbs: ["update", "patch"]
{{- end }}
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

{{/* Non-empty when watchNamespaces is ["*"]: the whole cluster, chosen
explicitly. "*" cannot be mixed with names. */}}
{{- define "bbo.watchAll" -}}
{{- if has "*" .Values.watchNamespaces -}}
{{- if ne (len .Values.watchNamespaces) 1 -}}
{{- fail "watchNamespaces: \"*\" (the whole cluster) cannot be combined with namespace names" -}}
{{- end -}}
true
{{- end -}}
{{- end }}

{{/* The namespaces watched when not the whole cluster, as a JSON list:
watchNamespaces, or the release namespace when it is empty. Never the whole
cluster by default. */}}
{{- define "bbo.watchedNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson .Values.watchNamespaces -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end }}

{{/* Name of the TLS Secret of the data API ("" without TLS). */}}
{{- define "bbo.dataApiTlsSecret" -}}
{{- if .Values.dataApi.tls.certManager.enabled -}}
{{- printf "%s-data-api-tls" (include "bbo.fullname" .) -}}
{{- else -}}
{{- .Values.dataApi.tls.secretName -}}
{{- end -}}
{{- end }}
