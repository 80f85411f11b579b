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
    scaleOnDelayed: "true"
    awsRegion: {{ $root.Values.aws.region | quote }}
{{- else }}
{{- /* The queue's whole debt, visible + in flight + delayed, from the API's ops listener (the bus's
       own stats). lagCount misses running tasks (busy workers scaled in), pendingEntriesCount
       misses undelivered ones (no wake from zero), and both miss delayed retries. */}}
{{- $ops := printf "http://%s-api-ops.%s.svc.cluster.local:%d" (include "sdfleet.fullname" $root) $root.Release.Namespace (int $root.Values.api.opsPort) }}
- type: metrics-api
  metadata:
    url: {{ printf "%s/queues/%s/depth" (default $ops $root.Values.keda.redis.depthUrl) .q.name | quote }}
    format: json
    valueLocation: depth
    targetValue: {{ $s.targetBacklog | quote }}
    activationTargetValue: {{ $s.activationBacklog | quote }}
{{- /* XLEN: visible + in flight (acks delete entries), read straight from Redis while the API is away.
       KEDA applies activationLagCount to every redis-streams mode. */}}
- type: redis-streams
  {{- if or $root.Values.redis.passwordSecret.name $root.Values.redis.awsSecret.arn }}
  authenticationRef:
    name: {{ include "sdfleet.fullname" $root }}-redis
  {{- end }}
  metadata:
    address: {{ required "redis.address is required with engine redis" $root.Values.redis.address | quote }}
    stream: {{ required (printf "queues[%s].trigger.stream is required (sdfleet deploy values)" .q.name) $t.stream | quote }}
    {{- /* No consumerGroup: with one, KEDA ignores streamLength and counts XPENDING instead. */}}
    streamLength: {{ $s.targetBacklog | quote }}
    activationLagCount: {{ $s.activationBacklog | quote }}
    databaseIndex: {{ $root.Values.redis.databaseIndex | quote }}
    enableTLS: {{ $root.Values.redis.enableTLS | quote }}
{{- end }}
{{- end -}}

{{- /* KEDA's AWS identity: the role keda.aws.roleArn (assumed by the operator's identity), else the
       identity of "owner" (keda: the operator's own; workload: the scaled worker's). */}}
{{- define "sdfleet.kedaAwsIdentity" -}}
provider: aws
{{- if .root.Values.keda.aws.roleArn }}
roleArn: {{ .root.Values.keda.aws.roleArn | quote }}
{{- else }}
identityOwner: {{ .owner }}
{{- end }}
{{- end }}
