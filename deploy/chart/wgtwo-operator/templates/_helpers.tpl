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
# list/watch: grants come from the watch cache.
# get: only when Secrets a grant keeps have vanished, to tell its deletion (the garbage collector
# removes them, possibly before the watch shows the grant going) from Secrets deleted by hand.
- apiGroups: ["auth.wgtwo.com"]
  resources: ["wgtwogrants"]
  verbs: ["get", "list", "watch"]
# Write the Ready condition, expiry and schedule (server-side apply of the status subresource).
- apiGroups: ["auth.wgtwo.com"]
  resources: ["wgtwogrants/status"]
  verbs: ["patch"]
# get: read the client and refresh-token Secrets a grant names when they changed.
# list/watch: the metadata of every Secret (to react to changes), and the operator's own state and
# target Secrets (label app.kubernetes.io/managed-by=wgtwo-operator) with their data.
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
