"""Static checks of the Kubernetes manifests in docker/kubernetes (no cluster here): they parse as
YAML, and the keys that make a replica work and scale are right: our image, Triton's ports,
health probes on Triton's endpoints, GPUs, and the queue-time metric the autoscaler reads."""
from pathlib import Path

import dockerfile
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "docker" / "kubernetes"
IMAGE = "registry.example.com/minedraft:0.1.0"  # the image docker/Dockerfile builds, pushed to a registry
TRITON_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def load(name: str) -> dict:
    return yaml.safe_load((KUBERNETES / name).read_text())


def test_serving_runtime_runs_our_image_on_tritons_ports_with_health_probes():
    runtime = load("kserve/servingruntime.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == IMAGE
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == TRITON_PORTS
    args = container["args"]
    assert args[0] == "tritonserver" and "--model-repository=/mnt/models" in args  # where KServe puts storageUri
    for name, port in TRITON_PORTS.items():
        assert f"--{name}-port={port}" in args
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8000}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8000}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert runtime["metadata"]["annotations"]["prometheus.kserve.io/port"] == "8002"
    assert any(m["mountPath"] == "/dev/shm" for m in container["volumeMounts"])


def test_the_image_is_the_one_docker_builds():
    """The runtime's args start the server the Dockerfile installs the backend into."""
    commands = dockerfile.parse_file(str(REPO / "docker" / "Dockerfile"))
    assert commands[0].value[0].startswith("nvcr.io/nvidia/tritonserver:")
    assert any("/opt/tritonserver/backends/minedraft/model.py" in c.original for c in commands)


def test_inference_service_uses_the_runtime_and_scales_on_tritons_queue_time():
    service = load("kserve/inferenceservice.yaml")
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    annotations = service["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    predictor = service["spec"]["predictor"]
    runtime = load("kserve/servingruntime.yaml")
    assert predictor["model"]["runtime"] == runtime["metadata"]["name"]
    assert predictor["model"]["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert int(predictor["model"]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert 1 <= predictor["minReplicas"] < predictor["maxReplicas"]
    (metric,) = predictor["autoScaling"]["metrics"]
    query = metric["external"]["metric"]["query"]
    assert metric["external"]["metric"]["backend"] == "prometheus"
    # Queue time per request: the queue's microseconds over the requests served.
    assert "nv_inference_queue_duration_us" in query and "nv_inference_request_success" in query
    assert float(metric["external"]["target"]["value"]) > 0


def test_helm_values_scale_on_the_adapters_queue_time_metric():
    values = load("helm/values.yaml")
    assert values["image"]["imageName"] == IMAGE
    assert values["image"]["numGpus"] >= 1
    assert values["tags"]["autoscaling"] is True
    (metric,) = values["autoscaling"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    (rule,) = values["prometheus-adapter"]["rules"]["custom"]
    # The HPA's metric is the one prometheus-adapter makes from Triton's queue duration.
    assert rule["name"] == {"matches": "nv_inference_queue_duration_us", "as": "avg_time_queue_us"}
    assert "nv_inference_queue_duration_us" in rule["seriesQuery"]
    assert "nv_inference_request_success" in rule["metricsQuery"]
    assert 1 <= values["autoscaling"]["minReplicas"] < values["autoscaling"]["maxReplicas"]
