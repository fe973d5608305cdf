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
    assert "volumes" not in deployment["spec"]["template"]["spec"]
    variables = env(deployment)
    assert variables["AMSKV_DEVICE"] == "cpu" and "AMSKV_VAR_CHECKPOINT" not in variables


@pytest.mark.parametrize("name", list(KUSTOMIZATIONS))
def test_probes_and_the_grace_period_outlast_the_drain(rendered, name):
    deployment = one(rendered[name], "Deployment")
    api = container(deployment)
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    startup = api["startupProbe"]
    assert startup["httpGet"]["path"] == "/livez"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "model load on a GPU takes minutes"
    pre_stop = api["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(env(deployment)["AMSKV_DRAIN_TIMEOUT_S"])
    # preStop, the drain, uvicorn's graceful shutdown (bounded by the drain timeout again), the worker join.
    needed = float(pre_stop[1]) + 2 * drain + WORKER_JOIN_S
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


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
def test_keda_scales_the_deployment_on_queued_images_per_replica(rendered, name):
    objects = rendered[name]
    deployment = one(objects, "Deployment")
    scaled = one(objects, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert 1 <= scaled["minReplicaCount"] < scaled["maxReplicaCount"]
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    selectors = metric_selectors(trigger["metadata"]["query"])
    assert [metric for metric, _ in selectors] == ["amskv_queue_images"]
    assert "amskv_queue_images" in exported_series()
    # The per-replica target is a whole number of batches: at least one full batch waiting per replica.
    assert float(trigger["metadata"]["threshold"]) >= float(env(deployment)["AMSKV_MAX_BATCH"])
    scale_down = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert scale_down["stabilizationWindowSeconds"] >= grace
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 120}]
