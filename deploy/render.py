"""Kubernetes manifests for gatewatch: the ingest flow as an N-process Bytewax cluster (a
StatefulSet) and the ingestion API as a StatefulSet scaled by a HorizontalPodAutoscaler.

Plain Python data rendered to YAML, so `gatewatch deploy render --processes N` needs no
Helm; every manifest is checked against the Kubernetes schemas in tests/test_deploy.py.

- Pod i of the StatefulSet is Bytewax process i: `-i` comes from the ordinal at the end
  of its host name, `-a` lists every pod's stable name under the headless service.
- Pods start in parallel: a timely cluster waits for all its peers before any work, so
  ordered start-up would wait forever for pod 1 while pod 0 is not ready.
- Recovery: each pod keeps its share of the recovery partitions on its own volume
  (`gatewatch run --recovery-share`); Bytewax gathers them from every process when it
  resumes. Changing the process count then needs the partitions moved, so a cluster that
  rescales should use one ReadWriteMany claim for all pods (shared_recovery_claim).
- Settings come from a ConfigMap (addresses, tuning) and a Secret (ClickHouse URL with
  its password, S3 keys). ClickHouse must be a server: a cluster refuses embedded chdb and a chdb host.
- Liveness and readiness read the metrics endpoint: a flow process whose Python is stuck
  (the chdb GIL deadlock of ops/cluster.py was one) stops answering it.
- The API's durable spool (a 2xx means the event is on disk) lives on a volume per pod:
  the API is a StatefulSet (an HPA scales it like a Deployment), so a pod that crashes or
  moves to another node comes back with its own volume and sends what its predecessor
  spooled. Claims are retained when the HPA scales down: a pod stopped while Kafka was
  unreachable (it flushes for up to 10 s first) keeps its events on its claim until
  that ordinal runs again, or a drain Job (``drain_api_spools``) sends them. With a ReadWriteMany claim (shared_spool_claim) the API is a
  Deployment instead: every pod takes a free spool slot there, orphaned ones included.
  API keys live in PostgreSQL (api.keys_url, in the Secret), shared by every replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

FLOW = "gatewatch-flow"
API = "gatewatch-api"
SETTINGS = "gatewatch-settings"
SECRETS = "gatewatch-secrets"
CLUSTER_PORT = 2101
METRICS_PORT = 9100
API_PORT = 4318
RECOVERY_DIR = "/var/lib/gatewatch/recovery"
SPOOL_DIR = "/var/lib/gatewatch/spool"
SPOOL_SHARE = 0.8
"""Of the spool volume, the part the API's spool may fill (filesystem overhead, headroom)."""

# From `gatewatch bench e2e` (ops/bench/FINDINGS.md, issue 17), two flow processes on two
# cores: peak RSS 624-1,126 MB per process at 2,500 events/s and 966 / 1,478 MB at 5,000/s;
# 0.19-0.59 CPU s per 1,000 events, so one process saturates about one core (one GIL).
FLOW_RESOURCES = {"requests": {"cpu": "1", "memory": "1536Mi"}, "limits": {"memory": "2Gi"}}
# Not benchmarked yet: an HTTP front that validates and produces; the HPA adds replicas.
API_RESOURCES = {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}}


@dataclass
class DeployOptions:
    processes: int = 3
    namespace: str = "gatewatch"
    image: str = "gatewatch:latest"
    kafka_bootstrap: str = "kafka:9092"
    redis_url: str = "redis://redis:6379/0"
    parquet_root: str = "s3://gatewatch-raw/events"
    clickhouse_url: str = "clickhouse://gatewatch:CHANGE-ME@clickhouse:9000"
    recovery_size: str = "1Gi"
    recovery_partitions: int | None = None
    """Default: one per process."""
    shared_recovery_claim: str | None = None
    """An existing ReadWriteMany claim holding every partition, instead of one volume per pod."""
    api_replicas: tuple[int, int] = (2, 10)
    api_target_cpu: int = 70
    api_keys_url: str = "postgresql://gatewatch:CHANGE-ME@postgres:5432/gatewatch"
    api_spool_gib: int = 1
    """Size of each API pod's spool volume (one worker per pod: the HPA scales pods)."""
    shared_spool_claim: str | None = None
    """An existing ReadWriteMany claim for every API pod's spool: the API is then a Deployment."""
    drain_api_spools: tuple[int, ...] = ()
    """Ordinals of scaled-down API pods whose retained spool claims get a drain Job."""
    extra_settings: dict[str, str] = field(default_factory=dict)


def labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "gatewatch", "app.kubernetes.io/component": component}


def meta(name: str, options: DeployOptions, component: str, **extra) -> dict:
    return {"name": name, "namespace": options.namespace, "labels": labels(component), **extra}


def peer_addresses(options: DeployOptions) -> str:
    """BYTEWAX_ADDRESSES: every pod's stable DNS name under the headless service."""
    domain = f"{FLOW}.{options.namespace}.svc.cluster.local"
    return ";".join(f"{FLOW}-{index}.{domain}:{CLUSTER_PORT}" for index in range(options.processes))


def http_probe(path: str, port: str, period_s: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period_s, "timeoutSeconds": 5,
            "failureThreshold": failures}


def scrape_annotations(port: int) -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": "/metrics"}


def settings_config_map(options: DeployOptions) -> dict:
    data = {
        "GATEWATCH_KAFKA__BOOTSTRAP": options.kafka_bootstrap,
        "GATEWATCH_KAFKA__TAIL": "true",
        "GATEWATCH_REDIS__URL": options.redis_url,
        "GATEWATCH_PARQUET__ROOT": options.parquet_root,
        "GATEWATCH_LOG_LEVEL": "INFO",
        **options.extra_settings,
    }
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(SETTINGS, options, "settings"), "data": data}


def secret(options: DeployOptions) -> dict:
    """Placeholders: replace them (or let an external secrets operator own this Secret)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": meta(SECRETS, options, "settings"),
            "stringData": {"GATEWATCH_CLICKHOUSE__URL": options.clickhouse_url,
                           "GATEWATCH_API__KEYS_URL": options.api_keys_url,
                           "AWS_ACCESS_KEY_ID": "CHANGE-ME", "AWS_SECRET_ACCESS_KEY": "CHANGE-ME"}}


def settings_from() -> list[dict]:
    return [{"configMapRef": {"name": SETTINGS}}, {"secretRef": {"name": SECRETS}}]


def flow_service(options: DeployOptions) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(FLOW, options, "flow"), "spec": {
        "clusterIP": "None",
        # Peers must resolve each other before any of them is ready.
        "publishNotReadyAddresses": True,
        "selector": labels("flow"),
        "ports": [{"name": "cluster", "port": CLUSTER_PORT, "targetPort": "cluster"},
                  {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
    }}


def flow_statefulset(options: DeployOptions) -> dict:
    partitions = options.recovery_partitions or options.processes
    share = "" if options.shared_recovery_claim else " --recovery-share"
    run = (f'exec gatewatch run ingest -w 1 -i "${{HOSTNAME##*-}}" -a "$BYTEWAX_ADDRESSES" '
           f"--recovery-dir {RECOVERY_DIR}{share}")
    container = {
        "name": "flow",
        "image": options.image,
        "command": ["/bin/sh", "-c", run],
        "env": [
            {"name": "BYTEWAX_ADDRESSES", "value": peer_addresses(options)},
            {"name": "GATEWATCH_RECOVERY__PARTITIONS", "value": str(partitions)},
            {"name": "GATEWATCH_METRICS__PORT", "value": str(METRICS_PORT)},
            {"name": "GATEWATCH_METRICS__HOST", "value": "0.0.0.0"},
            {"name": "GATEWATCH_METRICS__OFFSET_BY_PROCESS", "value": "false"},
        ],
        "envFrom": settings_from(),
        "ports": [{"name": "cluster", "containerPort": CLUSTER_PORT},
                  {"name": "metrics", "containerPort": METRICS_PORT}],
        # The endpoint answers once settings are loaded; the redactor then loads for a while.
        "startupProbe": http_probe("/metrics", "metrics", 5, 24),
        "livenessProbe": http_probe("/metrics", "metrics", 20, 3),
        "readinessProbe": http_probe("/metrics", "metrics", 10, 2),
        "resources": FLOW_RESOURCES,
        "volumeMounts": [{"name": "recovery", "mountPath": RECOVERY_DIR}],
    }
    pod = {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
           "terminationGracePeriodSeconds": 30, "containers": [container]}
    spec = {
        "serviceName": FLOW,
        "replicas": options.processes,
        "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": labels("flow")},
        "template": {"metadata": {"labels": labels("flow"), "annotations": scrape_annotations(METRICS_PORT)},
                     "spec": pod},
    }
    if options.shared_recovery_claim:
        pod["volumes"] = [{"name": "recovery", "persistentVolumeClaim": {"claimName": options.shared_recovery_claim}}]
    else:
        spec["volumeClaimTemplates"] = [{
            "metadata": {"name": "recovery", "labels": labels("flow")},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": options.recovery_size}}},
        }]
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(FLOW, options, "flow"), "spec": spec}


def flow_disruption_budget(options: DeployOptions) -> dict:
    """A drained node takes one process at a time: the whole cluster restarts from recovery."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(FLOW, options, "flow"),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels("flow")}}}


def api_workload(options: DeployOptions) -> dict:
    """The API's pods: a StatefulSet with a spool volume each, or a Deployment on a shared
    ReadWriteMany spool claim."""
    container = {
        "name": "api",
        "image": options.image,
        "args": ["gatewatch", "serve", "--host", "0.0.0.0", "--port", str(API_PORT), "--workers", "1"],
        "env": api_spool_env(options),
        "envFrom": settings_from(),
        "ports": [{"name": "http", "containerPort": API_PORT}],
        "livenessProbe": http_probe("/healthz", "http", 10, 3),
        "readinessProbe": http_probe("/readyz", "http", 5, 2),
        "resources": API_RESOURCES,
        "volumeMounts": [{"name": "spool", "mountPath": SPOOL_DIR}],
        # Out of the Service's endpoints before SIGTERM, so no request arrives while the
        # producer flushes its spool on the way out.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
    }
    pod = {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
           "terminationGracePeriodSeconds": 45, "containers": [container]}
    spec = {"replicas": options.api_replicas[0], "selector": {"matchLabels": labels("api")},
            "template": {"metadata": {"labels": labels("api"), "annotations": scrape_annotations(API_PORT)},
                         "spec": pod}}
    if options.shared_spool_claim:
        pod["volumes"] = [{"name": "spool", "persistentVolumeClaim": {"claimName": options.shared_spool_claim}}]
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(API, options, "api"), "spec": spec}
    spec.update({
        "serviceName": API,
        "podManagementPolicy": "Parallel",  # the HPA adds and removes pods without waiting in order
        "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Retain", "whenDeleted": "Retain"},
        "volumeClaimTemplates": [{
            "metadata": {"name": "spool", "labels": labels("api")},
            "spec": {"accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": f"{options.api_spool_gib}Gi"}}}}],
    })
    return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta(API, options, "api"), "spec": spec}


def api_spool_env(options: DeployOptions) -> list[dict]:
    return [{"name": "GATEWATCH_API__SPOOL_DIR", "value": SPOOL_DIR},
            {"name": "GATEWATCH_API__MAX_SPOOL_BYTES", "value": str(int(options.api_spool_gib * SPOOL_SHARE * 2**30))}]


def api_spool_claim(ordinal: int) -> str:
    """The claim the StatefulSet made for pod ``ordinal`` (<template>-<statefulset>-<ordinal>)."""
    return f"spool-{API}-{ordinal}"


def api_spool_drain_job(options: DeployOptions, ordinal: int) -> dict:
    """A Job that sends what API pod ``ordinal`` left in its retained spool claim after a
    scale-down while Kafka was unreachable (`gatewatch spool drain`). The drain exits
    non-zero while Kafka stays unreachable and is safe to rerun, so the Job retries with
    Kubernetes' growing back-off; it refuses a slot that a running pod (the same ordinal
    scaled up again) holds, and that pod sends its spool itself."""
    container = {
        "name": "drain",
        "image": options.image,
        "args": ["gatewatch", "spool", "drain", SPOOL_DIR],
        "env": api_spool_env(options),
        "envFrom": settings_from(),
        "resources": API_RESOURCES,
        "volumeMounts": [{"name": "spool", "mountPath": SPOOL_DIR}],
    }
    pod = {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "fsGroup": 10001},
           "restartPolicy": "Never", "containers": [container],
           "volumes": [{"name": "spool", "persistentVolumeClaim": {"claimName": api_spool_claim(ordinal)}}]}
    name = f"{API}-spool-drain-{ordinal}"
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta(name, options, "spool-drain"), "spec": {
        # 10 retries, back-off from 10 s doubling to at most 6 min: about 40 minutes of outage.
        "backoffLimit": 10,
        "ttlSecondsAfterFinished": 7 * 24 * 3600,
        "template": {"metadata": {"labels": labels("spool-drain")}, "spec": pod}}}


def api_service(options: DeployOptions) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(API, options, "api"), "spec": {
        "selector": labels("api"), "ports": [{"name": "http", "port": API_PORT, "targetPort": "http"}]}}


def api_kind(options: DeployOptions) -> str:
    return "Deployment" if options.shared_spool_claim else "StatefulSet"


def api_autoscaler(options: DeployOptions) -> dict:
    low, high = options.api_replicas
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(API, options, "api"),
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": api_kind(options), "name": API},
                "minReplicas": low, "maxReplicas": high,
                # Fewer scale-downs, fewer pods stopped with events still to send.
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
                "metrics": [{"type": "Resource", "resource": {
                    "name": "cpu", "target": {"type": "Utilization", "averageUtilization": options.api_target_cpu}}}],
            }}


def render(options: DeployOptions) -> list[dict]:
    if options.processes < 1:
        raise ValueError(f"a cluster needs at least one process, got {options.processes}")
    if (options.recovery_partitions or options.processes) < options.processes and not options.shared_recovery_claim:
        raise ValueError(f"{options.recovery_partitions} recovery partitions cannot be shared by {options.processes} "
                         "pods with a volume each: give every pod at least one")
    if options.clickhouse_url.startswith(("chdb://", "chdb+unix://")):
        # A chdb host serves the processes of one machine; a StatefulSet's pods span nodes.
        raise ValueError("a Bytewax cluster on Kubernetes cannot write embedded chdb (nor a chdb host, which "
                         "serves one machine); give a clickhouse:// server URL")
    if options.drain_api_spools and options.shared_spool_claim:
        raise ValueError("with a shared spool claim every API pod takes orphaned spool slots itself: "
                         "there is no per-pod claim to drain")
    if any(ordinal < 0 for ordinal in options.drain_api_spools):
        raise ValueError(f"API pod ordinals start at 0, got {list(options.drain_api_spools)}")
    return [settings_config_map(options), secret(options), flow_service(options), flow_statefulset(options),
            flow_disruption_budget(options), api_workload(options), api_service(options), api_autoscaler(options),
            *(api_spool_drain_job(options, ordinal) for ordinal in sorted(set(options.drain_api_spools)))]


def to_yaml(documents: list[dict]) -> str:
    return "".join("---\n" + yaml.safe_dump(doc, sort_keys=False) for doc in documents)
