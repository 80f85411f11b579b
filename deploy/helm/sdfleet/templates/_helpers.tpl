{{- define "sdfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sdfleet.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sdfleet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sdfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* selector labels; call with (dict "root" $ "component" "api" "queue" "") */}}
{{- define "sdfleet.selector" -}}
app.kubernetes.io/name: {{ include "sdfleet.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if .queue }}
sdfleet.io/queue: {{ .queue }}
{{- end }}
{{- end -}}

{{- define "sdfleet.image" -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}

{{- define "sdfleet.saName" -}}
{{- $sa := index .root.Values.serviceAccounts .role -}}
{{- if $sa.name -}}{{ $sa.name }}{{- else -}}{{ printf "%s-%s" (include "sdfleet.fullname" .root) .role }}{{- end -}}
{{- end -}}

{{/* A queue entry merged over workerDefaults, as YAML (use with fromYaml). */}}
{{- define "sdfleet.queue" -}}
{{- $q := mergeOverwrite (deepCopy .root.Values.workerDefaults) (deepCopy .q) -}}
{{- toYaml $q -}}
{{- end -}}

{{- define "sdfleet.workerName" -}}
{{- printf "%s-%s" (include "sdfleet.fullname" .root) .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The agent's drain for queue .q: its own drainSeconds (its task timeout), else agent.drainSeconds. */}}
{{- define "sdfleet.drainSeconds" -}}
{{- if hasKey .q "drainSeconds" -}}{{ .q.drainSeconds }}{{- else -}}{{ .root.Values.agent.drainSeconds }}{{- end -}}
{{- end -}}

{{/* Grace of queue .q's pods: the whole drain (a running task finishes) plus the margin. */}}
{{- define "sdfleet.gracePeriod" -}}
{{- add (include "sdfleet.drainSeconds" . | float64 | ceil | int) (int .root.Values.agent.terminationMarginSeconds) -}}
{{- end -}}

{{- define "sdfleet.redisAuth" -}}
{{- if and (eq .Values.engine "redis") .Values.redis.passwordSecret.name -}}true{{- end -}}
{{- end -}}

{{/* A Redis URL with the password from redis.passwordSecret, as a $(SDFLEET_REDIS_PASSWORD)
     reference Kubernetes expands in the container; other URLs (and URLs that carry their own
     credentials) as they are. Call with (dict "root" $ "url" URL). */}}
{{- define "sdfleet.authUrl" -}}
{{- if and (include "sdfleet.redisAuth" .root) (regexMatch "^rediss?://[^@/?#]*([/?#].*)?$" .url) -}}
{{- regexReplaceAll "^(rediss?://)" .url "${1}:$$(SDFLEET_REDIS_PASSWORD)@" -}}
{{- else -}}
{{- .url -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by the API and the agents. */}}
{{- define "sdfleet.env" -}}
- name: SDFLEET_CONFIG_FILE
  value: /etc/sdfleet/sdfleet.yaml
- name: SDFLEET_ENSURE_TOPOLOGY
  value: {{ .Values.ensureTopology | quote }}
- name: SDFLEET_LOG_JSON
  value: "true"
{{- if include "sdfleet.redisAuth" . }}
{{- /* First: Kubernetes expands $(VAR) only from entries above the one that uses it. */}}
- name: SDFLEET_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.passwordSecret.name }}
      key: {{ .Values.redis.passwordSecret.key }}
{{- end }}
{{- with .Values.urls.bus }}
- name: SDFLEET_BUS_URL
  value: {{ include "sdfleet.authUrl" (dict "root" $ "url" .) | quote }}
{{- end }}
{{- with .Values.urls.store }}
- name: SDFLEET_STORE_URL
  value: {{ include "sdfleet.authUrl" (dict "root" $ "url" .) | quote }}
{{- end }}
{{- with .Values.urls.storage }}
- name: SDFLEET_STORAGE_URL
  value: {{ . | quote }}
{{- end }}
{{- if eq .Values.engine "aws" }}
- name: AWS_REGION
  value: {{ .Values.aws.region | quote }}
{{- end }}
{{- if and .Values.adot.enabled (not (hasKey .Values.env "SDFLEET_OTLP_ENDPOINT")) }}
- name: SDFLEET_OTLP_ENDPOINT
  value: {{ printf "http://%s-adot:4318/v1/traces" (include "sdfleet.fullname" .) | quote }}
{{- end }}
{{- range $k, $v := .Values.env }}
- name: {{ $k }}
  value: {{ $v | quote }}
{{- end }}
{{- end -}}

{{- define "sdfleet.envFrom" -}}
{{- if .Values.secrets.existingSecret -}}
envFrom:
  - secretRef:
      name: {{ .Values.secrets.existingSecret }}
{{- end }}
{{- end -}}

{{- define "sdfleet.containerSecurity" -}}
allowPrivilegeEscalation: false
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Fail on a queue that the fleet file does not have, or whose runtime differs. */}}
{{- define "sdfleet.checkQueue" -}}
{{- $fleetQueues := default (list) .root.Values.fleet.queues -}}
{{- if $fleetQueues -}}
{{- $found := false -}}
{{- range $fleetQueues -}}
{{- if eq .name $.q.name -}}
{{- $found = true -}}
{{- $fr := default "diffusers" .runtime -}}
{{- if ne $fr $.q.runtime -}}
{{- fail (printf "queue %s: runtime %s here, %s in fleet" $.q.name $.q.runtime $fr) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not $found -}}
{{- fail (printf "queue %s is not in fleet.queues" .q.name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
