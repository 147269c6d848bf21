"""A Spegel values file on the spegel-tx chart: every Spegel value is honoured, or the
render fails naming it; nothing is dropped without a word."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import HelmRenderError, HelmValuesError

from deploy.render import CHART, render, split_documents
from spegel_tx.config import load_config

SPEGEL_VALUES = yaml.safe_load((Path(__file__).parent / "spegel-values.yaml").read_text())
"""Spegel's own chart values (its header says where from)."""

SPEGEL_ONLY_DEFAULTS = {
    "serviceAccount.name": "",
    "service.registry.internalTrafficLocal": False,
    "service.cleanup.port": 8080,
    "grafanaDashboard.mode": "Sidecar",
    "grafanaDashboard.grafanaOperator.resyncPeriod": "10m",
    "verticalPodAutoscaler.enabled": False,
    "verticalPodAutoscaler.updatePolicy.minReplicas": 2,
}
"""Some of the Spegel values the chart does not support, at Spegel's defaults."""


def leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``a.b.c`` of every value that is not itself a map with keys."""
    found = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            found |= leaves(value, f"{path}.")
        else:
            found[path] = value
    return found


def objects(values: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        yaml.safe_load(document)
        for _, text in sorted(render(values).items())
        for document in split_documents(text)
    ]


def test_spegels_values_file_renders_valid_objects_and_is_honoured(tmp_path: Path) -> None:
    rendered = objects(SPEGEL_VALUES)
    for document in rendered:
        if document["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(document, "1.30.0", strict=True)
    [daemonset] = [
        d for d in rendered if d["kind"] == "DaemonSet" and d["metadata"]["name"] == "spegel-tx"
    ]
    pod = daemonset["spec"]["template"]["spec"]
    [daemon] = pod["containers"]
    assert daemon["resources"]["limits"]["memory"] == "128Mi"
    assert "livenessProbe" not in daemon, "Spegel's livenessProbe.enabled: false"
    assert daemon["securityContext"]["readOnlyRootFilesystem"] is True
    [config_map] = [
        d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spegel-tx"
    ]
    node_yaml = tmp_path / "node.yaml"
    node_yaml.write_text(config_map["data"]["node.yaml"])
    config = load_config(str(node_yaml), environ={})
    assert config.data_dir == "/var/lib/spegel", "spegel.persistence.path"
    assert config.dns_bootstrap_domain.endswith(".svc.cluster.local"), "clusterDomain with its dot"
    assert str(config.registry_addr) == ":5000"
    registry = next(d for d in rendered if d["metadata"]["name"] == "spegel-tx-registry")
    assert registry["spec"]["ports"][0]["nodePort"] == 30020


def test_every_spegel_value_is_one_the_chart_has_or_one_it_refuses_away_from_its_default() -> None:
    ours = leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    checked = yaml.safe_load(
        helpers.split('{{- define "spegel-tx.spegelOnlyDefaults" -}}')[1].split("{{- end }}")[0]
    )
    for path, default in leaves(SPEGEL_VALUES).items():
        known = path in ours or any(path.startswith(f"{p}.") for p in ours)
        if path == "basicAuthSecretName":
            continue  # honoured: the basic-auth work's own tests check it
        assert known or checked.get(path, object()) == default, f"{path} would be dropped"


def test_spegel_values_set_away_from_their_defaults_fail_the_render_each_named() -> None:
    changed: dict[str, Any] = {}
    for path, default in SPEGEL_ONLY_DEFAULTS.items():
        *parents, last = path.split(".")
        node = changed
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = (
            "other"
            if isinstance(default, str)
            else (not default if isinstance(default, bool) else default + 1)
        )
    with pytest.raises(HelmRenderError) as failed:
        render(SPEGEL_VALUES | changed)
    message = str(failed.value)
    assert "spegel-tx does not support these Spegel values" in message
    for path in SPEGEL_ONLY_DEFAULTS:
        assert f"- {path}: " in message


def test_a_value_neither_chart_knows_fails_the_render_named() -> None:
    with pytest.raises(HelmValuesError) as failed:
        render({"spegel": {"mirrorResolveTimout": "50ms"}, "hostNetwork": True})
    message = str(failed.value)
    assert "'mirrorResolveTimout'" in message and "'hostNetwork'" in message


def test_every_value_of_the_chart_is_in_its_schema() -> None:
    """A value added to values.yaml but not to values.schema.json would fail every render;
    this names it first."""
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())

    def paths(node: dict[str, Any], prefix: str = "") -> set[str]:
        found = set()
        for key, value in node.get("properties", {}).items():
            found.add(f"{prefix}{key}")
            found |= paths(value, f"{prefix}{key}.")
        return found

    declared = paths(schema)
    for path in leaves(yaml.safe_load((CHART / "values.yaml").read_text())):
        parts = path.split(".")
        assert any(".".join(parts[:n]) in declared for n in range(len(parts), 0, -1)), path
