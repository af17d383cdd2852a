{{/*
Names follow the usual Helm scaffold: <release>-<chart> unless the release name already
contains the chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "svid-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "svid-bridge.fullname" -}}
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

{{- define "svid-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "svid-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "svid-bridge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "svid-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: node-plugin
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "svid-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "svid-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* global.spire.trustDomain (set once for the SPIRE chart and its siblings) wins. */}}
{{- define "svid-bridge.trustDomain" -}}
{{- $global := dig "spire" "trustDomain" "" (.Values.global | default dict) }}
{{- default .Values.trustDomain $global }}
{{- end }}

{{- define "svid-bridge.spiffeId" -}}
{{- if .Values.spiffeId }}
{{- .Values.spiffeId }}
{{- else }}
{{- printf "spiffe://%s/ns/%s/sa/%s" (include "svid-bridge.trustDomain" .) .Release.Namespace (include "svid-bridge.serviceAccountName" .) }}
{{- end }}
{{- end }}

{{- define "svid-bridge.openshift" -}}
{{- if or .Values.openshift.enabled (dig "openshift" false (.Values.global | default dict)) }}true{{ end }}
{{- end }}

{{- define "svid-bridge.sccName" -}}
{{- default (include "svid-bridge.fullname" .) .Values.openshift.scc.name }}
{{- end }}

{{/* registry/repository[:tag][@digest]; the tag defaults to the chart's appVersion. */}}
{{- define "svid-bridge.image" -}}
{{- $ref := .repository }}
{{- if .registry }}{{ $ref = printf "%s/%s" .registry .repository }}{{ end }}
{{- if .digest }}
{{- printf "%s@%s" $ref .digest }}
{{- else }}
{{- printf "%s:%s" $ref (default .appVersion .tag) }}
{{- end }}
{{- end }}

{{/* Paths inside the bridge container. The kubelet directories keep their host paths
(the CSI socket path we register and the target paths the kubelet sends are host paths);
the SPIRE socket directories get fixed paths so the flags below never depend on values. */}}
{{- define "svid-bridge.containerSocketDir" -}}/run/spire/agent-sockets{{- end }}
{{- define "svid-bridge.containerAdminDir" -}}/run/spire/admin-sockets{{- end }}
{{- define "svid-bridge.csiSocketDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletPath) .Values.csiDriver.name }}
{{- end }}
