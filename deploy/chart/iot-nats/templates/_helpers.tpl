{{/* The release's name for its objects, within the 63 characters labels allow. */}}
{{- define "iot-nats.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "iot-nats.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object: the well-known set plus .Values.extraLabels. */}}
{{- define "iot-nats.labels" -}}
{{ include "iot-nats.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: nats
app.kubernetes.io/part-of: harmony-iot
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.extraLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "iot-nats.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "iot-nats.calloutImage" -}}
{{- printf "%s:%s" .Values.callout.image.repository (default .Chart.AppVersion .Values.callout.image.tag) -}}
{{- end -}}

{{- define "iot-nats.registryTokenImage" -}}
{{- printf "%s:%s" .Values.registryToken.image.repository (default .Chart.AppVersion .Values.registryToken.image.tag) -}}
{{- end -}}

{{/* The store volume's source: exactly one of jetstream.hostPath and
     jetstream.existingClaim. */}}
{{- define "iot-nats.storeVolume" -}}
{{- $js := .Values.jetstream -}}
{{- if and $js.hostPath $js.existingClaim -}}
{{- fail "set one of jetstream.hostPath and jetstream.existingClaim, not both: a server has one store" -}}
{{- else if $js.hostPath -}}
hostPath:
  path: {{ $js.hostPath }}
  type: DirectoryOrCreate
{{- else if $js.existingClaim -}}
persistentVolumeClaim:
  claimName: {{ $js.existingClaim }}
{{- else -}}
{{- fail "jetstream.hostPath or jetstream.existingClaim is required: where the JetStream store lives (a directory on the node, or a PersistentVolumeClaim)" -}}
{{- end -}}
{{- end -}}

{{/* nats.conf. Paths are the pod's: this file, auth/auth.conf and tls/ are one
     projected volume at /etc/nats; `include` is relative to this file, the
     certificate paths are not (nats-server takes those from its working
     directory), hence absolute. */}}
{{- define "iot-nats.config" -}}
# nats-server configuration, rendered by the {{ .Chart.Name }} chart {{ .Chart.Version }}.
server_name: {{ .Values.server.name | quote }}
listen: "0.0.0.0:{{ .Values.server.port }}"
# Monitoring: the probes' /healthz. It needs no credentials and /connz names every
# connection: no hostPort, reachable inside the cluster only.
http: "0.0.0.0:{{ .Values.server.monitorPort }}"
jetstream {
  store_dir: "/data"
  {{- with .Values.jetstream.maxMemoryStore }}
  max_memory_store: {{ . }}
  {{- end }}
  {{- with .Values.jetstream.maxFileStore }}
  max_file_store: {{ . }}
  {{- end }}
}
tls {
  cert_file: "/etc/nats/tls/tls.crt"
  key_file: "/etc/nats/tls/tls.key"
  timeout: 5
}
# Accounts, system_account and authorization { auth_callout }: from Secret
# {{ .Values.server.auth.secretName }} (they hold passwords).
include "auth/auth.conf"
{{- end -}}
