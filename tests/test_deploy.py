"""deploy/: the Compose file resolves, its commands parse with our CLIs, images are pinned and
non-root; the edge's code passes the Python 3.8 check. (No Docker engine runs here.)"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))


@lru_cache(maxsize=1)
def compose_config() -> dict:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose; .ci/run does)")
    out = subprocess.run(
        [exe, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "SFT_UID": "1000"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(out.stdout)


def test_compose_config_resolves_two_services_on_their_own_network():
    config = compose_config()
    cloud, edge = config["services"]["cloud"], config["services"]["edge"]
    assert set(config["services"]) == {"cloud", "edge"}
    assert set(cloud["networks"]) == set(edge["networks"]) == {"sft"}
    assert edge["depends_on"]["cloud"]["condition"] == "service_healthy"
    assert cloud["user"] == edge["user"] == "1000:0"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in cloud["volumes"] + edge["volumes"]}
    assert mounts["/var/lib/sft/checkpoints"] == "checkpoints" and "checkpoints" in config["volumes"]
    for name in ("ca.pem", "server.pem", "server.key", "tokens.txt", "edge-token.txt"):
        assert Path(mounts[f"/run/sft/certs/{name}"]).resolve() == (ROOT / "certs" / "dev" / name).resolve()
    # Compared resolved: ../shared may be a symbolic link, which compose does not resolve.
    assert Path(mounts["/data/glue"]).resolve() == (ROOT.parent / "shared" / "data" / "glue").resolve()


def test_compose_commands_parse_with_the_real_command_lines():
    from sft_cloud.cli import build_parser as cloud_parser
    from sft_edge.cli import build_parser as edge_parser

    config = compose_config()
    serve = cloud_parser().parse_args(config["services"]["cloud"]["command"])
    assert serve.tls_cert and serve.tls_key and serve.auth_token_file and not serve.insecure
    assert serve.checkpoint_dir == "/var/lib/sft/checkpoints" and serve.metrics_port == 9100
    train = edge_parser().parse_args(config["services"]["edge"]["command"])
    assert train.task == "sst2" and train.cloud == "cloud:50051" and train.data_dir == "/data/glue"
    assert train.tls_ca and train.auth_token_file and not train.insecure


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_pinned_and_non_root(dockerfile):
    text = dockerfile.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and ":" in base.group(1) and not base.group(1).endswith(":latest"), "pin the base by tag"
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and not users[-1].startswith(("root", "0:", "0")), "the last USER must not be root"
    assert re.search(r"pip install -c constraints\.txt", text), "install against the pinned constraints"
    if dockerfile.name.startswith("cloud"):
        assert 'CMD ["python", "-m", "sft_cloud.healthcheck"]' in text


def test_edge_code_runs_on_python_38():
    """`make check-py38`: vermin finds nothing in sft_edge / sft_common newer than Python 3.8."""
    pytest.importorskip("vermin")
    out = subprocess.run(
        [sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())", "--target=3.8-",
         "--no-tips", "--violations", "sft_edge", "sft_common"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
