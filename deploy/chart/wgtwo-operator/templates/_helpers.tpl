{{- define "wgtwo-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wgtwo-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wgtwo-operator.labels" -}}
{{ include "wgtwo-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wgtwo-operator.serviceAccountName" -}}
{{- default (include "wgtwo-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The rules the operator needs on grants, their Secrets and Events, wherever grants live. */}}
{{- define "wgtwo-operator.grantRules" -}}
# Watch grants (list/watch feed the cache; get re-reads a grant's status before a requested refresh).
- apiGroups: ["auth.wgtwo.com"]
  resources: ["wgtwogrants"]
  verbs: ["get", "list", "watch"]
# Write the Ready condition, expiry and schedule (server-side apply of the status subresource).
- apiGroups: ["auth.wgtwo.com"]
  resources: ["wgtwogrants/status"]
  verbs: ["get", "patch"]
# get: read the client and refresh-token Secrets a grant names, and its own state/target Secrets.
# list/watch: react when one of those Secrets changes (the operator watches metadata only).
# create/update: write the target Secret and the state Secret (optimistic concurrency).
# No delete or patch: owner references let Kubernetes remove them with the grant.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update"]
# Events on grants (Refreshed, InvalidGrant, ...); patch updates a repeated Event's count.
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
