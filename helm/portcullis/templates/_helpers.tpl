{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "portcullis.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name. */}}
{{- define "portcullis.fullname" -}}
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

{{- define "portcullis.webhookName" -}}
{{- printf "%s-injector" (include "portcullis.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "portcullis.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "portcullis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: portcullis
{{- end }}

{{- define "portcullis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portcullis.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end }}

{{/* repository:tag or repository@digest for the webhook. */}}
{{- define "portcullis.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The image the webhook injects: injection.image fields, falling back to image. */}}
{{- define "portcullis.sidecarImage" -}}
{{- $repo := default .Values.image.repository .Values.injection.image.repository }}
{{- if and .Values.image.digest (not .Values.injection.image.repository) (not .Values.injection.image.tag) }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (default (default .Chart.AppVersion .Values.image.tag) .Values.injection.image.tag) }}
{{- end }}
{{- end }}

{{/* cert-manager or chart, with auto resolved against the cluster's served APIs. */}}
{{- define "portcullis.certSource" -}}
{{- if eq .Values.certificates.source "auto" }}
{{- if .Capabilities.APIVersions.Has "cert-manager.io/v1" }}cert-manager{{ else }}chart{{ end }}
{{- else }}
{{- .Values.certificates.source }}
{{- end }}
{{- end }}

{{- define "portcullis.tlsSecret" -}}
{{- printf "%s-tls" (include "portcullis.webhookName" .) }}
{{- end }}

{{/* Namespaces whose pods never reach the webhook. */}}
{{- define "portcullis.excludedNamespaces" -}}
{{- $ns := list .Release.Namespace }}
{{- range .Values.webhook.excludedNamespaces }}{{ if ne . $.Release.Namespace }}{{ $ns = append $ns . }}{{ end }}{{ end }}
{{- toJson $ns }}
{{- end }}
