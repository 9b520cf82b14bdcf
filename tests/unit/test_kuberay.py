"""The KubeRay manifests (k8s/) hold together: valid Kubernetes, KubeRay's fields, our recipe.

No RayJob schema installs from PyPI (kubernetes-validate carries Kubernetes' own kinds only; the
RayJob CRD ships with the KubeRay operator's Helm chart). So:
- the pod templates and the Service are validated, strictly, against Kubernetes' own schema from
  kubernetes-validate (unknown fields and wrong types fail);
- the RayJob's own fields are checked against KubeRay's ray.io/v1 Go types (RayJobSpec,
  RayClusterSpec, HeadGroupSpec, WorkerGroupSpec; field lists transcribed below), and
  rayStartParams against the map[string]string KubeRay requires;
- the entrypoint must be a config `ammd check --config-only` accepts, and the worker groups must
  offer the GPUs and the custom Ray resources that config's actors ask for.
"""
import json
import shlex
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install '.[test]'")

from cluster.cli import main  # noqa: E402
from cluster.config import load_config  # noqa: E402
from cluster.plan import resource_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "k8s").glob("rayjob-*.yaml"))
K8S_VERSION = "1.33.0"  # a version every current managed Kubernetes runs or has passed

# KubeRay ray.io/v1 (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go): json field names.
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
               "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
               "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule"}
CLUSTER_SPEC = {"upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions",
                "headServiceAnnotations", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                "rayVersion", "workerGroupSpecs"}
HEAD_GROUP = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}


def load(path: Path) -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1, f"{path.name}: one RayJob per manifest"
    return jobs[0], [d for d in docs if d is not jobs[0]]


def groups(job: dict) -> list[tuple[str, dict]]:
    spec = job["spec"]["rayClusterSpec"]
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def validate_k8s(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_pod_templates_and_services_are_valid_kubernetes(path):
    job, others = load(path)
    for name, group in groups(job):
        # A pod template is validated as the PodTemplate kind that wraps one.
        validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ammd-{name}"},
                      "template": group["template"]})
        spec = group["template"]["spec"]
        declared = {v["name"] for v in spec.get("volumes", [])}
        for container in spec["containers"]:
            mounted = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounted <= declared, f"{name}: mounts {mounted - declared} that no volume declares"
    for doc in others:
        validate_k8s(doc)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_rayjob_fields_are_kuberays(path):
    job, _ = load(path)
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC, set(spec) - RAYJOB_SPEC
    assert set(spec["rayClusterSpec"]) <= CLUSTER_SPEC, set(spec["rayClusterSpec"]) - CLUSTER_SPEC
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    for name, group in groups(job):
        allowed = HEAD_GROUP if name == "head" else WORKER_GROUP
        assert set(group) <= allowed, (name, set(group) - allowed)
        params = group.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{name}: rayStartParams are strings"
        if name != "head":
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    import ray
    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__  # the Ray ammd is pinned to


def offered(job: dict) -> tuple[float, dict[str, float], float]:
    """GPUs the worker groups offer, their custom Ray resources, and the head pod's GPUs."""
    gpus, custom, head_gpus = 0.0, {}, 0.0
    for name, group in groups(job):
        replicas = 1 if name == "head" else group["replicas"]
        params = group.get("rayStartParams", {})
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        pod_gpus = float(limits.get("nvidia.com/gpu", 0))
        assert float(params.get("num-gpus", pod_gpus)) == pod_gpus, f"{name}: num-gpus != the pod's GPUs"
        if name == "head":
            head_gpus = pod_gpus
            continue
        gpus += replicas * pod_gpus
        if "resources" in params:  # KubeRay's form: a JSON object inside a quoted string
            resources = json.loads(json.loads(params["resources"]))
            for key, value in resources.items():
                custom[key] = custom.get(key, 0) + replicas * value
    return gpus, custom, head_gpus


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_entrypoint_is_a_recipe_the_cluster_can_hold(path, capsys):
    job, others = load(path)
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["ammd", "run"]
    config, overrides = argv[2], argv[3:]
    assert main(["check", str(ROOT / config), *overrides, "--config-only"]) == 0, capsys.readouterr().err
    cfg = load_config(ROOT / config, overrides)
    gpus, custom, head_gpus = offered(job)
    assert head_gpus == 0  # the head runs the driver and the buffer; GPUs sit on the workers
    assert sum(d.gpus for d in resource_plan(cfg)) == gpus  # every GPU used, none missing
    asked: dict[str, float] = {}
    demands = [(cfg.learner.resources, cfg.learner.actors),
               (cfg.rollout.student.resources, cfg.rollout.student_actors),
               (cfg.rollout.teacher.resources, cfg.rollout.teacher_actors)]
    for resources, actors in demands:
        for key, value in (resources or {}).items():
            asked[key] = asked.get(key, 0) + value * actors
    for key, value in asked.items():
        assert custom.get(key, 0) >= value, f"the config asks for {value} {key}, the workers offer {custom.get(key, 0)}"
    # The status endpoint listens beyond the pod, and the Service reaches the head's port.
    assert cfg.status.host == "0.0.0.0"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    service = next(d for d in others if d["kind"] == "Service")
    assert service["spec"]["selector"].items() <= head["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    target = service["spec"]["ports"][0]["targetPort"]
    assert ports[target] == cfg.status.port
    # Checkpoints and the exported student go where every pod (head and workers) mounts storage.
    for name, group in groups(job):
        mounts = [m["mountPath"] for m in group["template"]["spec"]["containers"][0].get("volumeMounts", [])]
        assert any(Path(cfg.output_dir).is_relative_to(m) for m in mounts), f"{name} does not mount output_dir"


def test_a_broken_pod_template_is_caught():
    """The schema check is not vacuous: a misspelt field and a wrong type both fail it."""
    job, _ = load(MANIFESTS[0])
    template = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    bad = json.loads(json.dumps(template))
    bad["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": bad})
    bad = json.loads(json.dumps(template))
    bad["spec"]["containers"][0]["ports"][0]["containerPort"] = "six"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": bad})
