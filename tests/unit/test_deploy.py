"""The Kubernetes and KServe manifests: valid against the Kubernetes API's own schemas (kubernetes-validate,
offline, strict: an unknown or misspelt field fails) and true to the service they deploy (settings, routes,
port, user, drain timing, metric names)."""
import re
from pathlib import Path

import pytest
import yaml

from photoz.service.settings import Settings

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
K8S, KSERVE = ROOT / "deploy" / "k8s", ROOT / "deploy" / "kserve"


def manifests(folder: Path) -> dict[str, dict]:
    """kind -> the one manifest of that kind in ``folder`` (Kustomization included)."""
    found = {}
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"two {doc['kind']} manifests"
            found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def k8s():
    return manifests(K8S)


def validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_every_manifest_validates_against_the_kubernetes_schemas(k8s):
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
            "Secret"} <= k8s.keys()
    for kind, doc in k8s.items():
        if kind != "Kustomization":
            validate(doc)
    broken = yaml.safe_load((K8S / "deployment.yaml").read_text())
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # the check can fail
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_kustomization_applies_everything_but_the_secret_template(k8s):
    listed = set(k8s["Kustomization"]["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.yaml"}  # `kubectl apply -k` never overwrites real keys


def _container(k8s):
    return k8s["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def test_the_deployment_is_true_to_the_service_it_runs(k8s):
    from photoz.service.app import create_app
    from photoz.service.server import ANSWER_GRACE_S

    deployment, container = k8s["Deployment"], _container(k8s)
    pod = deployment["spec"]["template"]["spec"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    port = int(re.search(r"^EXPOSE (\d+)", dockerfile, re.M).group(1))
    assert container["ports"][0]["containerPort"] == port and "--port" in container["args"]
    assert pod["securityContext"]["runAsUser"] == int(re.search(r"^USER (\d+)", dockerfile, re.M).group(1))
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # multipart spools there
    routes = {r.path for r in create_app(Settings(warmup=False)).routes}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"]["path"] == path and path in routes
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # the grace period covers the preStop pause, the drain and the 503s of work cut off at its deadline
    config = k8s["ConfigMap"]["data"]
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(config["PHOTOZ_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + ANSWER_GRACE_S
    # the Service, the PDB and the HPA find these pods
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert k8s["Service"]["spec"]["selector"].items() <= labels.items()
    assert k8s["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert k8s["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    secret_ref = next(e for e in container["env"] if e["name"] == "PHOTOZ_API_KEYS")["valueFrom"]["secretKeyRef"]
    assert secret_ref["name"] == k8s["Secret"]["metadata"]["name"] and secret_ref["key"] in k8s["Secret"]["stringData"]


def test_configmap_settings_are_real_settings_and_refuse_to_serve_without_keys(k8s):
    config = k8s["ConfigMap"]["data"]
    known = {f"PHOTOZ_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= known, set(config) - known
    settings = Settings.from_env({**config, "PHOTOZ_API_KEYS": "k1,k2"})
    assert settings.max_batch_size == int(config["PHOTOZ_MAX_BATCH_SIZE"]) and settings.require_api_keys
    with pytest.raises(ValueError, match="no API key"):  # the Secret template left empty
        Settings.from_env({**config, "PHOTOZ_API_KEYS": k8s["Secret"]["stringData"]["api-keys"]})


def test_the_autoscaling_metric_is_one_the_service_exports(k8s, tiny_bundle):
    from photoz.service.metrics import Metrics

    metric = k8s["HorizontalPodAutoscaler"]["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert f"# TYPE {metric} gauge" in Metrics(8).render().decode()
    assert metric in (ROOT / "docs" / "deploy.md").read_text()  # the adapter rule is documented


def test_kserve_inference_service_is_a_valid_custom_v2_predictor(k8s):
    import kserve

    isvc = manifests(KSERVE)["InferenceService"]
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    predictor = isvc["spec"]["predictor"]
    spec_fields = set(kserve.V1beta1InferenceServiceSpec.attribute_map.values())
    assert set(isvc["spec"]) <= spec_fields
    fields = {camel: name for name, camel in kserve.V1beta1PredictorSpec.attribute_map.items()}
    assert set(predictor) <= set(fields), set(predictor) - set(fields)
    # the pod part (containers, volumes, ...) against the Kubernetes Pod schema, strictly
    pod_fields = ("containers", "volumes", "securityContext", "tolerations", "nodeSelector", "serviceAccountName")
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": isvc["metadata"],
              "spec": {k: v for k, v in predictor.items() if k in pod_fields}})
    # the autoscaling part through the SDK's own model (types as KServe declares them)
    scalars = {fields[k]: v for k, v in predictor.items() if k not in pod_fields}
    for name, value in scalars.items():
        assert type(value).__name__ == kserve.V1beta1PredictorSpec.openapi_types[name], name
    kserve.V1beta1PredictorSpec(**scalars)
    container = predictor["containers"][0]
    assert container["ports"][0]["containerPort"] == _container(k8s)["ports"][0]["containerPort"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["envFrom"][0]["configMapRef"]["name"] == k8s["ConfigMap"]["metadata"]["name"]
