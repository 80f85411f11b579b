{{/* The agent's command line for queue .q. */}}
{{- define "sdfleet.agentArgs" -}}
- agent
- --queue
- {{ .q.name }}
- --config
- /etc/sdfleet/sdfleet.yaml
- --ready-dir
- {{ .root.Values.agent.readyDir }}
{{- with index .root.Values.runtimes .q.runtime }}
- --runtime-url
- http://127.0.0.1:{{ .port }}
{{- end }}
{{- if .burst }}
- --burst
{{- end }}
{{- end -}}

{{/* Startup and readiness read the ready file: it appears once the runtime has started and the
     model is loaded, and goes when the agent stops serving. Liveness is the heartbeat's age: the
     agent's receive loop touches <queue>.alive about once a second while its event loop is healthy. */}}
{{- define "sdfleet.agentProbes" -}}
{{- $a := .root.Values.agent -}}
{{- $cmd := printf "[\"test\", \"-f\", \"%s/%s.ready\"]" $a.readyDir .q.name -}}
startupProbe:
  exec: {command: {{ $cmd }}}
  periodSeconds: {{ $a.startupProbe.periodSeconds }}
  failureThreshold: {{ $a.startupProbe.failureThreshold }}
readinessProbe:
  exec: {command: {{ $cmd }}}
  periodSeconds: {{ $a.readinessProbe.periodSeconds }}
  failureThreshold: {{ $a.readinessProbe.failureThreshold }}
{{- $alive := printf "%s/%s.alive" $a.readyDir .q.name }}
livenessProbe:
  exec:
    command: ["python", "-c", "import os, sys, time; sys.exit(time.time() - os.path.getmtime('{{ $alive }}') > {{ $a.livenessProbe.maxAgeSeconds }})"]
  periodSeconds: {{ $a.livenessProbe.periodSeconds }}
  failureThreshold: {{ $a.livenessProbe.failureThreshold }}
{{- end -}}

{{- define "sdfleet.gpuResources" -}}
{{- $res := deepCopy .q.resources -}}
{{- if and .q.gpuClass (gt (int .q.gpus) 0) -}}
{{- $limits := default (dict) $res.limits -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .q.gpus) -}}
{{- $_ := set $res "limits" $limits -}}
{{- $requests := default (dict) $res.requests -}}
{{- $_ := set $requests "nvidia.com/gpu" (int .q.gpus) -}}
{{- $_ := set $res "requests" $requests -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{- define "sdfleet.agentContainer" -}}
{{- $root := .root -}}
{{- /* A runtime of `runtimes` (SD WebUI, ComfyUI) runs beside the agent; others (diffusers,
     synthetic) in the agent's own process, from the worker image. */}}
{{- $sidecar := hasKey $root.Values.runtimes .q.runtime -}}
{{- $img := ternary $root.Values.images.agent $root.Values.images.worker $sidecar -}}
- name: agent
  image: {{ include "sdfleet.image" $img }}
  imagePullPolicy: {{ $img.pullPolicy }}
  args:
    {{- include "sdfleet.agentArgs" . | nindent 4 }}
  env:
    {{- include "sdfleet.env" $root | nindent 4 }}
    - name: SDFLEET_AGENT__DRAIN_S
      value: {{ include "sdfleet.drainSeconds" . | quote }}
    {{- if $root.Values.agent.podDeletionCost }}
    - name: SDFLEET_AGENT__POD_DELETION_COST
      value: "true"
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_NAMESPACE
      valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
    {{- end }}
    {{- if gt (int $root.Values.agent.metricsPort) 0 }}
    - name: SDFLEET_AGENT__METRICS_PORT
      value: {{ $root.Values.agent.metricsPort | quote }}
    - name: SDFLEET_AGENT__METRICS_HOST
      value: "0.0.0.0"
  ports:
    - {name: metrics, containerPort: {{ $root.Values.agent.metricsPort }}, protocol: TCP}
    {{- end }}
  {{- include "sdfleet.envFrom" $root | nindent 2 }}
  {{- include "sdfleet.agentProbes" . | nindent 2 }}
  resources:
    {{- if $sidecar }}
    {{- toYaml $root.Values.agent.resources | nindent 4 }}
    {{- else }}
    {{- include "sdfleet.gpuResources" . | nindent 4 }}
    {{- end }}
  securityContext:
    {{- include "sdfleet.containerSecurity" . | nindent 4 }}
  volumeMounts:
    - {name: fleet, mountPath: /etc/sdfleet, readOnly: true}
    - {name: ready, mountPath: {{ $root.Values.agent.readyDir }}}
    - {name: tmp, mountPath: /tmp}
    {{- if ne $root.Values.models.volume.type "none" }}
    - {name: models, mountPath: {{ $root.Values.models.mountPath }}, readOnly: {{ $root.Values.models.readOnly }}}
    {{- end }}
{{- end -}}

{{/* The runtime (SD WebUI / ComfyUI) as a native side-car: an init container that keeps running.
     Kubernetes starts it (and waits for its startup probe) before the agent, and stops it only
     after the agent has drained and exited. */}}
{{- define "sdfleet.runtimeContainer" -}}
{{- $root := .root -}}
{{- $rt := required (printf "runtimes.%s is not defined" .q.runtime) (index $root.Values.runtimes .q.runtime) -}}
- name: runtime
  image: {{ include "sdfleet.image" $rt.image }}
  imagePullPolicy: {{ $rt.image.pullPolicy }}
  restartPolicy: Always
  args:
    {{- toYaml (concat (default (list) $rt.args) (list "--port" (toString $rt.port))) | nindent 4 }}
  ports:
    - {name: runtime, containerPort: {{ $rt.port }}, protocol: TCP}
  {{- /* exec, not httpGet: the kubelet would probe the pod's IP, and the server is on 127.0.0.1 */}}
  {{- $probe := concat $rt.probeCommand (list (printf "http://127.0.0.1:%v%s" $rt.port $rt.healthPath)) }}
  startupProbe:
    exec: {command: {{ toJson $probe }}}
    timeoutSeconds: 10
    periodSeconds: {{ $root.Values.agent.startupProbe.periodSeconds }}
    failureThreshold: {{ $root.Values.agent.startupProbe.failureThreshold }}
  livenessProbe:
    exec: {command: {{ toJson $probe }}}
    timeoutSeconds: 10
    periodSeconds: 15
    failureThreshold: 4
  resources:
    {{- include "sdfleet.gpuResources" . | nindent 4 }}
  {{- with $rt.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - {name: dshm, mountPath: /dev/shm}
    {{- if ne $root.Values.models.volume.type "none" }}
    - {name: models, mountPath: {{ $root.Values.models.mountPath }}, readOnly: {{ $root.Values.models.readOnly }}}
    {{- end }}
{{- end -}}

{{/* Pod spec of queue .q's workers; .burst for the ScaledJob. */}}
{{- define "sdfleet.workerPodSpec" -}}
{{- $root := .root -}}
{{- $k := $root.Values.karpenter -}}
serviceAccountName: {{ include "sdfleet.saName" (dict "root" $root "role" "worker") }}
terminationGracePeriodSeconds: {{ include "sdfleet.gracePeriod" . }}
{{- if .burst }}
restartPolicy: Never
{{- end }}
securityContext:
  fsGroup: 10001
  seccompProfile: {type: RuntimeDefault}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if or .q.gpuClass .q.nodeSelector }}
nodeSelector:
  {{- with .q.gpuClass }}
  sdfleet.io/gpu-class: {{ . }}
  {{- end }}
  {{- with .q.nodeSelector }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- if or .q.gpuClass .q.extraTolerations }}
tolerations:
  {{- if .q.gpuClass }}
  - key: {{ $k.gpuTaint.key }}
    operator: Equal
    value: {{ $k.gpuTaint.value | quote }}
    effect: {{ $k.gpuTaint.effect }}
  {{- end }}
  {{- with .q.extraTolerations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- if hasKey $root.Values.runtimes .q.runtime }}
initContainers:
  {{- include "sdfleet.runtimeContainer" . | nindent 2 }}
{{- end }}
containers:
  {{- include "sdfleet.agentContainer" . | nindent 2 }}
volumes:
  - name: fleet
    configMap:
      name: {{ include "sdfleet.fullname" $root }}-fleet
  - name: ready
    emptyDir: {}
  - name: tmp
    emptyDir: {}
  {{- if hasKey $root.Values.runtimes .q.runtime }}
  - name: dshm
    emptyDir: {medium: Memory, sizeLimit: 2Gi}
  {{- end }}
  {{- if ne $root.Values.models.volume.type "none" }}
  - name: models
    persistentVolumeClaim:
      claimName: {{ include "sdfleet.modelsClaim" $root }}
      readOnly: {{ $root.Values.models.readOnly }}
  {{- end }}
{{- end -}}

{{- define "sdfleet.modelsClaim" -}}
{{- default (printf "%s-models" (include "sdfleet.fullname" .)) .Values.models.volume.existingClaim -}}
{{- end -}}
