"""deploy/k8s and deploy/docker-compose.replicas.yml: the manifests validate against the
Kubernetes schemas (kubernetes-validate), fit together (selectors, ports, volume, probes, grace),
and their command lines parse with the real CLIs. No cluster or Docker engine runs here."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from sft_cloud.cli import build_parser as cloud_parser
from sft_cloud.daemon.config import ServeConfig
from sft_cloud.daemon.server import STOP_MARGIN_S
from sft_edge.cli import build_parser as edge_parser

yaml = pytest.importorskip("yaml")
ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
K8S_VERSION = "1.30.0"  # gRPC probes are GA from 1.27
KINDS = {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget", "Ingress"}


def _load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def _daemon(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _serve_args(args):
    """The daemon's arguments as `sft-cloud serve` parses them, checked as the CLI checks them
    (the token file exists only in the pod)."""
    parsed = cloud_parser().parse_args(args)
    values = {k: v for k, v in vars(parsed).items() if k in ServeConfig.__dataclass_fields__}
    ServeConfig(**{**values, "auth_token_file": None}).validate()
    return parsed


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate_against_the_kubernetes_schemas(manifest):
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install -e '.[dev]')"
    )
    for doc in yaml.safe_load_all(manifest.read_text()):
        kv.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError, naming the field


def test_kustomization_lists_every_manifest_and_renders():
    kustomization = _load("kustomization.yaml")
    assert sorted(kustomization["resources"]) == [p.name for p in MANIFESTS]
    assert {yaml.safe_load(p.read_text())["kind"] for p in MANIFESTS} == KINDS
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomization was checked, not rendered")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert {d["kind"] for d in docs} == KINDS and {d["metadata"]["namespace"] for d in docs} == {"sft"}
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert _daemon(deployment)["image"] == "registry.example.com/sft-cloud:0.1.0"


def test_the_daemon_runs_replicas_with_a_gpu_probes_and_a_grace_above_its_own():
    deployment = _load("deployment.yaml")
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    daemon = _daemon(deployment)
    assert spec["replicas"] >= 2
    assert daemon["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert daemon["resources"]["requests"]["nvidia.com/gpu"] == 1
    args = _serve_args(daemon["args"])
    assert args.command == "serve" and args.device == "cuda" and args.insecure and args.auth_token_file
    ports = {p["name"]: p["containerPort"] for p in daemon["ports"]}
    assert args.port == ports["grpc"] and args.metrics_port == ports["metrics"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert daemon[probe]["grpc"] == {"port": ports["grpc"]}, probe  # the health service
    # SIGTERM: the grace, then the server stops (at most STOP_MARGIN_S later), then the shutdown
    # checkpoint; Kubernetes must not SIGKILL before that.
    assert pod["terminationGracePeriodSeconds"] >= args.grace_seconds + STOP_MARGIN_S + 10
    # Each pod has its own replica id (its name), and all share one ReadWriteMany volume.
    assert args.replica_id == "$(POD_NAME)"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in daemon["env"]
    assert args.lease_seconds >= 10
    mounts = {m["mountPath"]: m["name"] for m in daemon["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes[mounts[args.checkpoint_dir]]["persistentVolumeClaim"]["claimName"]
    pvc = _load("pvc.yaml")
    assert claim == pvc["metadata"]["name"] and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    token_dir = os.path.dirname(args.auth_token_file)
    assert volumes[mounts[token_dir]]["secret"]["secretName"] == "sft-tokens"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_service_budget_and_ingress_reach_the_daemon_by_its_routing_key():
    deployment = _load("deployment.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in _daemon(deployment)["ports"]}
    service, pdb, ingress = _load("service.yaml"), _load("pdb.yaml"), _load("ingress.yaml")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    (grpc_port,) = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_sft_route"
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert notes["nginx.ingress.kubernetes.io/proxy-body-size"] == "0"
    ((path,),) = [rule["http"]["paths"] for rule in ingress["spec"]["rules"]]
    assert path["backend"]["service"] == {"name": service["metadata"]["name"], "port": {"name": "grpc"}}
    assert ingress["spec"]["tls"][0]["secretName"]


def test_the_edge_sends_the_header_the_proxies_hash_on():
    from sft_edge.link.connect import ROUTE_HEADER

    conf = (ROOT / "deploy" / "nginx" / "nginx.conf").read_text()
    variable = "$http_" + ROUTE_HEADER.replace("-", "_")
    assert f"hash {variable} consistent;" in conf
    assert (
        _load("ingress.yaml")["metadata"]["annotations"]["nginx.ingress.kubernetes.io/upstream-hash-by"]
        == variable
    )
    assert re.search(r"grpc_pass grpc://sft_replicas;", conf) and "client_max_body_size 0;" in conf


def test_the_replicas_compose_file_shares_one_volume_behind_nginx():
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    compose = ROOT / "deploy" / "docker-compose.replicas.yml"
    env = {**os.environ, "SFT_UID": "1000"}
    quiet = subprocess.run([exe, "-f", str(compose), "config", "-q"], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0, quiet.stderr
    out = subprocess.run(
        [exe, "-f", str(compose), "config"], capture_output=True, text=True, env=env, timeout=120
    )
    config = yaml.safe_load(out.stdout)
    services = config["services"]
    assert set(services) == {"cloud-a", "cloud-b", "cloud", "edge"}
    ids = set()
    for name in ("cloud-a", "cloud-b"):
        args = _serve_args(services[name]["command"])
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert mounts[args.checkpoint_dir] == "sessions" and args.insecure and args.auth_token_file
        ids.add(args.replica_id)
        grace = float(re.match(r"(\d+)s$", services[name]["stop_grace_period"]).group(1))  # type: ignore[union-attr]
        assert grace >= args.grace_seconds + STOP_MARGIN_S + 10
    assert ids == {"cloud-a", "cloud-b"}
    proxy = services["cloud"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in proxy["volumes"]}
    assert Path(mounts["/etc/nginx/nginx.conf"]) == ROOT / "deploy" / "nginx" / "nginx.conf"
    assert set(proxy["depends_on"]) == {"cloud-a", "cloud-b"}
    upstreams = re.findall(r"server (cloud-\w+):(\d+)", Path(mounts["/etc/nginx/nginx.conf"]).read_text())
    assert upstreams == [("cloud-a", "50051"), ("cloud-b", "50051")]  # the daemons' names and port
    train = edge_parser().parse_args(services["edge"]["command"])
    assert train.cloud == "cloud:8443" and train.tls_ca and train.auth_token_file and train.checkpoint_every
