{{/* The ADOT collector's configuration (adot-collector.yaml), from .Values.adot:
     traces: otlp receiver → memory_limiter, batch → awsxray exporter (adot.traces.xray);
     metrics: prometheus receiver (this release's API and agent pods) → awsemf (adot.metrics.cloudwatch). */}}
{{- define "sdfleet.adotConfig" -}}
{{- $a := .Values.adot -}}
{{- $region := default .Values.aws.region $a.region -}}
{{- $logGroup := default (printf "/aws/sdfleet/%s/metrics" (include "sdfleet.fullname" .)) $a.metrics.logGroup -}}
extensions:
  health_check:
    endpoint: 0.0.0.0:13133
receivers:
  otlp:
    protocols:
      http:
        endpoint: 0.0.0.0:4318
      grpc:
        endpoint: 0.0.0.0:4317
{{- if $a.metrics.cloudwatch }}
  prometheus:
    config:
      scrape_configs:
        - job_name: sdfleet
          scrape_interval: {{ $a.metrics.scrapeInterval }}
          metrics_path: /metrics
          kubernetes_sd_configs:
            - role: pod
              namespaces:
                names: [{{ .Release.Namespace | quote }}]
          relabel_configs:
            - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_instance]
              regex: {{ .Release.Name | quote }}
              action: keep
            # the API's port "ops" (api.opsPort: the public port answers /metrics with 404 once it
            # is set, and the chart always sets it) and the agents' port "metrics" (agent.metricsPort)
            - source_labels: [__meta_kubernetes_pod_label_app_kubernetes_io_component, __meta_kubernetes_pod_container_port_name]
              separator: ";"
              regex: "api;ops|worker;metrics"
              action: keep
            - source_labels: [__meta_kubernetes_namespace]
              target_label: namespace
            - source_labels: [__meta_kubernetes_pod_name]
              target_label: pod
{{- end }}
processors:
  memory_limiter:
    check_interval: 1s
    limit_percentage: 80
    spike_limit_percentage: 25
  batch:
    timeout: 5s
exporters:
{{- if $a.traces.xray }}
  awsxray:
    region: {{ $region | quote }}
    {{- with $a.traces.indexedAttributes }}
    indexed_attributes: {{ toJson . }}
    {{- end }}
{{- end }}
{{- if $a.metrics.cloudwatch }}
  awsemf:
    region: {{ $region | quote }}
    namespace: {{ $a.metrics.namespace | quote }}
    log_group_name: {{ $logGroup | quote }}
    log_stream_name: metrics
    dimension_rollup_option: NoDimensionRollup
    metric_declarations:
      - dimensions: [[queue], [queue, state], [queue, stage], [queue, origin]]
        metric_name_selectors: ["^sdfleet_"]
{{- end }}
{{- if not $a.traces.xray }}
  debug:
    verbosity: basic
{{- end }}
service:
  extensions: [health_check]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [memory_limiter, batch]
      exporters: [{{ if $a.traces.xray }}awsxray{{ else }}debug{{ end }}]
{{- if $a.metrics.cloudwatch }}
    metrics:
      receivers: [prometheus]
      processors: [memory_limiter, batch]
      exporters: [awsemf]
{{- end }}
{{- end -}}
