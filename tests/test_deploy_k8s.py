"""deploy/k8s validates: every core object against the official Kubernetes JSON schemas (the kubernetes-validate
package bundles them; strict: unknown fields are errors), the RayCluster against KubeRay's v1 fields, the pod
templates inside it as Kubernetes PodTemplates, and the wiring between the objects (the replica list and the
StatefulSet, volumes and claims, Services and pods, the Ray address and the cluster, Prometheus annotations).
Each kind of breakage is shown to fail."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"  # the oldest minor still supported by the major clouds when written; every field used is older

# KubeRay's RayCluster CRD (ray.io/v1) is not on PyPI. This is the minimal structural schema of the fields these
# manifests use, written from the v1 CRD (ray-operator/config/crd/bases/ray.io_rayclusters.yaml): the types it
# declares and the fields it requires. Where KubeRay releases differ (rayStartParams and min/maxReplicas became
# optional in v1.1+), the stricter older requirement is kept, so a manifest passing here passes every v1 release.
# Pod templates are checked separately, as Kubernetes PodTemplates.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}}}
RAYCLUSTER_V1_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1}}},
        "spec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {"type": "object"},
                "suspend": {"type": "boolean"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["rayStartParams", "template"],
                    "additionalProperties": False,
                    "properties": {"rayStartParams": _STRING_MAP, "template": _TEMPLATE, "serviceType": {"type": "string"},
                                   "enableIngress": {"type": "boolean"}},
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "maxReplicas", "minReplicas", "rayStartParams", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "groupName": {"type": "string", "minLength": 1},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "numOfHosts": {"type": "integer", "minimum": 1},
                            "suspend": {"type": "boolean"},
                            "rayStartParams": _STRING_MAP,
                            "template": _TEMPLATE,
                        },
                    },
                },
            },
        },
    },
}


def load_manifests(folder: Path = K8S) -> list[tuple[str, dict]]:
    """(file name, object) for every object of every manifest listed by the kustomization."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    objects = []
    for name in kustomization["resources"]:
        objects += [(name, doc) for doc in yaml.safe_load_all((folder / name).read_text()) if doc is not None]
    return objects


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """(where, pod template) of a workload or a RayCluster."""
    spec = obj.get("spec", {})
    if obj["kind"] == "RayCluster":
        found = [("headGroupSpec", spec.get("headGroupSpec", {}).get("template"))]
        found += [(f"workerGroupSpecs[{g.get('groupName')}]", g.get("template")) for g in spec.get("workerGroupSpecs", [])]
        return [(where, t) for where, t in found if t is not None]
    return [("template", spec["template"])] if "template" in spec else []


def schema_errors(objects: list[tuple[str, dict]]) -> list[str]:
    """Schema violations: core objects (strict Kubernetes schemas), the RayCluster (KubeRay v1 fields) and the
    pod templates inside it (as Kubernetes PodTemplates)."""
    errors = []

    def core(where: str, obj: dict) -> None:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{where}: {'.'.join(map(str, error.path))}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{where}: no Kubernetes schema for it: {error.message}")

    for name, obj in objects:
        where = f"{name} {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("kind") == "RayCluster":
            validator = jsonschema.Draft202012Validator(RAYCLUSTER_V1_SCHEMA)
            errors += [f"{where}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
            for part, template in pod_templates(obj):
                core(f"{where} {part}", {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                                         "template": template})
        else:
            core(where, obj)
    return errors


def wiring_errors(objects: list[tuple[str, dict]]) -> list[str]:
    """What the schemas cannot see: references between the objects."""
    errors = []
    by_kind: dict[str, dict[str, dict]] = {}
    for _, obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj
    config = by_kind.get("ConfigMap", {}).get("safekeel-config", {}).get("data", {})
    replicas = by_kind.get("StatefulSet", {}).get("safekeel-replica")
    service = by_kind.get("Service", {}).get("safekeel-replica")
    if replicas is None or service is None:
        return ["the serving replicas' StatefulSet and headless Service (safekeel-replica) are missing"]
    port = service["spec"]["ports"][0]["port"]
    expected = [f"http://{replicas['metadata']['name']}-{i}.{replicas['spec']['serviceName']}:{port}"
                for i in range(replicas["spec"]["replicas"])]
    listed = [url.strip() for url in config.get("SAFEKEEL_REPLICAS", "").split(",") if url.strip()]
    if listed != expected:
        errors.append(f"SAFEKEEL_REPLICAS lists {listed}, the StatefulSet and its Service give {expected}")
    if service["spec"].get("clusterIP") != "None" or replicas["spec"]["serviceName"] != service["metadata"]["name"]:
        errors.append("the replicas' Service must be the StatefulSet's headless Service (clusterIP: None)")
    clusters = by_kind.get("RayCluster", {})
    if config.get("SAFEKEEL_RAY_ADDRESS", "").split(":")[0] not in {f"{name}-head-svc" for name in clusters}:
        errors.append(f"SAFEKEEL_RAY_ADDRESS {config.get('SAFEKEEL_RAY_ADDRESS')!r} is not a RayCluster's head Service "
                      f"({', '.join(f'{n}-head-svc' for n in clusters)})")
    claims = set(by_kind.get("PersistentVolumeClaim", {}))
    for _, obj in objects:
        for where, template in pod_templates(obj):
            name = f"{obj['kind']}/{obj['metadata']['name']} {where}"
            for volume in template["spec"].get("volumes", []):
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                if claim is not None and claim not in claims:
                    errors.append(f"{name}: volume {volume['name']} claims {claim!r}, which no manifest defines")
            for container in template["spec"]["containers"]:
                for source in container.get("envFrom", []):
                    ref = source.get("configMapRef", {}).get("name")
                    if ref is not None and ref not in by_kind.get("ConfigMap", {}):
                        errors.append(f"{name}: container {container['name']} reads ConfigMap {ref!r}, which no manifest defines")
            if obj["kind"] in ("Deployment", "StatefulSet"):
                annotations = template.get("metadata", {}).get("annotations", {})
                ports = {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
                if annotations.get("prometheus.io/scrape") != "true" or int(annotations.get("prometheus.io/port", 0)) not in ports:
                    errors.append(f"{name}: no Prometheus scrape annotations for one of its container ports")
    for svc in by_kind.get("Service", {}).values():
        selector = svc["spec"].get("selector", {})
        if not any(selector.items() <= t.get("metadata", {}).get("labels", {}).items()
                   for _, obj in objects for _, t in pod_templates(obj)):
            errors.append(f"Service/{svc['metadata']['name']} selects no pod template ({selector})")
    return errors


def test_the_manifests_validate():
    objects = load_manifests()
    kinds = sorted(obj["kind"] for _, obj in objects)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "PersistentVolumeClaim", "RayCluster",
                     "Service", "Service", "StatefulSet"]
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}  # nothing left out of `apply -k`
    assert schema_errors(objects) == []
    assert wiring_errors(objects) == []


def _find(objects, kind: str, name: str | None = None) -> dict:
    return next(obj for _, obj in objects if obj["kind"] == kind and (name is None or obj["metadata"]["name"] == name))


def _broken(change) -> list[tuple[str, dict]]:
    objects = copy.deepcopy(load_manifests())
    change(objects)
    return objects


@pytest.mark.parametrize("change, expected", [
    (lambda o: _find(o, "Deployment")["spec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a required property"),
    (lambda o: _find(o, "StatefulSet")["spec"].__setitem__("replicas", "two"), "replicas: 'two' is not of type 'integer'"),
    (lambda o: _find(o, "Deployment")["spec"]["template"]["spec"].__setitem__("contaners", []), "contaners"),
    (lambda o: _find(o, "PersistentVolumeClaim", "safekeel-db")["spec"].__setitem__("accessModes", "ReadWriteOnce"), "accessModes"),
    (lambda o: _find(o, "RayCluster")["spec"].pop("headGroupSpec"), "'headGroupSpec' is a required property"),
    (lambda o: _find(o, "RayCluster")["spec"]["workerGroupSpecs"][0].__setitem__("maxReplicas", "20"), "'20' is not of type 'integer'"),
    (lambda o: _find(o, "RayCluster")["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0), "0 is not of type 'string'"),
    (lambda o: _find(o, "RayCluster")["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("name"),
     "workerGroupSpecs[gpu]"),
])
def test_a_broken_manifest_fails_the_schema_check(change, expected):
    errors = schema_errors(_broken(change))
    assert errors and any(expected in e for e in errors), errors


@pytest.mark.parametrize("change, expected", [
    (lambda o: _find(o, "StatefulSet")["spec"].__setitem__("replicas", 3), "SAFEKEEL_REPLICAS lists"),
    (lambda o: _find(o, "ConfigMap")["data"].__setitem__("SAFEKEEL_RAY_ADDRESS", "ray-head:6379"), "not a RayCluster's head Service"),
    (lambda o: _find(o, "Deployment")["spec"]["template"]["spec"]["volumes"][1]["persistentVolumeClaim"].__setitem__("claimName", "db"),
     "which no manifest defines"),
    (lambda o: _find(o, "StatefulSet")["spec"]["template"]["metadata"].pop("annotations"), "no Prometheus scrape annotations"),
    (lambda o: _find(o, "Service", "safekeel-api")["spec"]["selector"].__setitem__("app.kubernetes.io/component", "apl"),
     "selects no pod template"),
])
def test_broken_wiring_fails_the_check(change, expected):
    objects = _broken(change)
    assert schema_errors(objects) == []  # each is valid alone
    errors = wiring_errors(objects)
    assert errors and any(expected in e for e in errors), errors
