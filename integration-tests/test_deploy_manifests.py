"""The Kubernetes manifests under deploy/ against a running server: the probes ask a route that
answers 200 once the server is ready, and the autoscaler's metric is one the server exports."""

from __future__ import annotations

from pathlib import Path

import requests
import yaml
from conftest import SluiceServer

MANIFESTS = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def manifest(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


def test_probes_ask_a_route_that_answers_when_ready(server: SluiceServer) -> None:
    (container,) = manifest("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[probe]["httpGet"]["path"]
        assert requests.get(f"{server.url}{path}", timeout=10).status_code == 200, probe


def test_the_autoscaler_metric_is_exported(server: SluiceServer) -> None:
    (metric,) = manifest("hpa.yaml")["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    exported = requests.get(f"{server.url}/metrics", timeout=10).text
    assert f"# TYPE {name} gauge" in exported


def test_every_manifest_is_listed_in_the_kustomization() -> None:
    listed = set(manifest("kustomization.yaml")["resources"])
    assert listed == {path.name for path in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
