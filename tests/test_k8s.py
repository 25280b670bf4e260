"""config/k8s/ stays valid for Kubernetes 1.30 and consistent with the server it deploys.

Offline: kubernetes-validate ships the OpenAPI-derived JSON schemas of each Kubernetes
release (strict variants reject unknown fields), so no cluster or network is needed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from pydantic import AliasChoices

from embedserve.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "config" / "k8s"
K8S_VERSION = "1.30.0"
MANIFESTS = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")

Doc = dict[str, Any]


def load(name: str) -> list[Doc]:
    """Every YAML document in one manifest file."""
    return [doc for doc in yaml.safe_load_all((K8S_DIR / name).read_text()) if doc]


def only(name: str, kind: str) -> Doc:
    docs = [doc for doc in load(name) if doc["kind"] == kind]
    assert len(docs) == 1, f"{name}: expected one {kind}"
    return docs[0]


def deployment() -> Doc:
    return only("deployment.yaml", "Deployment")


def job() -> Doc:
    return only("job-ingest-sidecar.yaml", "Job")


def container(pod_spec: Doc, name: str, *, init: bool = False) -> Doc:
    key = "initContainers" if init else "containers"
    matches = [c for c in pod_spec.get(key, []) if c["name"] == name]
    assert len(matches) == 1, f"no {key[:-1]} named {name}"
    return matches[0]


def env(c: Doc) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def cpu_cores(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def port_number(c: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(p["containerPort"] for p in c["ports"] if p["name"] == port)


def probe_path(c: Doc, kind: str) -> str:
    probe = c.get(kind)
    assert probe is not None, f"{c['name']}: no {kind}"
    return str(probe["httpGet"]["path"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- schema validation ---------------------------------------------------------------------
def test_the_manifests_exist() -> None:
    names = {p.name for p in MANIFESTS}
    expected = {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"}
    assert expected | {"job-ingest-sidecar.yaml"} <= names


def test_schemas_for_the_target_version_are_bundled() -> None:
    assert K8S_VERSION in all_versions()


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid_for_kubernetes_1_30(path: Path) -> None:
    docs = load(path.name)
    assert docs
    for doc in docs:
        used = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert used == "1.30", f"{path.name}: validated against {used}"


def test_strict_validation_rejects_a_misspelt_field() -> None:
    doc = copy.deepcopy(deployment())
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_the_long_running_resources() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert all((K8S_DIR / name).is_file() for name in listed)
    assert listed == {p.name for p in MANIFESTS} - {"job-ingest-sidecar.yaml"}


# -- the Deployment ------------------------------------------------------------------------
def test_deployment_probes_use_ready_and_health() -> None:
    c = container(deployment()["spec"]["template"]["spec"], "embedserve")
    assert probe_path(c, "readinessProbe") == "/ready"
    assert probe_path(c, "livenessProbe") == "/health"
    startup = c["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 60  # model warm-up
    for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert port_number(c, c[kind]["httpGet"]["port"]) == int(env(c)["PORT"])


def test_grace_period_covers_prestop_and_drain() -> None:
    """SHUTDOWN_GRACE_S bounds the whole stop (one deadline, tests/test_server.py), so
    preStop + SHUTDOWN_GRACE_S is the pod's worst case, before releasing the models."""
    pod = deployment()["spec"]["template"]["spec"]
    c = container(pod, "embedserve")
    drain_s = float(env(c)["SHUTDOWN_GRACE_S"])
    pre_stop_s = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 0 < pre_stop_s <= 10
    assert pod["terminationGracePeriodSeconds"] > pre_stop_s + drain_s


def test_liveness_outlasts_the_drain() -> None:
    pod = deployment()["spec"]["template"]["spec"]
    liveness = container(pod, "embedserve")["livenessProbe"]
    window_s = liveness["failureThreshold"] * liveness["periodSeconds"]
    assert window_s > pod["terminationGracePeriodSeconds"]


def test_resources_and_ort_threads_match() -> None:
    c = container(deployment()["spec"]["template"]["spec"], "embedserve")
    requests, limits = c["resources"]["requests"], c["resources"]["limits"]
    assert {"cpu", "memory"} <= requests.keys() and {"cpu", "memory"} <= limits.keys()
    assert int(env(c)["ORT_THREADS"]) == cpu_cores(limits["cpu"])


@pytest.mark.parametrize("manifest", ["deployment.yaml", "job-ingest-sidecar.yaml"])
def test_embedserve_env_names_real_settings_with_valid_values(manifest: str) -> None:
    doc = deployment() if manifest == "deployment.yaml" else job()
    pod = doc["spec"]["template"]["spec"]
    c = container(pod, "embedserve", init=manifest != "deployment.yaml")
    known = set()
    for field in Settings.model_fields.values():
        assert isinstance(field.validation_alias, AliasChoices)
        known.update(str(name) for name in field.validation_alias.choices)
    names = {e["name"] for e in c.get("env", [])}
    assert names <= known, f"not settings: {names - known}"
    Settings.build(**env(c))


@pytest.mark.parametrize("manifest", ["deployment.yaml", "job-ingest-sidecar.yaml"])
def test_pods_run_locked_down(manifest: str) -> None:
    doc = deployment() if manifest == "deployment.yaml" else job()
    pod = doc["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    writable = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    for c in pod.get("initContainers", []) + pod["containers"]:
        security = c["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, c["name"]
        assert security["allowPrivilegeEscalation"] is False, c["name"]
        assert security["capabilities"]["drop"] == ["ALL"], c["name"]
        assert {"cpu", "memory"} <= c["resources"]["limits"].keys(), c["name"]
        if c["image"].startswith("embedserve:"):
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert mounts.get("/models/.cache") in writable, c["name"]


def test_prometheus_annotations_point_at_the_server() -> None:
    template = deployment()["spec"]["template"]
    annotations = template["metadata"]["annotations"]
    c = container(template["spec"], "embedserve")
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port_number(c, "http")


# -- Service, HPA, PDB ---------------------------------------------------------------------
def test_service_selects_the_pods_and_targets_the_http_port() -> None:
    template = deployment()["spec"]["template"]
    service = only("service.yaml", "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert selects(service["spec"]["selector"], template["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port["port"] == 8000
    assert port_number(container(template["spec"], "embedserve"), port["targetPort"]) == 8000


def test_deployment_selector_matches_its_pods() -> None:
    spec = deployment()["spec"]
    assert selects(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"])


def test_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = only("hpa.yaml", "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == deployment()["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2  # so the PDB lets a node drain proceed
    cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu and cpu[0]["resource"]["name"] == "cpu"


def test_hpa_queue_depth_example_names_a_real_metric() -> None:
    assert "embedserve_queue_depth" in (K8S_DIR / "hpa.yaml").read_text()
    assert (
        '"embedserve_queue_depth"' in (ROOT / "embedserve" / "http" / "prometheus.py").read_text()
    )


def test_pdb_selects_the_deployment_pods_only() -> None:
    pdb = only("pdb.yaml", "PodDisruptionBudget")
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selects(selector, deployment()["spec"]["template"]["metadata"]["labels"])
    assert not selects(selector, job()["spec"]["template"]["metadata"]["labels"])
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1


# -- the Job with embedserve as a native sidecar ---------------------------------------------
def test_job_runs_embedserve_as_a_native_sidecar() -> None:
    pod = job()["spec"]["template"]["spec"]
    sidecar = container(pod, "embedserve", init=True)
    assert sidecar["restartPolicy"] == "Always"
    assert probe_path(sidecar, "startupProbe") == "/ready"
    assert probe_path(sidecar, "readinessProbe") == "/ready"
    assert pod["restartPolicy"] in {"Never", "OnFailure"}
    assert pod["terminationGracePeriodSeconds"] > float(env(sidecar)["SHUTDOWN_GRACE_S"])
    assert all("restartPolicy" not in c for c in pod["containers"])


def test_job_ingestion_talks_to_the_sidecar_on_loopback() -> None:
    pod = job()["spec"]["template"]["spec"]
    sidecar = container(pod, "embedserve", init=True)
    ingest = container(pod, "ingest")
    argv = ingest["command"] + ingest.get("args", [])
    assert argv[:3] == ["python", "-m", "examples.ingest"]
    assert (ROOT / "examples" / "ingest.py").is_file()
    url = argv[argv.index("--server") + 1]
    assert url == f"http://127.0.0.1:{port_number(sidecar, 'http')}"
    assert "--ready-timeout-s" in argv  # the example waits for /ready itself
