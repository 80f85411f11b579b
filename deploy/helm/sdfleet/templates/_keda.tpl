{{- define "sdfleet.trigger" -}}
{{- $root := .root -}}
{{- $s := .q.scaling -}}
{{- $t := default (dict) .q.trigger -}}
{{- if eq $root.Values.engine "aws" }}
- type: aws-sqs-queue
  authenticationRef:
    name: {{ include "sdfleet.fullname" $root }}-aws
  metadata:
    queueURL: {{ required (printf "queues[%s].trigger.queueURL is required (sdfleet deploy values)" .q.name) $t.queueURL | quote }}
    queueLength: {{ $s.targetBacklog | quote }}
    activationQueueLength: {{ $s.activationBacklog | quote }}
    scaleOnInFlight: {{ $s.scaleOnInFlight | quote }}
    awsRegion: {{ $root.Values.aws.region | quote }}
{{- else }}
- type: redis-streams
  {{- if $root.Values.redis.passwordSecret.name }}
  authenticationRef:
    name: {{ include "sdfleet.fullname" $root }}-redis
  {{- end }}
  metadata:
    address: {{ required "redis.address is required with engine redis" $root.Values.redis.address | quote }}
    stream: {{ required (printf "queues[%s].trigger.stream is required (sdfleet deploy values)" .q.name) $t.stream | quote }}
    consumerGroup: {{ required (printf "queues[%s].trigger.consumerGroup is required" .q.name) $t.consumerGroup | quote }}
    {{- if eq $root.Values.keda.redis.metric "lag" }}
    lagCount: {{ $s.targetBacklog | quote }}
    activationLagCount: {{ $s.activationBacklog | quote }}
    {{- else }}
    pendingEntriesCount: {{ $s.targetBacklog | quote }}
    {{- end }}
    databaseIndex: {{ $root.Values.redis.databaseIndex | quote }}
    enableTLS: {{ $root.Values.redis.enableTLS | quote }}
{{- end }}
{{- end -}}
