"""The Helm chart and the plain manifests rendered from it, checked as an operator would:
valid Kubernetes objects, a node.yaml the daemon loads, commands the real CLIs accept."""

from __future__ import annotations

import base64
import json
import re
import shutil
import tomllib
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import HelmRenderError
from helm_python.chart import Chart, lint

import spegel_tx
from deploy.render import CHART, MANIFESTS, is_hook, plain_manifests, render, split_documents
from spegel_tx.basicauth import BasicAuth
from spegel_tx.config import Config, basic_auth, load_config, router_secret
from tests.support.processes import spegel_tx_cli

KUBERNETES = "1.30.0"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "serviceMonitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "networkPolicy": {
        "networkPolicy": {
            "enabled": True,
            "registryFrom": [{"ipBlock": {"cidr": "10.0.0.0/16"}}],
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ],
        }
    },
    "grafanaDashboard": {
        "grafanaDashboard": {"enabled": True, "labels": {"grafana_dashboard": "1"}}
    },
    "routerSecret": {"spegel": {"routerSecretName": "dht-secret", "routerSecretKey": "key"}},
    "nodeLocalService": {
        "service": {"registry": {"mode": "nodeLocalService", "clusterIP": "10.96.0.50"}}
    },
    "mirroredRegistries": {
        "spegel": {
            "mirroredRegistries": ["https://docker.io", "https://ghcr.io"],
            "registryFilters": [":latest$", "^docker\\.io/library/"],
            "resolveTags": False,
            "prependExisting": True,
            "mirrorConnectTimeout": "250ms",
            "mirrorPeerQuarantine": "1m",
        }
    },
    "basicAuth": {"basicAuthSecretName": "registry-auth"},
    "minimal": {
        "service": {"registry": {"nodePort": 0}},
        "spegel": {"persistence": {"enabled": False}, "containerdContentPath": ""},
        "livenessProbe": {"enabled": False},
    },
}


@cache
def _documents(values_json: str) -> tuple[dict[str, Any], ...]:
    rendered = render(json.loads(values_json))
    return tuple(
        yaml.safe_load(document)
        for _, text in sorted(rendered.items())
        for document in split_documents(text)
    )


def documents(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object ``helm install`` would create with ``values``, hooks included."""
    return list(_documents(json.dumps(values, sort_keys=True)))


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def daemonset(values: dict[str, Any]) -> dict[str, Any]:
    return find(documents(values), "DaemonSet", "spegel-tx")


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    containers = pod_spec["initContainers" if init else "containers"]
    return next(c for c in containers if c["name"] == name)


def node_config(values: dict[str, Any], tmp_path: Path) -> tuple[Path, Config]:
    """The rendered node.yaml, written where a test can name it, and what it loads to."""
    path = tmp_path / "node.yaml"
    path.write_text(find(documents(values), "ConfigMap", "spegel-tx")["data"]["node.yaml"])
    return path, load_config(str(path), environ={})


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def validate(document: dict[str, Any]) -> None:
    kind = (document["apiVersion"], document["kind"])
    if kind in CRDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(document, KUBERNETES, strict=True)
        return
    kubernetes_validate.validate(document, KUBERNETES, strict=True)


def with_host_path(args: Sequence[str], certs: Path) -> list[str]:
    """The container's arguments as the kubelet runs them on a node whose certs.d is ``certs``."""
    default = "--containerd-registry-config-path=/etc/containerd/certs.d"
    assert default in args
    return [
        f"--containerd-registry-config-path={certs}"
        if arg == default
        else arg.replace("$(NODE_IP)", "192.0.2.7")
        for arg in args
    ]


def mirror_hosts(hosts_toml: Path) -> list[str]:
    return list(tomllib.loads(hosts_toml.read_text())["host"])


@pytest.mark.parametrize("case", CASES)
def test_every_rendered_object_is_valid_and_lint_passes(case):
    docs = documents(CASES[case])
    assert {d["kind"] for d in docs} >= {"ConfigMap", "DaemonSet", "Service", "Pod"}
    for document in docs:
        validate(document)
    report = lint(CHART, CASES[case], strict=True, kube_version=f"v{KUBERNETES}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_node_yaml_loads_with_the_values_given(tmp_path):
    docs = documents({})
    _, config = node_config({}, tmp_path)
    bootstrap = find(docs, "Service", "spegel-tx-bootstrap")
    assert config.bootstrap_kind == "dns"
    assert config.dns_bootstrap_domain == "spegel-tx-bootstrap.spegel-tx.svc.cluster.local"
    assert bootstrap["spec"]["ports"][0]["port"] == config.router_addr.port == 5001
    assert (config.registry_addr.host, config.registry_addr.port) == ("", 5000)
    assert config.metrics_addr.port == 9090
    assert config.data_dir == "/var/lib/spegel-tx"
    assert config.mirrored_registries == ()

    _, custom = node_config(CASES["mirroredRegistries"], tmp_path)
    assert custom.mirrored_registries == ("docker.io", "ghcr.io")
    assert [p.pattern for p in custom.registry_filters] == [":latest$", "^docker\\.io/library/"]
    assert custom.mirror_connect_timeout == 0.25
    assert custom.mirror_peer_quarantine == 60.0

    _, minimal = node_config(CASES["minimal"], tmp_path)
    assert minimal.data_dir == ""
    assert minimal.containerd_content_path == ""


def test_daemon_command_line_is_what_twistd_runs(tmp_path, twistd_config):
    """The container's command, with the ConfigMap where the kubelet mounts it."""
    path, expected = node_config({}, tmp_path)
    daemon = container(daemonset({})["spec"]["template"]["spec"], "spegel-tx")
    assert daemon["command"] == ["twistd"]
    mount = next(m for m in daemon["volumeMounts"] if m["name"] == "config")
    args = [a.replace(f"{mount['mountPath']}/node.yaml", str(path)) for a in daemon["args"]]
    assert args != daemon["args"], "the daemon must be given the ConfigMap's node.yaml"
    assert twistd_config(args) == expected


@pytest.mark.parametrize(
    ("case", "targets"),
    [
        ("defaults", ["http://192.0.2.7:30020", "http://192.0.2.7:30021"]),
        ("nodeLocalService", ["http://10.96.0.50:5000", "http://192.0.2.7:30021"]),
        ("minimal", ["http://192.0.2.7:30020"]),
    ],
)
def test_init_container_points_containerd_at_this_node_then_any_node(tmp_path, case, targets):
    pod = daemonset(CASES[case])["spec"]["template"]["spec"]
    init = container(pod, "configuration", init=True)
    certs = tmp_path / "certs.d"
    result = spegel_tx_cli(*with_host_path(init["args"], certs))
    assert result.returncode == 0, result.stderr
    assert mirror_hosts(certs / "_default" / "hosts.toml") == targets


def test_init_container_mirrors_the_registries_given(tmp_path):
    pod = daemonset(CASES["mirroredRegistries"])["spec"]["template"]["spec"]
    certs = tmp_path / "certs.d"
    result = spegel_tx_cli(*with_host_path(container(pod, "configuration", True)["args"], certs))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in certs.iterdir()) == ["_backup", "docker.io", "ghcr.io"]
    hub = tomllib.loads((certs / "docker.io" / "hosts.toml").read_text())
    assert hub["host"]["http://192.0.2.7:30020"]["capabilities"] == ["pull"]


def test_post_delete_hook_puts_every_node_back(tmp_path):
    docs = documents({})
    pod = daemonset({})["spec"]["template"]["spec"]
    hook = find(docs, "DaemonSet", "spegel-tx-cleanup")
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "post-delete"
    hook_pod = hook["spec"]["template"]["spec"]
    cleanup = container(hook_pod, "cleanup", init=True)
    assert cleanup["command"] == ["spegel-tx"] and cleanup["args"][0] == "cleanup"
    # The same hostPath as the init container's, and it runs where the daemon ran.
    assert hook_pod["volumes"] == [v for v in pod["volumes"] if v["name"] == "containerd-config"]
    for key in ("nodeSelector", "tolerations", "priorityClassName"):
        assert hook_pod[key] == pod[key]

    certs = tmp_path / "certs.d"
    (certs / "docker.io").mkdir(parents=True)
    (certs / "docker.io" / "hosts.toml").write_text('server = "https://corp-mirror"\n')
    configure = spegel_tx_cli(*with_host_path(container(pod, "configuration", True)["args"], certs))
    assert configure.returncode == 0, configure.stderr
    assert (certs / "_default" / "hosts.toml").exists()
    result = spegel_tx_cli(*with_host_path(cleanup["args"], certs))
    assert result.returncode == 0, result.stderr
    assert [p.relative_to(certs).as_posix() for p in sorted(certs.rglob("*"))] == [
        "docker.io",
        "docker.io/hosts.toml",
    ]


def test_post_delete_hook_waits_for_every_cleanup_pod():
    docs = documents({})
    hook_labels = find(docs, "DaemonSet", "spegel-tx-cleanup")["spec"]["template"]["metadata"]
    every, ready = (
        find(docs, "Service", n)["spec"] for n in ("spegel-tx-cleanup-all", "spegel-tx-cleanup")
    )
    assert (every["publishNotReadyAddresses"], ready["publishNotReadyAddresses"]) == (True, False)
    assert selects(every["selector"], hook_labels["labels"])
    assert selects(ready["selector"], hook_labels["labels"])
    wait = find(docs, "Pod", "spegel-tx-cleanup-wait")
    assert int(wait["metadata"]["annotations"]["helm.sh/hook-weight"]) > 0, "after the DaemonSet"
    args = wait["spec"]["containers"][0]["args"]
    assert args[0] == "-c"
    assert args[1] == (CHART / "files" / "cleanup_wait.py").read_text()
    assert args[2:] == [
        "spegel-tx-cleanup-all.spegel-tx.svc.cluster.local.",
        "spegel-tx-cleanup.spegel-tx.svc.cluster.local.",
    ]


def test_headless_bootstrap_service_lists_every_pod_ready_or_not():
    bootstrap = find(documents({}), "Service", "spegel-tx-bootstrap")["spec"]
    pod_labels = daemonset({})["spec"]["template"]["metadata"]["labels"]
    assert bootstrap["clusterIP"] == "None"
    assert bootstrap["publishNotReadyAddresses"] is True
    assert selects(bootstrap["selector"], pod_labels)


def test_probes_use_readyz_and_livez_on_the_registry_port():
    daemon = container(daemonset({})["spec"]["template"]["spec"], "spegel-tx")
    registry = next(p for p in daemon["ports"] if p["name"] == "registry")
    assert registry["containerPort"] == 5000
    assert daemon["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "registry"}
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "registry"}
    minimal = container(daemonset(CASES["minimal"])["spec"]["template"]["spec"], "spegel-tx")
    assert "livenessProbe" not in minimal


@pytest.mark.parametrize("grace", [20, 45])
def test_the_kubelet_waits_longer_than_the_node_drains(tmp_path, grace):
    """SIGTERM drains for shutdown-grace-period; the kubelet's SIGKILL must come later,
    and liveness must not kill a pod that is draining (readiness only goes 503)."""
    values = {"spegel": {"shutdownGracePeriodSeconds": grace}}
    _, config = node_config(values, tmp_path)
    pod = daemonset(values)["spec"]["template"]["spec"]
    assert config.shutdown_grace_period == grace
    assert pod["terminationGracePeriodSeconds"] == grace + 10
    assert container(pod, "spegel-tx")["livenessProbe"]["httpGet"]["path"] == "/livez"


def test_containerd_is_mounted_read_only_and_containers_are_locked_down():
    docs = documents({})
    pod = daemonset({})["spec"]["template"]["spec"]
    daemon = container(pod, "spegel-tx")
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in daemon["volumeMounts"]}
    assert volumes["containerd-sock"]["hostPath"] == {
        "path": "/run/containerd/containerd.sock",
        "type": "Socket",
    }
    assert volumes["containerd-content"]["hostPath"]["path"] == (
        "/var/lib/containerd/io.containerd.content.v1.content"
    )
    for name in ("containerd-sock", "containerd-content"):
        # The node's paths, at the same place: node.yaml names them as they are on the node.
        assert mounts[name]["mountPath"] == volumes[name]["hostPath"]["path"]
        assert mounts[name]["readOnly"] is True
    assert mounts["config"]["readOnly"] is True
    assert "containerd-config" not in mounts, "only the init container writes certs.d"
    pods = [pod, find(docs, "DaemonSet", "spegel-tx-cleanup")["spec"]["template"]["spec"]]
    pods.append(find(docs, "Pod", "spegel-tx-cleanup-wait")["spec"])
    for spec in pods:
        assert spec["automountServiceAccountToken"] is False
        for each in spec.get("initContainers", []) + spec["containers"]:
            context = each["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, each["name"]
            assert context["allowPrivilegeEscalation"] is False, each["name"]
            assert context["capabilities"] == {"drop": ["ALL"]}, each["name"]


def test_registry_reaches_containerd_by_host_port_or_node_local_service():
    docs = documents({})
    daemon = container(daemonset({})["spec"]["template"]["spec"], "spegel-tx")
    registry_port = next(p for p in daemon["ports"] if p["name"] == "registry")
    assert registry_port["hostPort"] == 30020
    service = find(docs, "Service", "spegel-tx-registry")["spec"]
    assert service["type"] == "NodePort"
    assert service["ports"][0]["nodePort"] == 30021
    assert "internalTrafficPolicy" not in service, "the NodePort is the any-node fallback"

    local = CASES["nodeLocalService"]
    daemon = container(daemonset(local)["spec"]["template"]["spec"], "spegel-tx")
    assert all("hostPort" not in p for p in daemon["ports"])
    service = find(documents(local), "Service", "spegel-tx-registry")["spec"]
    assert (service["clusterIP"], service["internalTrafficPolicy"]) == ("10.96.0.50", "Local")
    assert service["ports"][0]["targetPort"] == "registry"

    assert not [
        d for d in documents(CASES["minimal"]) if d["metadata"]["name"] == "spegel-tx-registry"
    ]
    with pytest.raises(HelmRenderError, match=r"service\.registry\.clusterIP is required"):
        render({"service": {"registry": {"mode": "nodeLocalService"}}})
    with pytest.raises(HelmRenderError, match="must be hostPort or nodeLocalService"):
        render({"service": {"registry": {"mode": "hostNetwork"}}})


def router_secret_env(values: dict[str, Any]) -> list[dict[str, Any]]:
    return container(daemonset(values)["spec"]["template"]["spec"], "spegel-tx")["env"]


def test_router_secret_comes_from_the_named_secret():
    assert router_secret_env(CASES["routerSecret"]) == [
        {
            "name": "ROUTER_SECRET",
            "valueFrom": {"secretKeyRef": {"name": "dht-secret", "key": "key"}},
        }
    ]
    assert [d for d in documents(CASES["routerSecret"]) if d["kind"] == "Secret"] == []


def test_without_a_named_secret_the_chart_makes_one_the_daemon_accepts():
    secret = find(documents({}), "Secret", "spegel-tx-router")
    assert router_secret_env({}) == [
        {
            "name": "ROUTER_SECRET",
            "valueFrom": {"secretKeyRef": {"name": "spegel-tx-router", "key": "secret"}},
        }
    ]
    value = base64.b64decode(secret["data"]["secret"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", value), "48 random letters and digits"
    assert router_secret(Config(), environ={"ROUTER_SECRET": value}) == value.encode()
    # Another install draws another secret: no two clusters share one.
    other = render({}, name="elsewhere")["spegel-tx/templates/router-secret.yaml"]
    assert secret["data"]["secret"] not in other


def test_an_upgrade_keeps_the_router_secret(tmp_path):
    """Helm's ``lookup`` needs a cluster: here the template is handed the Secret an earlier
    install left (what lookup returns on ``helm upgrade``) in place of the call."""
    chart = tmp_path / "spegel-tx"
    shutil.copytree(CHART, chart)
    helpers = chart / "templates" / "_helpers.tpl"
    call = (
        'lookup "v1" "Secret" (include "spegel-tx.namespace" .) '
        '(include "spegel-tx.routerSecretName" .)'
    )
    installed = base64.b64encode(b"drawn-at-install-0123456789").decode()
    answer = f'(dict "kind" "Secret" "data" (dict "secret" "{installed}"))'
    assert call in helpers.read_text()
    helpers.write_text(helpers.read_text().replace(call, answer))
    rendered = Chart.load(chart).render(
        {}, name="spegel-tx", namespace="spegel-tx", is_upgrade=True
    )["spegel-tx/templates/router-secret.yaml"]
    assert yaml.safe_load(rendered)["data"] == {"secret": installed}


def test_service_monitor_scrapes_the_metrics_service():
    docs = documents(CASES["serviceMonitor"])
    monitor = find(docs, "ServiceMonitor", "spegel-tx")
    metrics = find(docs, "Service", "spegel-tx-metrics")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert selects(monitor["spec"]["selector"]["matchLabels"], metrics["metadata"]["labels"])
    endpoint = monitor["spec"]["endpoints"][0]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in metrics["spec"]["ports"]}
    pod_labels = daemonset({})["spec"]["template"]["metadata"]["labels"]
    assert selects(metrics["spec"]["selector"], pod_labels)


def test_network_policy_keeps_the_dht_among_peers():
    values = CASES["networkPolicy"]
    policy = find(documents(values), "NetworkPolicy", "spegel-tx")["spec"]
    pod_labels = daemonset(values)["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["podSelector"]["matchLabels"], pod_labels)
    rules = {(p["port"], p["protocol"]): rule for rule in policy["ingress"] for p in rule["ports"]}
    assert set(rules) == {(5001, "UDP"), (5000, "TCP"), (9090, "TCP")}
    router = rules[(5001, "UDP")]["from"]
    assert len(router) == 1 and selects(router[0]["podSelector"]["matchLabels"], pod_labels)
    registry = rules[(5000, "TCP")]["from"]
    assert registry[0] == router[0] and registry[1:] == values["networkPolicy"]["registryFrom"]
    assert rules[(9090, "TCP")]["from"] == values["networkPolicy"]["metricsFrom"]
    open_metrics = find(
        documents({"networkPolicy": {"enabled": True}}), "NetworkPolicy", "spegel-tx"
    )
    assert "from" not in open_metrics["spec"]["ingress"][2], "metrics from anywhere by default"


def test_grafana_dashboard_config_map_carries_the_dashboard():
    dashboard = find(documents(CASES["grafanaDashboard"]), "ConfigMap", "spegel-tx-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    text = (CHART / "dashboards" / "spegel-tx.json").read_text()
    assert json.loads(dashboard["data"]["spegel-tx.json"]) == json.loads(text)


def test_a_changed_node_yaml_rolls_the_pods():
    def checksum(values: dict[str, Any]) -> str:
        annotations = daemonset(values)["spec"]["template"]["metadata"]["annotations"]
        return str(annotations["checksum/config"])

    assert checksum({}) != checksum({"spegel": {"logLevel": "DEBUG"}})


def test_plain_manifests_are_a_fresh_render_and_valid():
    fresh = plain_manifests()
    committed = {p.name: p.read_text() for p in MANIFESTS.glob("*.yaml")}
    assert committed == fresh, "run python3 deploy/render.py and commit deploy/kubernetes"
    installed = [yaml.safe_load(d) for d in split_documents(fresh["spegel-tx.yaml"])]
    hooks = [yaml.safe_load(d) for d in split_documents(fresh["cleanup.yaml"])]
    assert installed and hooks
    assert not any(is_hook(d) for d in split_documents(fresh["spegel-tx.yaml"]))
    assert all(is_hook(d) for d in split_documents(fresh["cleanup.yaml"]))
    for document in installed + hooks:
        assert document["metadata"]["namespace"] == "spegel-tx"
        validate(document)


def test_values_table_documents_every_value():
    def leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
        keys = []
        for key, value in values.items():
            path = f"{prefix}{key}"
            keys += leaves(value, f"{path}.") if isinstance(value, dict) and value else [path]
        return keys

    def covers(row: str, key: str) -> bool:
        return key == row or key.startswith(f"{row}.")

    keys = leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    readme = (CHART / "README.md").read_text().split("## Values", 1)[1]
    rows = re.findall(r"^\| `([\w.]+)` \|", readme, re.MULTILINE)
    assert [key for key in keys if not any(covers(row, key) for row in rows)] == []
    assert [row for row in rows if not any(covers(row, key) for key in keys)] == []


def test_chart_app_version_is_the_package_version():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == spegel_tx.__version__
    daemon = container(daemonset({})["spec"]["template"]["spec"], "spegel-tx")
    assert daemon["image"] == f"spegel-tx:{spegel_tx.__version__}"


def data_volume(values: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The daemon's data volume and its mount, None where there is none."""
    pod = daemonset(values)["spec"]["template"]["spec"]
    volume = next((v for v in pod["volumes"] if v["name"] == "data"), None)
    mounts = container(pod, "spegel-tx")["volumeMounts"]
    return volume, next((m for m in mounts if m["name"] == "data"), None)


def test_the_dht_identity_is_kept_on_the_node_across_rollouts(tmp_path):
    """A hostPath outlives the pod, so a rolled-out pod reads the node-id file its
    predecessor wrote; an emptyDir would give every new pod a new identity."""
    volume, mount = data_volume({})
    _, config = node_config({}, tmp_path)
    assert volume == {
        "name": "data",
        "hostPath": {"path": "/var/lib/spegel-tx", "type": "DirectoryOrCreate"},
    }
    assert mount is not None and mount["mountPath"] == config.data_dir == "/var/lib/spegel-tx"
    assert not mount.get("readOnly"), "the first pod on a node writes the identity"


def test_spegels_persistence_values_carry_over(tmp_path):
    spegel = {"spegel": {"persistence": {"path": "/var/lib/spegel", "hostPath": "/srv/spegel"}}}
    volume, mount = data_volume(spegel)
    _, config = node_config(spegel, tmp_path)
    assert volume is not None and volume["hostPath"]["path"] == "/srv/spegel"
    assert mount is not None and mount["mountPath"] == config.data_dir == "/var/lib/spegel"


def test_an_empty_host_path_keeps_the_identity_only_for_the_pods_life(tmp_path):
    values = {"spegel": {"persistence": {"hostPath": ""}}}
    volume, _ = data_volume(values)
    assert volume == {"name": "data", "emptyDir": {}}
    assert node_config(values, tmp_path)[1].data_dir == "/var/lib/spegel-tx"
    assert data_volume(CASES["minimal"]) == (None, None)


def test_the_debug_page_is_on_by_default_as_in_spegel(tmp_path):
    assert node_config({}, tmp_path)[1].debug_web_enabled is True
    off = {"spegel": {"debugWebEnabled": False}}
    assert node_config(off, tmp_path)[1].debug_web_enabled is False
    values_text = (CHART / "values.yaml").read_text()
    assert "It has no authentication" in values_text, "the security note stays beside it"


SECRET_MOUNT = "/etc/secrets/basic-auth"


def test_spegels_basic_auth_secret_reaches_hosts_toml_and_the_daemon(tmp_path):
    """With the Secret's files where the kubelet mounts them, the init container writes the
    header containerd sends, and the daemon asks for the same credentials."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "username").write_text("spegel")
    (secret / "password").write_text("s3cret")
    values = CASES["basicAuth"]
    pod = daemonset(values)["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "basic-auth")
    assert volume["secret"] == {"secretName": "registry-auth"}
    init = container(pod, "configuration", init=True)
    daemon = container(pod, "spegel-tx")
    for mounted in (init, daemon):
        mount = next(m for m in mounted["volumeMounts"] if m["name"] == "basic-auth")
        assert (mount["mountPath"], mount["readOnly"]) == (SECRET_MOUNT, True)

    certs = tmp_path / "certs.d"
    args = [arg.replace(SECRET_MOUNT, str(secret)) for arg in with_host_path(init["args"], certs)]
    result = spegel_tx_cli(*args)
    assert result.returncode == 0, result.stderr
    hosts = tomllib.loads((certs / "_default" / "hosts.toml").read_text())["host"]
    expected = BasicAuth(b"spegel", b"s3cret")
    assert {table["header"]["Authorization"] for table in hosts.values()} == {
        expected.header().decode()
    }

    path, _ = node_config(values, tmp_path)
    path.write_text(path.read_text().replace(SECRET_MOUNT, str(secret)))
    assert basic_auth(load_config(str(path), environ={})) == expected


def test_without_a_basic_auth_secret_nothing_asks_for_credentials(tmp_path):
    pod = daemonset({})["spec"]["template"]["spec"]
    assert "basic-auth" not in {v["name"] for v in pod["volumes"]}
    certs = tmp_path / "certs.d"
    init = container(pod, "configuration", init=True)
    assert spegel_tx_cli(*with_host_path(init["args"], certs)).returncode == 0
    assert "header" not in (certs / "_default" / "hosts.toml").read_text()
    _, config = node_config({}, tmp_path)
    assert basic_auth(config) is None
