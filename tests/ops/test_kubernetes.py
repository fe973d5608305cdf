"""The Kubernetes manifests (deploy/k8s), checked offline.

`kubectl kustomize` renders the base and each overlay; kubernetes-validate checks every core object against
the bundled OpenAPI schemas of one Kubernetes release (strict: unknown fields fail); the KEDA ScaledObject, a
custom resource those schemas lack, is checked against tests/ops/schemas/keda-scaledobject.json. Each checker
is paired with a negative control. The remaining tests assert what the manifests must say about draining,
probes, GPUs and autoscaling.
"""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.ops.test_configs import exported_series, metric_selectors
from tests.tools import find_tool

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy/k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays/gpu", "cpu": K8S / "overlays/cpu"}
SCALED_OBJECT_SCHEMA = json.loads((REPO / "tests/ops/schemas/keda-scaledobject.json").read_text())
KUBERNETES_VERSION = "1.31.0"  # one of the releases kubernetes-validate ships schemas for
CUSTOM_KINDS = {"ScaledObject"}
WORKER_JOIN_S = 10  # server/worker.py waits this long for the inference thread after the drain


def render(name: str) -> list[dict]:
    result = subprocess.run([find_tool("kubectl"), "kustomize", str(KUSTOMIZATIONS[name])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(name) for name in KUSTOMIZATIONS}


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


def validate_core(obj: dict) -> None:
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def validate_custom(obj: dict) -> None:
    jsonschema.validate(obj, SCALED_OBJECT_SCHEMA, cls=jsonschema.Draft202012Validator)


def container(deployment: dict) -> dict:
    (api,) = deployment["spec"]["template"]["spec"]["containers"]
    return api


def env(deployment: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(deployment)["env"]}


# --- rendering and schemas --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_kustomize_renders_and_every_object_validates(rendered, name):
    objects = rendered[name]
    kinds = sorted(o["kind"] for o in objects)
    expected = {"Namespace", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject"}
    assert set(kinds) == (expected if name == "cpu" else expected | {"PersistentVolumeClaim"}), kinds
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            validate_custom(obj)
        else:
            validate_core(obj)
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "amskv", obj["metadata"]


def test_kubernetes_validate_rejects_a_misspelt_field(rendered):
    deployment = copy.deepcopy(one(rendered["base"], "Deployment"))
    container(deployment)["readinesProbe"] = container(deployment).pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_core(deployment)


@pytest.mark.parametrize("breakage", ["threshold_number", "unknown_field", "no_query"])
def test_scaled_object_schema_rejects_broken_objects(rendered, breakage):
    scaled = copy.deepcopy(one(rendered["base"], "ScaledObject"))
    metadata = scaled["spec"]["triggers"][0]["metadata"]
    if breakage == "threshold_number":
        metadata["threshold"] = 256  # KEDA's trigger metadata is a map of strings
    elif breakage == "unknown_field":
        scaled["spec"]["cooldown"] = 300
    else:
        del metadata["query"]
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(scaled)


# --- what the objects say ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["base", "gpu"])
def test_the_gpu_deployment_requests_one_gpu_per_pod(rendered, name):
    deployment = one(rendered[name], "Deployment")
    assert container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env(deployment)["AMSKV_DEVICE"] == "cuda"
    assert "replicas" not in deployment["spec"], "the ScaledObject owns the replica count"


def test_the_gpu_overlay_tolerates_the_gpu_taint(rendered):
    spec = one(rendered["gpu"], "Deployment")["spec"]["template"]["spec"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_the_cpu_overlay_drops_the_gpu_and_the_checkpoints(rendered):
    deployment = one(rendered["cpu"], "Deployment")
    assert "nvidia.com/gpu" not in json.dumps(deployment)
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert "persistentVolumeClaim" not in json.dumps(volumes) and {v["name"] for v in volumes} == {"tmp", "cache"}
    assert {m["name"] for m in container(deployment)["volumeMounts"]} == {"tmp", "cache"}
    variables = env(deployment)
    assert variables["AMSKV_DEVICE"] == "cpu" and "AMSKV_VAR_CHECKPOINT" not in variables


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_probes_and_the_grace_period_outlast_the_drain(rendered, name):
    deployment = one(rendered[name], "Deployment")
    api = container(deployment)
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = api["startupProbe"]
    # /livez is 200 while the model loads: a startup probe on it passes at once and catches no hung load.
    assert startup["httpGet"]["path"] == "/readyz" != api["livenessProbe"]["httpGet"]["path"]
    startup_s = startup["periodSeconds"] * startup["failureThreshold"]
    assert startup_s >= 300, "model load on a GPU takes minutes"
    # the process ends a load past AMSKV_LOAD_TIMEOUT_S itself (status 3, with the reason) before the kubelet does
    assert float(env(deployment)["AMSKV_LOAD_TIMEOUT_S"]) < startup_s
    pre_stop = api["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env(deployment)["AMSKV_DRAIN_TIMEOUT_S"])
    # preStop, the drain, uvicorn's graceful shutdown (bounded by the drain timeout again), the worker join.
    needed = float(pre_stop[1]) + 2 * drain + WORKER_JOIN_S
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_rollout_pdb_and_replica_minimum_agree(rendered, name):
    # One GPU per pod: a surge pod needs a spare GPU, so an old pod goes first (maxSurge 0, maxUnavailable 1).
    # The PDB allows one pod down too; a minimum of 2 replicas keeps one serving through either.
    objects = rendered[name]
    rolling = one(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert (rolling["maxSurge"], rolling["maxUnavailable"]) == (0, 1)
    pdb = one(objects, "PodDisruptionBudget")["spec"]
    minimum = one(objects, "ScaledObject")["spec"]["minReplicaCount"]
    assert pdb["maxUnavailable"] < minimum and rolling["maxUnavailable"] < minimum, (pdb, minimum)


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_service_pdb_and_scrape_annotations_select_the_pods(rendered, name):
    objects = rendered[name]
    deployment = one(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    port = container(deployment)["ports"][0]
    service = one(objects, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_keda_scales_the_deployment_on_the_deepest_replica_queue(rendered, name):
    objects = rendered[name]
    deployment = one(objects, "Deployment")
    scaled = one(objects, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 2 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    (trigger,) = scaled["triggers"]
    # One replica full beside idle ones must scale out: the max, not the average (kube-proxy is not leastconn).
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    assert trigger["metadata"]["query"].replace(" ", "").startswith("max(")
    selectors = metric_selectors(trigger["metadata"]["query"])
    assert [metric for metric, _ in selectors] == ["amskv_queue_images"]
    assert "amskv_queue_images" in exported_series()
    # The per-replica target is a whole number of batches: at least one full batch waiting per replica.
    assert float(trigger["metadata"]["threshold"]) >= float(env(deployment)["AMSKV_MAX_BATCH"])
    scale_down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert scale_down["stabilizationWindowSeconds"] >= grace
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]


def test_keda_reads_the_prometheus_community_charts_service_and_an_overlay_can_point_it_elsewhere(rendered, tmp_path):
    (trigger,) = one(rendered["gpu"], "ScaledObject")["spec"]["triggers"]
    # prometheus-community/prometheus: Service prometheus-server, port 80 (9090 is the container port)
    assert trigger["metadata"]["serverAddress"] == "http://prometheus-server.monitoring.svc:80"
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(KUSTOMIZATIONS["gpu"], overlay)],
        "patches": [{"target": {"kind": "ScaledObject", "name": "amskv"}, "patch": yaml.safe_dump([
            {"op": "replace", "path": "/spec/triggers/0/metadata/serverAddress",
             "value": "http://prometheus-operated.monitoring.svc:9090"}])}]}))
    result = subprocess.run([find_tool("kubectl"), "kustomize", str(overlay)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    scaled = one([d for d in yaml.safe_load_all(result.stdout) if d], "ScaledObject")
    address = scaled["spec"]["triggers"][0]["metadata"]["serverAddress"]
    assert address == "http://prometheus-operated.monitoring.svc:9090"


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_image_names_a_registry(rendered, name):
    image = container(one(rendered[name], "Deployment"))["image"]
    registry, _, rest = image.partition("/")
    assert "." in registry and rest.endswith("amskv-api:0.1.0"), image  # a host, not Docker Hub's library


# --- Pod Security Standards, "restricted" -----------------------------------------------------------------
# The profile's rules (https://kubernetes.io/docs/concepts/security/pod-security-standards/, v1.31), checked on
# the rendered pod template, plus a read-only root filesystem, which the issue asks for beyond the profile.

RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}


def restricted_violations(pod: dict) -> list[str]:
    """What the Pod Security "restricted" level (and a read-only root) rejects in a pod spec; [] when it passes."""
    found = []
    pod_security = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"{field}: true")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    for sysctl in pod_security.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            found.append(f"sysctl {sysctl['name']}")
    if pod_security.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    for box in pod.get("initContainers", []) + pod["containers"]:
        where = f"container {box['name']}"
        security = box.get("securityContext", {})
        if security.get("privileged"):
            found.append(f"{where}: privileged")
        if security.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        capabilities = security.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{where}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: adds capabilities {capabilities['add']}")
        if security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot is not true")
        if security.get("runAsUser", pod_security.get("runAsUser")) == 0:
            found.append(f"{where}: runAsUser 0")
        seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile {seccomp}")
        if any(port.get("hostPort") for port in box.get("ports", [])):
            found.append(f"{where}: hostPort")
        if security.get("readOnlyRootFilesystem") is not True:
            found.append(f"{where}: readOnlyRootFilesystem is not true")
    return found


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_pods_meet_the_restricted_pod_security_profile(rendered, name):
    pod = pod_spec(rendered[name])
    assert restricted_violations(pod) == []
    # The read-only root needs somewhere to write: /tmp and the KV profile cache are emptyDirs.
    api = container(one(rendered[name], "Deployment"))
    mounts = {m["mountPath"]: m["name"] for m in api["volumeMounts"]}
    empty = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert mounts["/tmp"] in empty
    assert env(one(rendered[name], "Deployment"))["AMSKV_KV_PROFILE_CACHE_DIR"].startswith(
        next(path for path, volume in mounts.items() if volume == "cache") + "/")


@pytest.mark.parametrize("breakage", ["seccomp", "root", "escalation", "capabilities", "writable_root", "host_path"])
def test_the_restricted_check_rejects_what_the_profile_rejects(rendered, breakage):
    pod = copy.deepcopy(pod_spec(rendered["gpu"]))
    api = pod["containers"][0]
    if breakage == "seccomp":
        del pod["securityContext"]["seccompProfile"]
    elif breakage == "root":
        pod["securityContext"]["runAsNonRoot"] = False
        del api["securityContext"]["runAsNonRoot"]
    elif breakage == "escalation":
        del api["securityContext"]["allowPrivilegeEscalation"]
    elif breakage == "capabilities":
        api["securityContext"]["capabilities"] = {"drop": ["NET_RAW"]}
    elif breakage == "writable_root":
        api["securityContext"]["readOnlyRootFilesystem"] = False
    else:
        pod["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}})
    assert restricted_violations(pod), breakage


def test_the_scale_out_page_quotes_the_manifests_drain_and_grace(rendered):
    # docs/scale-out.md once said a 30 s drain and a 90 s grace while the manifests said 60 s and 150 s.
    deployment = one(rendered["gpu"], "Deployment")
    page = (REPO / "docs/scale-out.md").read_text()
    drains = set(re.findall(r"`AMSKV_DRAIN_TIMEOUT_S` \((\d+) s\)", page))
    graces = set(re.findall(r"`terminationGracePeriodSeconds: (\d+)`", page))
    assert drains == {env(deployment)["AMSKV_DRAIN_TIMEOUT_S"]}, drains
    assert graces == {str(deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"])}, graces
    scaled = one(rendered["gpu"], "ScaledObject")["spec"]
    assert f"`minReplicaCount: {scaled['minReplicaCount']}`" in page
    assert scaled["triggers"][0]["metadata"]["query"] in page


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_the_namespace_enforces_the_restricted_profile(rendered, name):
    labels = one(rendered[name], "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
