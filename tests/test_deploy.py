"""Kubernetes manifests (deploy/render.py): valid against the Kubernetes schemas (offline,
kubernetes-validate), for 1, 3 and 8 processes, wired so that pod i is Bytewax process i."""

import copy
import subprocess

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from deploy.render import (API, CLUSTER_PORT, FLOW, METRICS_PORT, SECRETS, SETTINGS, SPOOL_DIR, DeployOptions,
                           render, to_yaml)
from ops.cli import cli

K8S_VERSION = "1.30.0"


def by_kind(documents: list[dict]) -> dict[str, list[dict]]:
    kinds: dict[str, list[dict]] = {}
    for doc in documents:
        kinds.setdefault(doc["kind"], []).append(doc)
    return kinds


def the(documents: list[dict], kind: str, name: str) -> dict:
    found, = [doc for doc in documents if doc["kind"] == kind and doc["metadata"]["name"] == name]
    return found


def flow_container(documents: list[dict]) -> dict:
    statefulset = the(documents, "StatefulSet", FLOW)
    container, = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


@pytest.mark.parametrize("processes", [1, 3, 8])
def test_every_manifest_is_valid_kubernetes(processes):
    documents = yaml.safe_load_all(to_yaml(render(DeployOptions(processes=processes))))
    for doc in documents:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_statefulset():
    statefulset = the(render(DeployOptions(processes=3)), "StatefulSet", FLOW)
    broken = copy.deepcopy(statefulset)
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    misspelt = copy.deepcopy(statefulset)
    misspelt["spec"]["serviceNme"] = misspelt["spec"].pop("serviceName")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, K8S_VERSION, strict=True)


@pytest.mark.parametrize("processes", [1, 3, 8])
def test_pod_i_is_process_i_of_a_cluster_of_every_pod(processes):
    documents = render(DeployOptions(processes=processes, namespace="telemetry"))
    statefulset = the(documents, "StatefulSet", FLOW)
    assert statefulset["spec"]["replicas"] == processes
    assert statefulset["spec"]["podManagementPolicy"] == "Parallel"
    container = flow_container(documents)
    addresses = env_of(container)["BYTEWAX_ADDRESSES"].split(";")
    assert addresses == [f"{FLOW}-{i}.{FLOW}.telemetry.svc.cluster.local:{CLUSTER_PORT}" for i in range(processes)]
    services = {s["metadata"]["name"]: s for s in by_kind(documents)["Service"]}
    assert services[FLOW]["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == FLOW
    # The pod's shell derives -i from the ordinal at the end of its host name.
    shell = container["command"][-1]
    for ordinal in {0, processes - 1}:
        echoed = subprocess.run(["/bin/sh", "-c", shell.replace("exec gatewatch", "echo gatewatch")],
                                env={"HOSTNAME": f"{FLOW}-{ordinal}", "BYTEWAX_ADDRESSES": "peers"},
                                capture_output=True, text=True, check=True).stdout.split()
        assert echoed[echoed.index("-i") + 1] == str(ordinal)
        assert echoed[echoed.index("-a") + 1] == "peers"
        assert "--recovery-share" in echoed


def test_recovery_lives_on_a_volume_per_pod_holding_its_share():
    documents = render(DeployOptions(processes=3))
    statefulset = the(documents, "StatefulSet", FLOW)
    claim, = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    container = flow_container(documents)
    mount, = container["volumeMounts"]
    assert mount["name"] == claim["metadata"]["name"]
    assert f"--recovery-dir {mount['mountPath']}" in container["command"][-1]
    assert env_of(container)["GATEWATCH_RECOVERY__PARTITIONS"] == "3"


def test_a_shared_recovery_claim_replaces_the_per_pod_volumes():
    documents = render(DeployOptions(processes=3, shared_recovery_claim="gatewatch-recovery"))
    statefulset = the(documents, "StatefulSet", FLOW)
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volume, = statefulset["spec"]["template"]["spec"]["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == "gatewatch-recovery"
    assert "--recovery-share" not in flow_container(documents)["command"][-1]


def test_settings_probes_metrics_and_resources():
    documents = render(DeployOptions(processes=3))
    container = flow_container(documents)
    assert container["envFrom"] == [{"configMapRef": {"name": SETTINGS}}, {"secretRef": {"name": SECRETS}}]
    config_map, = by_kind(documents)["ConfigMap"]
    secret, = by_kind(documents)["Secret"]
    assert "GATEWATCH_KAFKA__BOOTSTRAP" in config_map["data"]
    # The password-bearing URL is in the Secret, and it is a server: a cluster refuses chdb.
    assert secret["stringData"]["GATEWATCH_CLICKHOUSE__URL"].startswith("clickhouse://")
    assert "GATEWATCH_CLICKHOUSE__URL" not in config_map["data"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"cluster": CLUSTER_PORT, "metrics": METRICS_PORT}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    env = env_of(container)
    assert env["GATEWATCH_METRICS__HOST"] == "0.0.0.0" and env["GATEWATCH_METRICS__OFFSET_BY_PROCESS"] == "false"
    statefulset = the(documents, "StatefulSet", FLOW)
    annotations = statefulset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]


def api_pods(documents: list[dict], kind: str) -> tuple[dict, dict]:
    workload = the(documents, kind, API)
    container, = workload["spec"]["template"]["spec"]["containers"]
    return workload, container


def test_the_api_is_a_statefulset_with_a_spool_volume_per_pod_scaled_by_an_autoscaler():
    documents = render(DeployOptions(processes=1, api_spool_gib=4))
    assert "Deployment" not in by_kind(documents)
    api, container = api_pods(documents, "StatefulSet")
    autoscaler, = by_kind(documents)["HorizontalPodAutoscaler"]
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": API}
    assert autoscaler["spec"]["minReplicas"] <= api["spec"]["replicas"] <= autoscaler["spec"]["maxReplicas"]
    assert container["ports"] == [{"name": "http", "containerPort": 4318}]
    assert container["resources"]["requests"]["cpu"]  # an HPA on CPU needs a CPU request
    # The durable spool is on the pod's own claim, which outlives the pod and a scale-down.
    claim, = api["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "4Gi"
    assert container["volumeMounts"] == [{"name": claim["metadata"]["name"], "mountPath": SPOOL_DIR}]
    assert api["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenScaled": "Retain", "whenDeleted": "Retain"}
    env = env_of(container)
    assert env["GATEWATCH_API__SPOOL_DIR"] == SPOOL_DIR
    assert 0 < int(env["GATEWATCH_API__MAX_SPOOL_BYTES"]) < 4 * 2**30  # the spool refuses (503) before the disk is full
    assert api["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 10001  # the volume is writable
    # Keys are shared by every replica: PostgreSQL, its URL (a password) in the Secret.
    secret, = by_kind(documents)["Secret"]
    assert secret["stringData"]["GATEWATCH_API__KEYS_URL"].startswith("postgresql://")


def test_a_shared_spool_claim_makes_the_api_a_deployment_on_it():
    documents = render(DeployOptions(shared_spool_claim="api-spool-rwx"))
    deployment, container = api_pods(documents, "Deployment")
    assert "volumeClaimTemplates" not in deployment["spec"]
    volume, = deployment["spec"]["template"]["spec"]["volumes"]
    assert volume == {"name": "spool", "persistentVolumeClaim": {"claimName": "api-spool-rwx"}}
    autoscaler, = by_kind(documents)["HorizontalPodAutoscaler"]
    assert autoscaler["spec"]["scaleTargetRef"]["kind"] == "Deployment"
    for doc in documents:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_render_refuses_what_a_cluster_cannot_run():
    with pytest.raises(ValueError, match="chdb"):
        render(DeployOptions(clickhouse_url="chdb:///data/chdb"))
    with pytest.raises(ValueError, match="chdb host"):
        render(DeployOptions(clickhouse_url="chdb+unix:///run/gatewatch/chdb.sock"))
    with pytest.raises(ValueError, match="give every pod at least one"):
        render(DeployOptions(processes=4, recovery_partitions=2))


def test_gatewatch_deploy_render_prints_the_manifests():
    result = CliRunner().invoke(cli, ["deploy", "render", "--processes", "8", "--namespace", "prod"])
    assert result.exit_code == 0, result.output
    documents = list(yaml.safe_load_all(result.output))
    statefulset = the(documents, "StatefulSet", FLOW)
    assert statefulset["spec"]["replicas"] == 8 and statefulset["metadata"]["namespace"] == "prod"
    shared = CliRunner().invoke(cli, ["deploy", "render", "--shared-spool-claim", "rwx", "--api-spool-gib", "2"])
    assert shared.exit_code == 0, shared.output
    assert the(list(yaml.safe_load_all(shared.output)), "Deployment", API)["spec"]["template"]["spec"]["volumes"]
    bad = CliRunner().invoke(cli, ["deploy", "render", "--processes", "4", "--recovery-partitions", "2"])
    assert bad.exit_code == 2 and "at least one" in bad.output


def test_a_drain_job_sends_what_a_scaled_down_api_pod_left_on_its_retained_claim():
    documents = render(DeployOptions(processes=1, drain_api_spools=(3, 0, 3)))
    for doc in documents:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    api, api_container = api_pods(documents, "StatefulSet")
    jobs = by_kind(documents)["Job"]
    assert [job["metadata"]["name"] for job in jobs] == [f"{API}-spool-drain-0", f"{API}-spool-drain-3"]
    job = jobs[1]
    pod = job["spec"]["template"]["spec"]
    container, = pod["containers"]
    # The claim the StatefulSet made for pod 3: <claim template>-<statefulset>-<ordinal>.
    template, = api["spec"]["volumeClaimTemplates"]
    volume, = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == f"{template['metadata']['name']}-{API}-3"
    assert container["volumeMounts"] == [{"name": volume["name"], "mountPath": SPOOL_DIR}]
    assert container["args"] == ["gatewatch", "spool", "drain", SPOOL_DIR]
    assert env_of(container) == env_of(api_container) and container["envFrom"] == api_container["envFrom"]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] > 0  # retried while Kafka is away
    assert pod["securityContext"] == api["spec"]["template"]["spec"]["securityContext"]  # same owner as the pod
    # The Job's command is ours: `gatewatch spool drain DIR` parses.
    assert CliRunner().invoke(cli, [*container["args"][1:], "--help"]).exit_code == 0
    assert "Job" not in by_kind(render(DeployOptions(processes=1)))


def test_gatewatch_deploy_render_adds_drain_jobs_and_refuses_them_on_a_shared_claim():
    result = CliRunner().invoke(cli, ["deploy", "render", "--drain-api-spool", "2", "--drain-api-spool", "5"])
    assert result.exit_code == 0, result.output
    jobs = by_kind(list(yaml.safe_load_all(result.output)))["Job"]
    assert [job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] for job in jobs] \
        == [f"spool-{API}-2", f"spool-{API}-5"]
    shared = CliRunner().invoke(cli, ["deploy", "render", "--shared-spool-claim", "rwx", "--drain-api-spool", "1"])
    assert shared.exit_code == 2 and "takes orphaned spool slots itself" in shared.output
