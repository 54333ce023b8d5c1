"""deploy/k8s: rendered like kustomize, validated offline against the Kubernetes schemas, and checked
against what nmt-serve really reads (server.config's flags and defaults) and what the image sets.

The renderer below covers what these kustomizations use (resources, components, strategic-merge
patches by kind and name, images) and refuses any other kustomization key; where kubectl is
installed, its `kubectl kustomize` output must equal ours.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from nmt.server.config import FLAGS, ServerConfig, env_var, from_args
from nmt.server.transport import SERVICE

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
ENTRY_POINTS = {
    "default": K8S,
    "gpu": K8S / "overlays" / "gpu",
    "prometheus-operator": K8S / "overlays" / "prometheus-operator",
    "model-volume": K8S / "overlays" / "model-volume",
}
# Native gRPC probes are GA from 1.27; the newest schemas kubernetes-validate ships come second.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
CRD_GROUPS = ("monitoring.coreos.com",)
# bytes: bench/results/load.md's "server peak RSS (VmHWM)" with one model, plus one more loaded model
# (bench/results/fairness.md, "per loaded model"): the image serves two.
MEASURED_PEAK_RSS = 276e6 + 39e6
FLAG_ENV = {env_var(name) for _, name, _, _ in FLAGS}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ServerConfig)}

# ---- a small kustomize ----
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "components", "images", "patches"}
MERGE_KEYS = {
    "containers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}  # strategic merge keys of the lists the patches touch; others are replaced


def merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            out[key] = merge(base[key], value, key) if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key, out = MERGE_KEYS[field], list(base)
        for item in patch:
            index = next((i for i, old in enumerate(out) if old[key] == item[key]), None)
            if index is None:
                out.append(copy.deepcopy(item))
            else:
                out[index] = merge(out[index], item)
        return out
    return copy.deepcopy(patch)


def containers(resource: dict) -> list[dict]:
    return resource.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])


def ident(resource: dict) -> tuple[str, str, str]:
    return resource["apiVersion"], resource["kind"], resource["metadata"]["name"]


def read_docs(path: Path) -> list[dict]:
    assert path.is_file(), f"{path} is listed but does not exist"
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomize(directory: Path) -> list[dict]:
    spec = read_docs(directory / "kustomization.yaml")[0]
    assert set(spec) <= KUSTOMIZATION_KEYS, f"{directory}: this renderer cannot apply {set(spec) - KUSTOMIZATION_KEYS}"
    out: list[dict] = []
    for entry in spec.get("resources", []) + spec.get("components", []):
        path = directory / entry
        out += kustomize(path) if path.is_dir() else read_docs(path)
    for patch_entry in spec.get("patches", []):
        assert set(patch_entry) == {"path"}, f"only file patches are supported: {patch_entry}"
        for patch in read_docs(directory / patch_entry["path"]):
            matches = [i for i, r in enumerate(out) if ident(r) == ident(patch)]
            assert len(matches) == 1, f"patch {ident(patch)} matches {len(matches)} resources"
            out[matches[0]] = merge(out[matches[0]], patch)
    for image in spec.get("images", []):
        for resource in out:
            for container in containers(resource):
                if re.split(r"[:@]", container["image"])[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    idents = [ident(r) for r in out]
    assert len(idents) == len(set(idents)), f"duplicate resources in {directory}"
    return out


@pytest.fixture(scope="module", params=sorted(ENTRY_POINTS))
def rendered(request: pytest.FixtureRequest) -> tuple[str, dict[str, dict]]:
    return request.param, {r["kind"]: r for r in kustomize(ENTRY_POINTS[request.param])}


def pod_spec(resources: dict[str, dict]) -> dict:
    return resources["Deployment"]["spec"]["template"]["spec"]


def server_container(resources: dict[str, dict]) -> dict:
    (container,) = pod_spec(resources)["containers"]
    return container


# ---- what the image sets (Dockerfile) ----
def dockerfile_env() -> dict[str, str]:
    """The image's NMT_* variables, ${ARG}s resolved to their defaults (DEVICE=cpu: the CPU image)."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    lines = [line for line in text.splitlines() if line.startswith("ENV ")]
    env = dict(re.findall(r"(NMT_\w+)=(\S+)", " ".join(lines)))
    return {name: re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], value) for name, value in env.items()}


def dockerfile_directive(name: str) -> list[str]:
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith(name + " ")]
    return line.split()[1:]


def quantity(value: str | int) -> float:
    """A Kubernetes quantity (cpu or memory) as a number: cores or bytes."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return float(number) * units.get(unit, 1)


def container_env(container: dict) -> dict[str, str]:
    """The environment nmt-serve sees: the image's ENV, overridden by the manifest's (as the kubelet
    does), with resourceFieldRef resolved the way the kubelet resolves it (limits rounded up)."""
    env = dockerfile_env()
    for item in container["env"]:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["resourceFieldRef"]
            assert ref["containerName"] == container["name"], ref
            kind, resource = ref["resource"].split(".")
            env[item["name"]] = str(math.ceil(quantity(container["resources"][kind][resource])))
    return env


def test_every_kustomization_renders_the_service(rendered: tuple[str, dict[str, dict]]) -> None:
    name, resources = rendered
    expected = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    if name == "prometheus-operator":
        expected.add("ServiceMonitor")
    if name == "model-volume":
        expected.add("PersistentVolumeClaim")
    assert set(resources) == expected
    image = server_container(resources)["image"]
    assert image == ("nmt:cuda" if name == "gpu" else "nmt:cpu")


def test_every_yaml_file_is_used() -> None:
    listed = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = read_docs(kustomization)[0]
        listed |= {(kustomization.parent / p).resolve() for p in spec.get("resources", [])}
        listed |= {(kustomization.parent / p["path"]).resolve() for p in spec.get("patches", [])}
    stray = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"} - listed
    assert not stray, f"not in any kustomization: {sorted(map(str, stray))}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schemas(rendered: tuple[str, dict[str, dict]], version: str) -> None:
    for resource in rendered[1].values():
        if resource["apiVersion"].split("/")[0] in CRD_GROUPS:
            continue  # no schema in kubernetes-validate: test_service_monitor checks it
        kubernetes_validate.validate(resource, version, strict=True)  # strict: unknown fields fail


def test_schema_validation_catches_a_misspelt_field() -> None:
    deployment = copy.deepcopy({r["kind"]: r for r in kustomize(K8S)}["Deployment"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def test_env_names_are_nmt_serve_flags_and_parse(rendered: tuple[str, dict[str, dict]]) -> None:
    name, resources = rendered
    container = server_container(resources)
    names = [item["name"] for item in container["env"]] + list(dockerfile_env())
    assert set(names) <= FLAG_ENV, f"not read by nmt-serve: {sorted(set(names) - FLAG_ENV)}"
    cfg = from_args([], env=container_env(container))  # exits (SystemExit) on a value nmt-serve refuses
    assert cfg.device == ("cuda" if name == "gpu" else "cpu")
    assert cfg.threads == math.ceil(quantity(container["resources"]["limits"]["cpu"]))


def test_ports_and_probes_match_the_server(rendered: tuple[str, dict[str, dict]]) -> None:
    resources = rendered[1]
    container = server_container(resources)
    cfg = from_args([], env=container_env(container))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # The defaults, so `nmt-serve` without flags, the image (EXPOSE) and the manifests agree.
    assert ports == {"grpc": cfg.port, "metrics": cfg.metrics_port}
    assert (cfg.port, cfg.metrics_port) == (DEFAULTS["port"], DEFAULTS["metrics_port"])
    assert sorted(map(int, dockerfile_directive("EXPOSE"))) == sorted(ports.values())
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        grpc_probe = container[probe]["grpc"]
        assert grpc_probe["port"] == cfg.port, probe
        assert grpc_probe.get("service", "") in ("", SERVICE), probe  # the names main.py sets SERVING
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE
    service = resources["Service"]["spec"]
    assert {p["name"]: (p["targetPort"], p["port"]) for p in service["ports"]} == {
        "grpc": ("grpc", cfg.port),
        "metrics": ("metrics", cfg.metrics_port),
    }
    assert {p["name"]: p["appProtocol"] for p in service["ports"]} == {"grpc": "grpc", "metrics": "http"}
    annotations = resources["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == cfg.metrics_port


def test_termination_outlasts_the_drain(rendered: tuple[str, dict[str, dict]]) -> None:
    resources = rendered[1]
    container = server_container(resources)
    cfg = from_args([], env=container_env(container))
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod_spec(resources)["terminationGracePeriodSeconds"] > float(command[1]) + cfg.grace_seconds


def test_pod_is_locked_down(rendered: tuple[str, dict[str, dict]]) -> None:
    resources = rendered[1]
    spec, container = pod_spec(resources), server_container(resources)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert str(spec["securityContext"]["runAsUser"]) == dockerfile_directive("USER")[0] == "10001"
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/tmp" in mounts
    for mount in mounts.values():  # scratch space, or the model repository read-only
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume or (mount.get("readOnly") and volume["persistentVolumeClaim"]["readOnly"])


def test_the_model_volume_is_the_served_repository() -> None:
    resources = {r["kind"]: r for r in kustomize(ENTRY_POINTS["model-volume"])}
    container = server_container(resources)
    cfg = from_args([], env=container_env(container))
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    claim = next(v for v in pod_spec(resources)["volumes"] if v["name"] == "models")["persistentVolumeClaim"]
    assert (cfg.model_repository, cfg.model_dir) == (mount["mountPath"], None)
    assert cfg.repository_poll_seconds > 0 and cfg.default_model
    assert claim["claimName"] == resources["PersistentVolumeClaim"]["metadata"]["name"]


def test_service_links_are_off(rendered: tuple[str, dict[str, dict]]) -> None:
    # The kubelet would set <SERVICE>_PORT=tcp://ip:port for every Service in the namespace; for
    # the Service `nmt` that is NMT_PORT, which nmt-serve would read as its --port.
    prefix = rendered[1]["Service"]["metadata"]["name"].upper().replace("-", "_")
    assert f"{prefix}_PORT" in FLAG_ENV
    assert pod_spec(rendered[1])["enableServiceLinks"] is False


def test_resources_cover_the_measured_memory(rendered: tuple[str, dict[str, dict]]) -> None:
    name, resources = rendered
    requests, limits = (server_container(resources)["resources"][k] for k in ("requests", "limits"))
    assert MEASURED_PEAK_RSS < quantity(requests["memory"]) <= quantity(limits["memory"])
    assert quantity(requests["cpu"]) <= quantity(limits["cpu"])
    assert limits.get("nvidia.com/gpu") == (1 if name == "gpu" else None)


def test_selectors_and_autoscaling_point_at_the_pods(rendered: tuple[str, dict[str, dict]]) -> None:
    resources = rendered[1]
    deployment = resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"]  # the HorizontalPodAutoscaler owns it
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        resources["Service"]["spec"]["selector"],
        resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= pod_labels.items()
    hpa = resources["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    # Keeping one pod serving through a voluntary disruption needs more pods than the budget removes.
    assert hpa["minReplicas"] > resources["PodDisruptionBudget"]["spec"]["maxUnavailable"]


def test_service_monitor() -> None:
    resources = {r["kind"]: r for r in kustomize(ENTRY_POINTS["prometheus-operator"])}
    monitor, service = resources["ServiceMonitor"], resources["Service"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in port_names and endpoint["port"] == "metrics"
        assert endpoint["path"] == "/metrics"
        assert re.fullmatch(r"[0-9]+(ms|s|m)", endpoint["interval"])
    # The Operator names the job after the Service: deploy/prometheus's rules select job="nmt".
    assert service["metadata"]["name"] == "nmt"


def canonical(value: Any, field: str = "") -> Any:
    """Order-free form: mappings by key, keyed lists by their merge key (kustomize may reorder them)."""
    if isinstance(value, dict):
        return {k: canonical(v, k) for k, v in value.items()}
    if isinstance(value, list):
        items = [canonical(v) for v in value]
        return sorted(items, key=lambda v: str(v.get(MERGE_KEYS[field]))) if field in MERGE_KEYS else items
    return value


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_renderer_agrees_with_kubectl_kustomize(entry: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(ENTRY_POINTS[entry])], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    theirs = sorted((canonical(r) for r in yaml.safe_load_all(out) if r), key=ident)
    ours = sorted((canonical(r) for r in kustomize(ENTRY_POINTS[entry])), key=ident)
    assert ours == theirs
