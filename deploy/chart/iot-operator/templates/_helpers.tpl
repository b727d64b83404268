{{/* The release's name for its objects, within the 63 characters labels allow. */}}
{{- define "iot-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "iot-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object: the well-known set plus .Values.extraLabels. */}}
{{- define "iot-operator.labels" -}}
{{ include "iot-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: harmony-iot
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.extraLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Cluster-scoped objects carry the namespace too: the same release name may be
     used in two namespaces. */}}
{{- define "iot-operator.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "iot-operator.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "iot-operator.serviceAccountName" -}}
{{- default (include "iot-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "iot-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
