{{/* Names ------------------------------------------------------------------ */}}

{{- define "vigil.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's base name; objects add a suffix (-control, -proxy, ...). */}}
{{- define "vigil.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "vigil.control.fullname" -}}{{ include "vigil.fullname" . }}-control{{- end }}
{{- define "vigil.proxy.fullname" -}}{{ include "vigil.fullname" . }}-proxy{{- end }}
{{- define "vigil.migrate.fullname" -}}{{ include "vigil.fullname" . }}-migrate{{- end }}

{{- define "vigil.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vigil.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vigil.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ----------------------------------------------------------------- */}}

{{- define "vigil.labels" -}}
helm.sh/chart: {{ include "vigil.chart" . }}
app.kubernetes.io/name: {{ include "vigil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vigil
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vigil.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vigil.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Per component: (dict "ctx" $ "component" "control-plane") */}}
{{- define "vigil.componentLabels" -}}
{{ include "vigil.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "vigil.componentSelectorLabels" -}}
{{ include "vigil.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image ------------------------------------------------------------------ */}}

{{- define "vigil.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Secrets ---------------------------------------------------------------- */}}

{{/* The Secret with the control plane's keys: bootstrap-token, secret-key,
signing-key, fleet-join-token. */}}
{{- define "vigil.control.keysSecret" -}}
{{- default (printf "%s-keys" (include "vigil.control.fullname" .)) .Values.control.existingSecret }}
{{- end }}

{{/* The Secret with the proxies' keys: join-token, snapshot-keys, cookie-keys,
assertion-key. */}}
{{- define "vigil.proxy.keysSecret" -}}
{{- default (printf "%s-keys" (include "vigil.proxy.fullname" .)) .Values.proxy.existingSecret }}
{{- end }}

{{/* "true" when the chart generates the key Secrets, else "". */}}
{{- define "vigil.generateKeys" -}}
{{- if and (not .Values.control.existingSecret) (not .Values.proxy.existingSecret) }}true{{ end }}
{{- end }}

{{- define "vigil.database.configured" -}}
{{- if or .Values.database.existingSecret .Values.database.url }}true{{ end }}
{{- end }}

{{- define "vigil.database.secret" -}}
{{- default (printf "%s-database" (include "vigil.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "vigil.database.key" -}}
{{- if .Values.database.existingSecret }}{{ .Values.database.existingSecretKey }}{{ else }}url{{ end }}
{{- end }}

{{/* The gRPC TLS Secret of the control plane (tls.crt, tls.key; ca.crt when generated). */}}
{{- define "vigil.grpcTls.secret" -}}
{{- if eq .Values.control.grpcTls.mode "generate" }}
{{- printf "%s-grpc-tls" (include "vigil.control.fullname" .) }}
{{- else if eq .Values.control.grpcTls.mode "secret" }}
{{- .Values.control.grpcTls.secretName }}
{{- end }}
{{- end }}

{{/* The Secret and key of the CA proxies trust for the control plane, "" for none. */}}
{{- define "vigil.proxy.caSecret" -}}
{{- if .Values.proxy.controlPlane.caSecret.name }}
{{- .Values.proxy.controlPlane.caSecret.name }}
{{- else if and .Values.control.enabled (eq .Values.control.grpcTls.mode "generate") }}
{{- include "vigil.grpcTls.secret" . }}
{{- end }}
{{- end }}

{{/* DNS names of the control plane's Service, for the generated certificate. */}}
{{- define "vigil.control.dnsNames" -}}
{{- $svc := include "vigil.control.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) }}
{{- concat $names .Values.control.grpcTls.extraDnsNames | uniq | toJson }}
{{- end }}

{{- define "vigil.proxy.controlPlaneUrl" -}}
{{- if .Values.proxy.controlPlane.url }}
{{- .Values.proxy.controlPlane.url }}
{{- else }}
{{- $scheme := ternary "http" "https" (eq .Values.control.grpcTls.mode "none") }}
{{- printf "%s://%s.%s.svc:%v" $scheme (include "vigil.control.fullname" .) .Release.Namespace .Values.control.service.grpcPort }}
{{- end }}
{{- end }}

{{- define "vigil.proxy.tlsEnabled" -}}
{{- if .Values.proxy.tls.secrets }}true{{ end }}
{{- end }}

{{- define "vigil.proxy.redirectEnabled" -}}
{{- if and .Values.proxy.tls.secrets .Values.proxy.redirect.enabled }}true{{ end }}
{{- end }}

{{/* The port the proxy serves on inside the pod. */}}
{{- define "vigil.proxy.listenPort" -}}
{{- if .Values.proxy.tls.secrets }}{{ .Values.proxy.containerPorts.https }}{{ else }}{{ .Values.proxy.containerPorts.http }}{{ end }}
{{- end }}

{{/* The proxy's pod security context: the chart's, plus the sysctl that lets the
non-root user bind ports below 1024 when a listener needs one. */}}
{{- define "vigil.proxy.podSecurityContext" -}}
{{- $ctx := deepCopy .Values.podSecurityContext }}
{{- $low := int (include "vigil.proxy.listenPort" .) }}
{{- if and (include "vigil.proxy.redirectEnabled" .) (lt (int .Values.proxy.containerPorts.redirect) $low) }}
{{- $low = int .Values.proxy.containerPorts.redirect }}
{{- end }}
{{- if lt $low 1024 }}
{{- $sysctls := concat (get $ctx "sysctls" | default list) (list (dict "name" "net.ipv4.ip_unprivileged_port_start" "value" (toString $low))) }}
{{- $_ := set $ctx "sysctls" $sysctls }}
{{- end }}
{{- toYaml $ctx }}
{{- end }}

{{- define "vigil.proxy.servicePort" -}}
{{- if not (kindIs "invalid" .Values.proxy.service.port) }}
{{- .Values.proxy.service.port }}
{{- else if .Values.proxy.tls.secrets }}443{{ else }}80{{ end }}
{{- end }}

{{/* Pods ------------------------------------------------------------------- */}}

{{- define "vigil.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "vigil.securityContext" -}}
{{- toYaml .Values.securityContext }}
{{- end }}

{{/* A soft spread over nodes: (dict "ctx" $ "component" "proxy" "values" .Values.proxy) */}}
{{- define "vigil.topologySpread" -}}
{{- $constraints := .values.topologySpreadConstraints }}
{{- if .values.spreadAcrossNodes }}
{{- $spread := dict "maxSkew" 1 "topologyKey" "kubernetes.io/hostname" "whenUnsatisfiable" "ScheduleAnyway" "labelSelector" (dict "matchLabels" (include "vigil.componentSelectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml)) }}
{{- $constraints = prepend $constraints $spread }}
{{- end }}
{{- with $constraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The environment for the database URL, as a file. */}}
{{- define "vigil.database.env" -}}
{{- if include "vigil.database.configured" . }}
- name: VIGIL_DATABASE_URL_FILE
  value: /etc/vigil/database/url
{{- end }}
{{- end }}

{{- define "vigil.database.volumeMount" -}}
{{- if include "vigil.database.configured" . }}
- name: database
  mountPath: /etc/vigil/database
  readOnly: true
{{- end }}
{{- end }}

{{/* (dict "ctx" $ "secret" name) */}}
{{- define "vigil.database.volume" -}}
{{- if include "vigil.database.configured" .ctx }}
- name: database
  secret:
    secretName: {{ .secret }}
    defaultMode: 0440
    items:
      - key: {{ include "vigil.database.key" .ctx }}
        path: url
{{- end }}
{{- end }}

{{/* Checks that values agree with each other (the schema checks each alone). */}}
{{- define "vigil.validate" -}}
{{- if not (or .Values.control.enabled .Values.proxy.enabled) }}
{{- fail "nothing to deploy: control.enabled and proxy.enabled are both false" }}
{{- end }}
{{- if and .Values.control.enabled .Values.proxy.enabled (ne (not .Values.control.existingSecret) (not .Values.proxy.existingSecret)) }}
{{- fail "set both control.existingSecret and proxy.existingSecret, or neither: the proxies' join token and trusted snapshot key must match the control plane's, which the chart can only ensure when it generates both" }}
{{- end }}
{{- if and .Values.proxy.enabled (not .Values.control.enabled) }}
{{- if not .Values.proxy.existingSecret }}
{{- fail "proxy.existingSecret is required when control.enabled is false (the chart cannot know the control plane's keys)" }}
{{- end }}
{{- if not .Values.proxy.controlPlane.url }}
{{- fail "proxy.controlPlane.url is required when control.enabled is false" }}
{{- end }}
{{- end }}
{{- if and .Values.control.enabled (eq .Values.control.grpcTls.mode "secret") (not .Values.control.grpcTls.secretName) }}
{{- fail "control.grpcTls.secretName is required with control.grpcTls.mode: secret" }}
{{- end }}
{{- $listen := int (include "vigil.proxy.listenPort" .) }}
{{- if or (eq $listen 9091) (and (include "vigil.proxy.redirectEnabled" .) (has (int .Values.proxy.containerPorts.redirect) (list 9091 $listen))) }}
{{- fail "proxy.containerPorts: the proxy's listeners need distinct ports, and 9091 is its health port" }}
{{- end }}
{{- if and .Values.proxy.enabled .Values.proxy.clientCa.secretName (not (include "vigil.proxy.tlsEnabled" .)) }}
{{- fail "proxy.clientCa needs proxy.tls.secrets: client certificates are asked for in the TLS handshake" }}
{{- end }}
{{- if and .Values.proxy.enabled .Values.proxy.autoscaling.enabled (lt (int .Values.proxy.autoscaling.maxReplicas) (int .Values.proxy.autoscaling.minReplicas)) }}
{{- fail "proxy.autoscaling.maxReplicas is below proxy.autoscaling.minReplicas" }}
{{- end }}
{{- end }}
