"""The Kubernetes and KServe manifests in deploy/: rendered, schema-validated, linted, and run for real.

- Rendering: deploy/render.py (the kustomize subset the manifests use); where kubectl is installed,
  its `kubectl kustomize` must produce the same objects.
- Schemas: every core object against the Kubernetes OpenAPI schema of the newest version that
  kubernetes-validate ships, strict (unknown fields are errors). KServe's InferenceService and
  ServingRuntime against the KServe SDK's generated models of their CRD schemas (field names and
  types, recursively, down to the Kubernetes types). The ServiceMonitor has no offline schema here:
  its fields are checked against what it must select (the Service's labels and port).
- What the manifests promise (probes, security, model volume, limits that match the service's
  defaults) is asserted from the rendered objects, so a drift between a manifest and the service fails.
- Security lint: checkov over the manifests and the Dockerfile (skipped with the reason when checkov
  is not installed; `make test` installs it in .venv/lint and runs it first).
- `podman kube play` of the rendered Deployment, and of the training Job's pod, for real (marked
  container; skipped with the reason when no engine answers).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

from fashion.checkpoint import read_card
from service.config import Settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = {
    "cpu": DEPLOY / "k8s" / "overlays" / "cpu",
    "gpu": DEPLOY / "k8s" / "overlays" / "gpu",
    "train": DEPLOY / "k8s" / "train",
    "kserve": DEPLOY / "kserve",
}
# Extra manifests applied on their own (not through a kustomization).
LOOSE_MANIFESTS = [
    DEPLOY / "k8s" / "ingress-nginx" / "controller-config.yaml",
    DEPLOY / "k8s" / "tools" / "model-copy-pod.yaml",
]

_spec = importlib.util.spec_from_file_location("deploy_render", DEPLOY / "render.py")
render_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_module)
render = render_module.render


def _by_kind(objects: list[dict], kind: str) -> dict:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _env(container: dict) -> dict[str, str]:
    names = [item["name"] for item in container.get("env", [])]
    assert len(names) == len(set(names)), f"duplicate environment variables: {names}"
    return {item["name"]: item["value"] for item in container.get("env", [])}


def _cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(folder) for name, folder in KUSTOMIZATIONS.items()}


# --------------------------------------------------------------------------- rendering


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here to compare the renderer with")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_renderer_produces_what_kubectl_kustomize_produces(name, rendered):
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZATIONS[name])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr

    def key(obj):
        return (obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"])

    theirs = {key(obj): obj for obj in yaml.safe_load_all(result.stdout) if obj}
    ours = {key(obj): obj for obj in rendered[name]}
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k] == theirs[k], k


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("commonLabels: {a: b}\nresources: []\n")
    with pytest.raises(render_module.RenderError, match="commonLabels"):
        render(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(DEPLOY / "k8s" / "base" / "service.yaml", base)
    (base / "kustomization.yaml").write_text("resources: [service.yaml]\n")
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    patch = {
        "resources": ["../base"],
        "patches": [
            {
                "target": {"kind": "Service", "name": "fashion-mnist-api"},
                "patch": "- op: replace\n  path: /spec/ports/5/port\n  value: 81\n",
            }
        ],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(patch))
    with pytest.raises(render_module.RenderError, match="does not exist"):
        render(overlay)
    patch["patches"][0]["patch"] = "- op: replace\n  path: /spec/ports/0/port\n  value: 81\n"
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(patch))
    assert render(overlay)[0]["spec"]["ports"][0]["port"] == 81


# --------------------------------------------------------------------------- schemas

K8S_VERSION = kubernetes_validate.utils.latest_version()
CRD_KINDS = {"InferenceService", "ServingRuntime", "ServiceMonitor"}


def _all_objects(rendered) -> list[tuple[str, dict]]:
    objects = [(name, obj) for name, objs in rendered.items() for obj in objs]
    for path in LOOSE_MANIFESTS:
        objects.extend((path.name, obj) for obj in yaml.safe_load_all(path.read_text()) if obj)
    return objects


def test_core_objects_are_valid_against_the_kubernetes_schema(rendered):
    checked = []
    for source, obj in _all_objects(rendered):
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{source}: {obj['kind']}/{obj['metadata']['name']} invalid for {K8S_VERSION}: {error}")
        checked.append(obj["kind"])
    for kind in ("Namespace", "PersistentVolumeClaim", "Deployment", "Service", "HorizontalPodAutoscaler"):
        assert kind in checked
    for kind in ("PodDisruptionBudget", "NetworkPolicy", "Ingress", "Job", "ConfigMap", "Pod"):
        assert kind in checked


def test_the_schema_check_catches_a_wrong_field():
    """The strict validation is real: a misspelt field and a wrong type are errors."""
    deployment = copy.deepcopy(_by_kind(render(KUSTOMIZATIONS["cpu"]), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = copy.deepcopy(_by_kind(render(KUSTOMIZATIONS["cpu"]), "Deployment"))
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _sdk_type_errors(value, type_name: str, path: str) -> list[str]:
    """Mismatches between a manifest value and a KServe/Kubernetes SDK model type (generated from the CRDs)."""
    import kserve.models
    import kubernetes.client.models

    if type_name == "object":
        return []
    scalars = {"str": str, "bool": bool, "float": (int, float), "datetime": str}
    if type_name in scalars:
        return [] if isinstance(value, scalars[type_name]) else [f"{path}: {value!r} is not {type_name}"]
    if type_name == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is not int"]
    # Two generator styles: kserve's `list[T]` / `dict(str, T)`, kubernetes' `List[T]` / `Dict[str, T]`.
    if match := re.fullmatch(r"[lL]ist\[(.+)\]", type_name):
        if not isinstance(value, list):
            return [f"{path}: not a list"]
        return [e for i, item in enumerate(value) for e in _sdk_type_errors(item, match[1], f"{path}[{i}]")]
    if match := re.fullmatch(r"dict\((\w+), (.+)\)|Dict\[(\w+), (.+)\]", type_name):
        if not isinstance(value, dict):
            return [f"{path}: not a mapping"]
        item_type = match[2] or match[4]
        return [e for k, item in value.items() for e in _sdk_type_errors(item, item_type, f"{path}.{k}")]
    model = getattr(kserve.models, type_name, None) or getattr(kubernetes.client.models, type_name, None)
    assert model is not None, f"{path}: unknown SDK type {type_name}"
    if not isinstance(value, dict):
        return [f"{path}: not an object ({type_name})"]
    fields = {json_name: attr for attr, json_name in model.attribute_map.items()}
    errors = []
    for key, item in value.items():
        if key not in fields:
            errors.append(f"{path}.{key}: not a field of {type_name}")
        else:
            errors.extend(_sdk_type_errors(item, model.openapi_types[fields[key]], f"{path}.{key}"))
    return errors


def test_kserve_objects_match_the_kserve_crd_models(rendered):
    types = {"InferenceService": "V1beta1InferenceService", "ServingRuntime": "V1alpha1ServingRuntime"}
    objects = rendered["kserve"]
    assert sorted(obj["kind"] for obj in objects) == sorted(types)
    for obj in objects:
        assert obj["apiVersion"] == {"InferenceService": "serving.kserve.io/v1beta1"}.get(
            obj["kind"], "serving.kserve.io/v1alpha1"
        )
        assert _sdk_type_errors(obj, types[obj["kind"]], obj["kind"]) == []
    # The check can fail: a misplaced field and a wrong type are reported.
    broken = copy.deepcopy(_by_kind(objects, "InferenceService"))
    broken["spec"]["predictor"]["protocolVersion"] = "v2"  # belongs under predictor.model
    broken["spec"]["predictor"]["minReplicas"] = "2"
    errors = _sdk_type_errors(broken, types["InferenceService"], "InferenceService")
    assert any("protocolVersion: not a field" in e for e in errors) and any("minReplicas" in e for e in errors)


def test_service_monitor_selects_the_service_and_its_port(rendered):
    objects = rendered["cpu"]
    monitor, service = _by_kind(objects, "ServiceMonitor"), _by_kind(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "metricRelabelings"}
        for relabel in endpoint.get("metricRelabelings", []):
            assert relabel["action"] in {"drop", "keep"} and relabel["sourceLabels"] == ["__name__"]
            re.compile(relabel["regex"])
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"]) and re.fullmatch(r"\d+s", endpoint["scrapeTimeout"])


# --------------------------------------------------------------------------- what the manifests promise


def test_deployment_probes_security_and_model_volume(rendered):
    objects = rendered["cpu"]
    deployment = _by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = _env(container)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's `app` user
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]  # read-only root: the service needs a writable /tmp
    model_mount = mounts[env["MODEL_DIR"]]
    assert model_mount["readOnly"] is True
    claim = volumes[model_mount["name"]]["persistentVolumeClaim"]["claimName"]
    pvc = _by_kind(objects, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # One worker per core of the limit, one torch thread each; Guaranteed QoS.
    resources = container["resources"]
    limits, requests_ = resources["limits"], resources["requests"]
    assert {k: requests_[k] for k in ("cpu", "memory")} == {k: limits[k] for k in ("cpu", "memory")}
    cores = _cpu_cores(resources["limits"]["cpu"])
    assert int(env["WORKERS"]) == cores and int(env["WORKERS"]) * int(env["TORCH_THREADS"]) <= cores
    # preStop sleep, then gunicorn's graceful shutdown, must both fit in the grace period.
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    graceful = int(env.get("GRACEFUL_TIMEOUT", Settings.graceful_timeout))
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + graceful
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys
    assert container["ports"][0]["containerPort"] == int(env.get("PORT", 8000))


def test_service_hpa_pdb_networkpolicy_and_ingress_fit_the_deployment(rendered):
    objects = rendered["cpu"]
    deployment = _by_kind(objects, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for kind, selector in (
        ("Service", lambda o: o["spec"]["selector"]),
        ("PodDisruptionBudget", lambda o: o["spec"]["selector"]["matchLabels"]),
        ("NetworkPolicy", lambda o: o["spec"]["podSelector"]["matchLabels"]),
    ):
        assert selector(_by_kind(objects, kind)).items() <= pod_labels.items(), kind
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    hpa = _by_kind(objects, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert _by_kind(objects, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    policy = _by_kind(objects, "NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and policy["spec"]["egress"] == []

    ingress = _by_kind(objects, "Ingress")
    prefix = "nginx.ingress.kubernetes.io/"
    annotations = {k.removeprefix(prefix): v for k, v in ingress["metadata"]["annotations"].items()}
    size = annotations["proxy-body-size"]
    assert size.endswith("m") and int(size[:-1]) * 1024 * 1024 == Settings.max_upload_bytes
    assert annotations["proxy-request-buffering"] == "on" and annotations["proxy-buffering"] == "on"
    # The worker answers (JSON) before the ingress gives up on it (HTML 504).
    assert int(annotations["proxy-read-timeout"]) == int(annotations["proxy-send-timeout"]) > Settings.timeout
    proxy_defaults = (REPO / "proxy" / "entrypoint.sh").read_text()
    assert f"PROXY_CONN_PER_IP:={annotations['limit-connections']}}}" in proxy_defaults
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = _by_kind(objects, "Service")
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    (controller,) = yaml.safe_load_all(LOOSE_MANIFESTS[0].read_text())
    assert controller["data"]["client-header-timeout"] == controller["data"]["client-body-timeout"] == "10"


def test_overlays_differ_only_in_what_cpu_and_gpu_need(rendered):
    cpu, gpu = _by_kind(rendered["cpu"], "Deployment"), _by_kind(rendered["gpu"], "Deployment")
    cpu_container = cpu["spec"]["template"]["spec"]["containers"][0]
    gpu_container = gpu["spec"]["template"]["spec"]["containers"][0]
    assert _env(cpu_container)["DEVICE"] == "cpu" and _env(gpu_container)["DEVICE"] == "cuda"
    assert gpu_container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in cpu_container["resources"]["limits"]
    assert cpu_container["image"].endswith("-cpu") and gpu_container["image"].endswith("-cuda")
    assert {k: v for k, v in _env(cpu_container).items() if k != "DEVICE"} == {
        k: v for k, v in _env(gpu_container).items() if k != "DEVICE"
    }


def test_kserve_predictor_speaks_v2_and_mounts_the_model_volume(rendered):
    runtime = _by_kind(rendered["kserve"], "ServingRuntime")
    service = _by_kind(rendered["kserve"], "InferenceService")
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    claim = _by_kind(rendered["cpu"], "PersistentVolumeClaim")["metadata"]["name"]
    assert model["storageUri"].rstrip("/") == f"pvc://{claim}"
    (container,) = runtime["spec"]["containers"]
    env = _env(container)
    assert env["MODEL_DIR"] == "/mnt/models"  # where KServe puts storageUri
    assert int(env["PORT"]) == container["ports"][0]["containerPort"] == 8080
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    tmp = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}["/tmp"]
    assert "emptyDir" in {v["name"]: v for v in runtime["spec"]["volumes"]}[tmp]
    assert service["metadata"]["name"] == read_card(REPO / "models")["name"]  # the v2 model name


def test_train_job_writes_the_model_volume_the_api_reads(rendered):
    job = _by_kind(rendered["train"], "Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    output = args[args.index("--output-dir") + 1]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert not mounts[output].get("readOnly", False)
    claim = volumes[mounts[output]["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == _by_kind(rendered["cpu"], "PersistentVolumeClaim")["metadata"]["name"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["fsGroup"] == 10001


def test_api_image_target_has_no_model_and_serve_adds_it():
    text = (REPO / "Dockerfile").read_text()
    stages = {name: body for name, body in re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", text, re.M | re.S)}
    assert "COPY models/" not in stages["api"]
    assert re.search(r"^FROM api AS serve$", text, re.M) and "COPY models/ models/" in stages["serve"]
    # serve stays the default target (the last stage), so `docker compose up` keeps its bundled model.
    assert re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)[-1] == "serve"


# --------------------------------------------------------------------------- security lint


def _checkov() -> str | None:
    local = REPO / ".venv" / "lint" / "bin" / "checkov"
    return str(local) if local.exists() else shutil.which("checkov")


def _run_checkov(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_checkov(), "--config-file", str(DEPLOY / "checkov.yaml"), *args], capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(_checkov() is None, reason="checkov is not installed (`make deploy-lint-tools` installs it)")
def test_checkov_finds_nothing_in_the_manifests_and_the_dockerfile(tmp_path):
    """Rendered manifests and the Dockerfile pass checkov; deploy/checkov.yaml lists the skipped checks and why."""
    clean, dirty = tmp_path / "clean", tmp_path / "dirty"
    clean.mkdir()
    dirty.mkdir()
    for name, objects in render_all().items():
        (clean / f"{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    for path in LOOSE_MANIFESTS:
        shutil.copy(path, clean / path.name)
    result = _run_checkov("--directory", str(clean))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    result = _run_checkov("--file", str(REPO / "Dockerfile"))
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]

    # The lint can fail: a writable root filesystem and a privilege escalation are reported.
    deployment = _by_kind(render(KUSTOMIZATIONS["cpu"]), "Deployment")
    security = deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    security.update(readOnlyRootFilesystem=False, allowPrivilegeEscalation=True)
    (dirty / "deployment.yaml").write_text(yaml.safe_dump(deployment))
    result = _run_checkov("--directory", str(dirty))
    assert result.returncode != 0 and "CKV_K8S_22" in result.stdout and "CKV_K8S_20" in result.stdout


def render_all() -> dict[str, list[dict]]:
    return {name: render(folder) for name, folder in KUSTOMIZATIONS.items()}


# --------------------------------------------------------------------------- podman kube play, for real
# The rendered manifests run as they are, but for what cannot exist on this machine, swapped below:
# the image (a local build, docker.io/library/NAME:TAG, imagePullPolicy Never: no registry here), the
# model volume (a hostPath to a copy of models/ instead of the PersistentVolumeClaim: no storage
# provisioner), the object name (k8s- prefix, so other users of the shared engine are never touched),
# one replica (podman publishes the containerPort on the host), and the Job, which podman 4.3 does not
# run, played as a Pod of the Job's own pod template.

from testing.containers import BUILD_TIMEOUT_S, ENGINE_PROBLEM  # noqa: E402
from testing.containers import copy_repository as _copy_repository  # noqa: E402
from testing.containers import torch_index_url as _torch_index_url  # noqa: E402
from testing.images import png as png_bytes  # noqa: E402
from testing.models import assert_serves_like_offline  # noqa: E402
from tests.test_container import SAMPLES  # noqa: E402

API_IMAGE = "docker.io/library/k8s-fashion-mnist-api:test"
TRAIN_IMAGE = "docker.io/library/k8s-fashion-mnist-train:test"
API_NAME = "k8s-fashion-mnist-api"
TRAIN_NAME = "k8s-fashion-mnist-train"


def _podman_problem() -> str | None:
    if ENGINE_PROBLEM is not None:
        return ENGINE_PROBLEM
    if shutil.which("podman") is None:
        return "no podman on PATH (the engine's `podman kube play` runs the manifests)"
    if os.geteuid() != 0:
        return "`podman kube play` with this engine needs root"
    info = subprocess.run(["podman", "info", "--format", "{{.Version.Version}}"], capture_output=True, text=True)
    return None if info.returncode == 0 else f"podman does not answer: {info.stderr.strip()[-300:]}"


PODMAN_PROBLEM = _podman_problem()
# Whichever test runs first builds both images (cold: several minutes), then plays, trains and waits.
PODMAN_TEST_TIMEOUT_S = BUILD_TIMEOUT_S + 900
needs_podman = pytest.mark.skipif(PODMAN_PROBLEM is not None, reason=f"no container engine: {PODMAN_PROBLEM}")


def _podman(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}: {result.stderr[-3000:]}")
    return result


def _local(pod_spec: dict, image: str, models: Path) -> None:
    """Swap what cannot exist here (see the comment above) in a pod spec, in place."""
    for container in pod_spec["containers"]:
        container["image"], container["imagePullPolicy"] = image, "Never"
    for volume in pod_spec["volumes"]:
        if "persistentVolumeClaim" in volume:
            del volume["persistentVolumeClaim"]
            volume["hostPath"] = {"path": str(models), "type": "Directory"}


def _pod_ip(pod: str) -> str:
    infra = _podman("pod", "inspect", pod, "--format", "{{.InfraContainerID}}").stdout.strip()
    ip = _podman("inspect", infra, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}").stdout
    assert ip.strip(), f"pod {pod} has no IP"
    return ip.strip()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    """The model-free api image and the train image, built from the files git knows (as a user's clone)."""
    root = tmp_path_factory.mktemp("k8s-repo-copy")
    _copy_repository(root)
    for target, tag in (("api", API_IMAGE), ("train", TRAIN_IMAGE)):
        result = subprocess.run(
            [
                *("docker", "build", "--target", target),
                *("--build-arg", f"TORCH_INDEX_URL={_torch_index_url()}"),
                *("-t", tag.removeprefix("docker.io/library/"), str(root)),
            ],
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"api": API_IMAGE, "train": TRAIN_IMAGE}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    """A copy of models/, owned by the pods' user so that the training pod can write it (fsGroup's job)."""
    folder = tmp_path_factory.mktemp("k8s-models")
    for name in ("model.json", "model.safetensors"):
        shutil.copy2(REPO / "models" / name, folder / name)
    for path in (folder, *folder.iterdir()):
        os.chown(path, 10001, 10001)
    return folder


@pytest.fixture(scope="module")
def api_pod(images, models, tmp_path_factory):
    deployment = copy.deepcopy(_by_kind(render(KUSTOMIZATIONS["cpu"]), "Deployment"))
    deployment["metadata"]["name"] = API_NAME
    deployment["spec"]["replicas"] = 1
    _local(deployment["spec"]["template"]["spec"], images["api"], models)
    manifest = tmp_path_factory.mktemp("k8s-play") / "deployment.yaml"
    manifest.write_text(yaml.safe_dump(deployment, sort_keys=False))
    _podman("kube", "down", str(manifest), check=False)
    pod, container = f"{API_NAME}-pod-0", f"{API_NAME}-pod-0-api"
    try:
        _podman("kube", "play", str(manifest), timeout=300)
        url = f"http://{_pod_ip(pod)}:8000"
        deadline, status = time.monotonic() + 180, None
        while status != 200 and time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                status = requests.get(f"{url}/readyz", timeout=2).status_code
            time.sleep(1)
        logs = _podman("logs", container, check=False)
        assert status == 200, f"/readyz {status} after 180 s:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        yield {"url": url, "pod": pod, "container": container, "deployment": deployment}
    finally:
        _podman("kube", "down", str(manifest), check=False)


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(PODMAN_TEST_TIMEOUT_S)
@needs_podman
def test_deployment_runs_in_podman_kube_play_and_predicts_like_the_offline_model(api_pod, models, test_set):
    assert_serves_like_offline(api_pod["url"], models, test_set.data[:SAMPLES])
    card = read_card(models)
    assert requests.get(f"{api_pod['url']}/metrics", timeout=10).status_code == 200
    v2 = requests.get(f"{api_pod['url']}/v2/models/{card['name']}/ready", timeout=10)
    assert v2.status_code == 200


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(PODMAN_TEST_TIMEOUT_S)
@needs_podman
def test_pod_has_the_manifests_security_context_and_limits(api_pod):
    container = api_pod["container"]
    config = json.loads(_podman("inspect", container).stdout)[0]
    assert config["HostConfig"]["ReadonlyRootfs"] is True
    spec = api_pod["deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert config["HostConfig"]["Memory"] == 1024**3 and spec["resources"]["limits"]["memory"] == "1Gi"
    quota, period = config["HostConfig"]["CpuQuota"], config["HostConfig"]["CpuPeriod"]
    assert quota / period == _cpu_cores(spec["resources"]["limits"]["cpu"])
    status = _podman("exec", container, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["Uid"].split()[0] == "10001"  # gunicorn itself
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2"  # filtering
    for path in ("/app/probe", "/mnt/models/probe"):
        result = _podman("exec", container, "touch", path, check=False)
        assert result.returncode != 0 and "Read-only file system" in result.stderr, (path, result.stderr)
    assert _podman("exec", container, "touch", "/tmp/probe", check=False).returncode == 0  # the emptyDir
    # The api image carries no model: Kubernetes mounts one at MODEL_DIR.
    listing = _podman("run", "--rm", "--entrypoint", "ls", API_IMAGE, "/app").stdout.split()
    # The project is installed as a wheel (site-packages); /app holds only gunicorn's config link.
    assert "models" not in listing and "gunicorn.conf.py" in listing


@pytest.mark.container
@pytest.mark.slow
@pytest.mark.timeout(PODMAN_TEST_TIMEOUT_S)
@needs_podman
def test_training_job_pod_writes_a_model_that_the_running_pod_hot_reloads(api_pod, images, models, tmp_path, test_set):
    before = read_card(models)
    job = _by_kind(render(KUSTOMIZATIONS["train"]), "Job")
    template = copy.deepcopy(job["spec"]["template"])
    spec = template["spec"]
    _local(spec, images["train"], models)
    # One epoch instead of the default recipe's 120, so the test takes a minute; everything else is the Job's.
    args = spec["containers"][0]["args"]
    assert "--epochs" not in args
    args += ["--epochs", "1"]
    # podman 4.3 keeps an emptyDir as a named volume: a name of its own keeps it from the api pod's /tmp.
    for volume in spec["volumes"]:
        if volume["name"] == "tmp":
            volume["name"] = "train-tmp"
    spec["containers"][0]["volumeMounts"] = [
        {**m, "name": "train-tmp"} if m["name"] == "tmp" else m for m in spec["containers"][0]["volumeMounts"]
    ]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": TRAIN_NAME}, "spec": spec}
    manifest = tmp_path / "train-pod.yaml"
    manifest.write_text(yaml.safe_dump(pod, sort_keys=False))
    container = f"{TRAIN_NAME}-train"
    _podman("kube", "down", str(manifest), check=False)
    try:
        _podman("kube", "play", str(manifest), timeout=300)
        deadline, state = time.monotonic() + 900, {}
        while time.monotonic() < deadline:
            state = json.loads(_podman("inspect", container).stdout)[0]["State"]
            if state["Status"] == "exited":
                break
            time.sleep(3)
        logs = _podman("logs", container, check=False)
        output = logs.stdout[-3000:] + logs.stderr[-3000:]
        assert state.get("ExitCode") == 0, f"train pod {state.get('Status')}:\n{output}"
    finally:
        _podman("kube", "down", str(manifest), check=False)
    card = read_card(models)
    assert card["weights"]["sha256"] != before["weights"]["sha256"] and card["training"]["epochs"] == 1

    # The running api pod swaps to the new model by itself; both workers must get there.
    png = png_bytes(test_set.data[0].numpy())
    deadline, streak = time.monotonic() + 60, 0
    while streak < 6:
        assert time.monotonic() < deadline, "the pod still serves the old model 60 s after the training pod"
        answer = requests.post(
            f"{api_pod['url']}/predict", data=png, headers={"Content-Type": "image/png"}, timeout=30
        ).json()
        streak = streak + 1 if answer["model"]["sha256"] == card["weights"]["sha256"] else 0
        time.sleep(0.2)
