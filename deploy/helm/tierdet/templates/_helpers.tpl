{{/* Names: <release>-tierdet (or fullnameOverride), then -gateway / -triton / ... */}}
{{- define "tierdet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tierdet.fullname" -}}
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

{{/* A component's name; call with (list $ "gateway"). */}}
{{- define "tierdet.component" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" (include "tierdet.fullname" $root) (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tierdet.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tierdet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component; call with (list $ "gateway"). */}}
{{- define "tierdet.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "tierdet.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* image reference; call with (list $ .Values.images.gateway). */}}
{{- define "tierdet.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{- define "tierdet.modelsClaim" -}}
{{- default (include "tierdet.component" (list . "models")) .Values.persistence.existingClaim -}}
{{- end -}}

{{/* The model volume's mount point, TIERDET_HOME in every container. */}}
{{- define "tierdet.home" -}}/var/lib/tierdet{{- end -}}

{{/* Every model served, zoo and cards, comma-separated. */}}
{{- define "tierdet.servedModels" -}}
{{- $names := list -}}
{{- range .Values.cards.models }}{{ $names = append $names .name }}{{ end -}}
{{- join "," (concat .Values.models $names) -}}
{{- end -}}

{{/* The cards' files (paths inside cards.volume), comma-separated. */}}
{{- define "tierdet.cardFiles" -}}
{{- $files := list -}}
{{- range .Values.cards.models }}{{ $files = append $files .file }}{{ end -}}
{{- join "," $files -}}
{{- end -}}

{{/* The cards volume: read-only at /cards, the working folder of the containers
     that read cards (their relative paths resolve there, as in compose). */}}
{{- define "tierdet.cardsMount" -}}
{{- if or .Values.cards.models .Values.cards.watch }}
- name: cards
  mountPath: /cards
  readOnly: true
{{- end }}
{{- end -}}

{{- define "tierdet.cardsVolume" -}}
{{- if or .Values.cards.models .Values.cards.watch }}
- name: cards
  {{- toYaml .Values.cards.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Checks across values that a JSON schema cannot express; a failed check stops
the install with its message.
*/}}
{{- define "tierdet.validate" -}}
{{- $models := splitList "," (include "tierdet.servedModels" .) -}}
{{- if and .Values.cards.models (empty .Values.cards.volume) -}}
{{- fail "cards.models needs cards.volume: the volume holding the cards and the graphs they name" -}}
{{- end -}}
{{- with .Values.cards.watch -}}
{{- /* The gateway builds the folder's cards (ONNX, not plans) and keeps the only
       view of them: one pod of one worker. */ -}}
{{- if empty $.Values.cards.volume -}}
{{- fail "cards.watch needs cards.volume: the volume holding the folder and the graphs its cards name" -}}
{{- end -}}
{{- if ne $.Values.target "cpu" -}}
{{- fail "cards.watch needs target cpu: the gateway builds ONNX models, not TensorRT plans" -}}
{{- end -}}
{{- if or $.Values.gateway.autoscaling.enabled (ne (int $.Values.gateway.replicas) 1) (ne (int (default 1 $.Values.gateway.settings.workers)) 1) -}}
{{- fail "cards.watch needs one gateway pod of one worker (gateway.replicas 1, gateway.autoscaling.enabled false, gateway.settings.workers 1): each keeps its own view of the models" -}}
{{- end -}}
{{- end -}}
{{- range .Values.cards.models -}}
{{- if has .name $.Values.models -}}
{{- fail (printf "cards.models: %s is a zoo model's name (models)" .name) -}}
{{- end -}}
{{- end -}}
{{- range $tier, $spec := .Values.tiers -}}
{{- range $spec.models -}}
{{- if not (has . $models) -}}
{{- fail (printf "tiers.%s.models: %s is not in models (%s)" $tier . (join ", " $models)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if not (hasKey .Values.tiers .Values.defaultTier) -}}
{{- fail (printf "defaultTier %s is not one of tiers (%s)" .Values.defaultTier (join ", " (keys .Values.tiers | sortAlpha))) -}}
{{- end -}}
{{- /* Without the labels its Prometheus selects by, the operator never scrapes
       the pods: the autoscalers then get no data and Triton stays at one pod. */ -}}
{{- range $name, $object := dict "serviceMonitor" .Values.monitoring.serviceMonitor "prometheusRule" .Values.monitoring.prometheusRule -}}
{{- if and $object.enabled (empty $object.labels) -}}
{{- fail (printf "monitoring.%s.labels is empty: set the labels your Prometheus selects %ss by (kube-prometheus-stack: release: <its release name>), or disable it" $name (title $name)) -}}
{{- end -}}
{{- end -}}
{{- /* CPU Triton sizes ONNX Runtime's thread pool from its CPU request. */ -}}
{{- if and (eq .Values.target "cpu") (not (dig "requests" "cpu" "" .Values.triton.resources)) -}}
{{- fail "triton.resources.requests.cpu is empty: target cpu sizes ONNX Runtime's threads from it (set the CPUs each Triton pod may use)" -}}
{{- end -}}
{{- if and (eq .Values.target "cpu") (not (regexMatch "^([0-9]+(\\.[0-9]+)?|[0-9]+m)$" (toString (dig "requests" "cpu" "" .Values.triton.resources)))) -}}
{{- fail (printf "triton.resources.requests.cpu (%v) must be a CPU count (4, \"1.5\") or millicores (\"2500m\")" .Values.triton.resources.requests.cpu) -}}
{{- end -}}
{{- /* A pod killed before its drain ends drops the requests it still holds. */ -}}
{{- $shutdowns := dict
      "gateway" (list .Values.gateway (int (include "tierdet.gatewayDrainSeconds" .)) "the gateway's drain")
      "triton" (list .Values.triton (int .Values.triton.exitTimeoutSeconds) "triton.exitTimeoutSeconds") -}}
{{- range $component, $s := $shutdowns -}}
{{- $pod := index $s 0 -}}
{{- $needed := add $pod.preStopSleepSeconds (index $s 1) 5 -}}
{{- if lt (int $pod.terminationGracePeriodSeconds) (int $needed) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must be at least %s.preStopSleepSeconds (%v) + %s (%d s) + 5 s = %d s" $component $pod.terminationGracePeriodSeconds $component $pod.preStopSleepSeconds (index $s 2) (index $s 1) $needed) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Seconds the gateway takes to stop after SIGTERM at most: in-flight requests get
grace_s (10, tierdet.frontends.server.run_gateway), then the supervisor kills
workers still running 5 s later (frontends/workers.py, Supervisor.stop).
*/}}
{{- define "tierdet.gatewayDrainSeconds" -}}15{{- end -}}

{{/*
How long one new Triton pod may take to become ready, the Deployment's
progressDeadlineSeconds: its init container waits up to
triton.engines.waitForModelsSeconds for the model-builder's export, then (GPU)
builds each model's engine in turn, each within timeoutSecondsPerModel; then
the startup probe allows periodSeconds x failureThreshold for loading; plus
600 s (Kubernetes' default deadline) for scheduling and image pulls.
*/}}
{{- define "tierdet.tritonProgressDeadlineSeconds" -}}
{{- $t := .Values.triton -}}
{{- $builds := 0 -}}
{{- if eq .Values.target "gpu" -}}
{{- $builds = mul (add (len .Values.models) (len .Values.cards.models)) $t.engines.timeoutSecondsPerModel -}}
{{- end -}}
{{- add $t.engines.waitForModelsSeconds $builds (mul $t.probes.startup.periodSeconds $t.probes.startup.failureThreshold) 600 -}}
{{- end -}}

{{/*
Whole CPUs in a CPU quantity ("8", 4, "1.5", "2500m"), at least 1: the ONNX
Runtime threads of a CPU Triton pod (rounded down: more threads than the pod's
share of the node's CPUs would contend for them).
*/}}
{{- define "tierdet.cpuThreads" -}}
{{- $q := toString . -}}
{{- $cpus := 0.0 -}}
{{- if hasSuffix "m" $q -}}
{{- $cpus = divf (float64 (trimSuffix "m" $q)) 1000 -}}
{{- else -}}
{{- $cpus = float64 $q -}}
{{- end -}}
{{- max 1 (int (floor $cpus)) -}}
{{- end -}}

{{/* Whether the gateway serves TLS (then its probes and scrapes use HTTPS). */}}
{{- define "tierdet.gatewayScheme" -}}
{{- if .Values.tls.existingSecret -}}HTTPS{{- else -}}HTTP{{- end -}}
{{- end -}}

{{/* The Secret holding the value of Triton's restricted-API header. */}}
{{- define "tierdet.tritonAdminSecret" -}}
{{- default (include "tierdet.component" (list . "triton-admin")) .Values.triton.restrictedApis.existingSecret -}}
{{- end -}}

{{/*
A value as an environment string. YAML numbers may arrive as float64, which
would print 20971520 as 2.097152e+07: whole numbers are printed as integers.
*/}}
{{- define "tierdet.envValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- int64 . -}}
{{- else -}}
{{- toString . -}}
{{- end -}}
{{- end -}}
