"""ray_cluster.yaml never exposes the unauthenticated MLflow server on every interface (issue 9, item 2)."""

import re
from pathlib import Path

import yaml

CLUSTER_FILE = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


def test_mlflow_server_binds_the_private_address():
    cluster = yaml.safe_load(CLUSTER_FILE.read_text())
    commands = " ".join(cluster["head_start_ray_commands"])
    servers = [part for part in commands.split("nohup")[1:] if "mlflow server" in part]
    assert servers, "the head no longer starts an MLflow server: update this test"
    for server in servers:
        assert re.search(r"--host \"\$\(hostname -I", server), server
        assert "0.0.0.0" not in server
