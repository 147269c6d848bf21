{{/* The chart name, or nameOverride; Kubernetes names stop at 63 characters. */}}
{{- define "spegel-tx.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: fullnameOverride, else the release name, with the
chart name added unless the release name already holds it. */}}
{{- define "spegel-tx.fullname" -}}
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

{{- define "spegel-tx.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride }}
{{- end }}

{{- define "spegel-tx.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spegel-tx.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "spegel-tx.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "spegel-tx.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "spegel-tx.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The headless Service's name, which spegel-tx resolves to find its peers. The
twisted resolver does not walk resolv.conf's search list, so the name is complete. */}}
{{- define "spegel-tx.bootstrapDomain" -}}
{{- printf "%s-bootstrap.%s.svc.%s" (include "spegel-tx.fullname" .) (include "spegel-tx.namespace" .) (.Values.clusterDomain | trimSuffix ".") }}
{{- end }}

{{/* What containerd is given, in the order it tries them: this node's spegel-tx,
then any node's through the NodePort, then the additional targets. $(NODE_IP) is
expanded by the kubelet from the container's environment. */}}
{{- define "spegel-tx.mirrorTargets" -}}
{{- $registry := .Values.service.registry }}
{{- if eq $registry.mode "hostPort" }}
- http://$(NODE_IP):{{ $registry.hostPort }}
{{- else if eq $registry.mode "nodeLocalService" }}
- http://{{ required "service.registry.clusterIP is required in nodeLocalService mode" $registry.clusterIP }}:{{ $registry.port }}
{{- else }}
{{- fail (printf "service.registry.mode must be hostPort or nodeLocalService, not %q" $registry.mode) }}
{{- end }}
{{- with $registry.nodePort }}
- http://$(NODE_IP):{{ . }}
{{- end }}
{{- range .Values.spegel.additionalMirrorTargets }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{- define "spegel-tx.nodeIpEnv" -}}
- name: NODE_IP
{{- if .Values.service.registry.nodeIp }}
  value: {{ .Values.service.registry.nodeIp | quote }}
{{- else }}
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
{{- end }}
{{- end }}

{{/* The Secret whose key signs every DHT datagram: spegel.routerSecretName, else the
one this chart makes. */}}
{{- define "spegel-tx.routerSecretName" -}}
{{- .Values.spegel.routerSecretName | default (printf "%s-router" (include "spegel-tx.fullname" .)) }}
{{- end }}

{{/* The chart's router Secret as the cluster holds it now, as JSON: "{}" when installing,
or when rendering without a cluster (helm template), where lookup sees nothing. */}}
{{- define "spegel-tx.existingRouterSecret" -}}
{{- lookup "v1" "Secret" (include "spegel-tx.namespace" .) (include "spegel-tx.routerSecretName" .) | toJson }}
{{- end }}

{{/* Where a container reads one of basicAuthSecretName's keys ("username", "password"):
Spegel's mount path, or nothing (no authentication) without a Secret. */}}
{{- define "spegel-tx.basicAuthFile" -}}
{{- $root := index . 0 -}}
{{- if $root.Values.basicAuthSecretName -}}
/etc/secrets/basic-auth/{{ index . 1 }}
{{- end -}}
{{- end }}

{{/* Spegel's values that mean nothing to spegel-tx, at Spegel's defaults. A Spegel values
file carries over as it is, but a value set away from its default would be dropped
without a word: the render fails instead, naming each one. (Keys neither chart knows
are refused by values.schema.json.) */}}
{{- define "spegel-tx.spegelOnlyDefaults" -}}
serviceAccount.annotations: {}
serviceAccount.name: ""
service.registry.internalTrafficLocal: false
service.cleanup.port: 8080
service.cleanup.annotations: {}
grafanaDashboard.mode: Sidecar
grafanaDashboard.grafanaOperator.allowCrossNamespaceImport: true
grafanaDashboard.grafanaOperator.folder: ""
grafanaDashboard.grafanaOperator.resyncPeriod: 10m
grafanaDashboard.grafanaOperator.matchLabels: {}
verticalPodAutoscaler.enabled: false
verticalPodAutoscaler.recommenders: []
verticalPodAutoscaler.controlledResources: []
verticalPodAutoscaler.controlledValues: RequestsAndLimits
verticalPodAutoscaler.maxAllowed: {}
verticalPodAutoscaler.minAllowed: {}
verticalPodAutoscaler.updatePolicy.minReplicas: 2
verticalPodAutoscaler.updatePolicy.updateMode: Auto
{{- end }}

{{- define "spegel-tx.unsupported" -}}
{{- $values := .Values | toJson | fromJson }}
{{- $unsupported := list }}
{{- range $path, $default := include "spegel-tx.spegelOnlyDefaults" . | fromYaml }}
{{- $value := $values }}
{{- $given := true }}
{{- range splitList "." $path }}
{{- if and $given (kindIs "map" $value) (hasKey $value .) }}
{{- $value = index $value . }}
{{- else }}
{{- $given = false }}
{{- end }}
{{- end }}
{{- if and $given (ne (toJson $value) (toJson $default)) }}
{{- $unsupported = append $unsupported (printf "%s: %s (Spegel's default: %s)" $path (toJson $value) (toJson $default)) }}
{{- end }}
{{- end }}
{{- with $unsupported }}
{{- fail (printf "spegel-tx does not support these Spegel values (see deploy/helm/spegel-tx/README.md):\n- %s" (join "\n- " .)) }}
{{- end }}
{{- end }}
