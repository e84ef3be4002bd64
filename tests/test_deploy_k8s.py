"""deploy/k8s/ checked offline: every manifest against the Kubernetes API schemas (kubernetes-validate,
strict: unknown fields are errors), and the values that must agree across files, the server and the
capacity table, so a rename or a changed default on either side fails here rather than in a cluster."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kv
from websockets.datastructures import Headers
from websockets.http11 import Request

from procs.config import OPTIONS, ServerConfig, parse_config
from procs.network.hosts import AllowedHosts, default_hosts
from procs.network.http import Health, HttpRoutes
from procs.network.metrics import ServerMetrics

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
ADAPTER_VALUES = K8S / "prometheus-adapter-values.yaml"
KUSTOMIZATION = K8S / "kustomization.yaml"
# Not Kubernetes objects: Helm values and kustomize's own file, checked on their own below.
NOT_OBJECTS = {ADAPTER_VALUES.name, KUSTOMIZATION.name}
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name not in NOT_OBJECTS)
# 1.30: the oldest release where the preStop `sleep` action is on by default (beta); 1.34: a recent one.
K8S_VERSIONS = ("1.30.0", "1.34.0")
# After the drain: goodbyes (2 x GOODBYE_S), the supervisor stopping its children, CUDA freeing memory.
STOP_MARGIN_S = 30
MIN_STARTUP_S = 600  # a cold start on a busy node; the model itself loads under readiness, not this probe


def _capacity() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_capacity", ROOT / "deploy" / "capacity.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


capacity = _capacity()


def _objects() -> dict[str, dict[str, Any]]:
    """kind -> the one object of that kind in deploy/k8s (each kind appears once)."""
    found: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in found, f"two {doc['kind']} objects; these checks assume one"
                found[doc["kind"]] = doc
    return found


OBJECTS = _objects()
DEPLOYMENT = OBJECTS["Deployment"]
POD = DEPLOYMENT["spec"]["template"]["spec"]
(CONTAINER,) = POD["containers"]
ENV = {e["name"]: e["value"] for e in CONTAINER["env"] if "value" in e}
HPA = OBJECTS["HorizontalPodAutoscaler"]
(RULE,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


def _quantity(text: str | int | float) -> Fraction:
    """A Kubernetes quantity as an exact number; only the forms a ratio target uses (700m, 0.7, 1)."""
    s = str(text)
    return Fraction(s[:-1]) / 1000 if s.endswith("m") else Fraction(s)


def _server_config() -> ServerConfig:
    return parse_config([], environ=ENV)


# ---- the manifests against the API schemas -----------------------------------------------------------------


def test_pinned_versions_are_bundled() -> None:
    bundled = set(kv.all_versions())
    assert set(K8S_VERSIONS) <= bundled, f"kubernetes-validate {kv.__version__} ships {sorted(bundled)}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_strictly(path: Path, version: str) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path.name} holds no object"
    for doc in docs:
        # SchemaNotFoundError (a kind or apiVersion the release does not have) is a failure here too.
        problem = None
        try:
            validated = kv.validate(doc, version, strict=True)
        except kv.ValidationError as error:
            # Said outside the handler: the exception itself prints the whole schema.
            problem = f"{path.name} {doc['kind']}: {'.'.join(map(str, error.path))}: {error.message}"
        if problem is not None:
            pytest.fail(problem, pytrace=False)
        assert validated == kv.major_minor(version)


def test_expected_objects_present() -> None:
    assert set(OBJECTS) == {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler"}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS)


# ---- names, labels, ports ----------------------------------------------------------------------------------


def test_selectors_pick_the_pods() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": DEPLOYMENT["spec"]["selector"]["matchLabels"],
        "Service": OBJECTS["Service"]["spec"]["selector"],
        "PodDisruptionBudget": OBJECTS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= labels.items(), f"{kind} selector {selector} misses {labels}"


def test_container_port_is_the_servers_port() -> None:
    cfg = _server_config()
    (port,) = CONTAINER["ports"]
    assert port["containerPort"] == cfg.port, "containerPort differs from VOICE_PORT"
    assert cfg.host == "0.0.0.0", "the server must listen on every address in a pod, not loopback"
    (service_port,) = OBJECTS["Service"]["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    annotations = DEPLOYMENT["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == cfg.port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_every_voice_variable_is_a_real_option_and_parses() -> None:
    known = {o.env for o in OPTIONS}
    names = {e["name"] for e in CONTAINER["env"] if e["name"].startswith("VOICE_")}
    assert names <= known, f"not options of procs/config.py: {sorted(names - known)}"
    cfg = _server_config()  # exits (SystemExit) on a value the server would refuse at start
    assert cfg.device == "cuda"
    assert cfg.model.hf_repo == ENV["VOICE_HF_REPO"]
    assert cfg.log_format == "json"


def test_the_public_and_in_cluster_names_are_served() -> None:
    # The page and /ws answer only the Host names a pod knows (procs/network/hosts.py): its own (a
    # stand-in pod IP here), and VOICE_ALLOWED_HOSTS. The probes answer any Host (test_probes_... below).
    cfg = _server_config()
    hosts = AllowedHosts.of((*default_hosts(cfg.host, ["10.1.2.3"]), *cfg.allowed_hosts))
    service = OBJECTS["Service"]["metadata"]["name"]
    port = cfg.port
    for host in ("voice.example.com", f"{service}:{port}", f"{service}.voice.svc.cluster.local:{port}",
                 f"10.1.2.3:{port}", f"localhost:{port}"):
        assert hosts.allows(host), f"{host} is not served: VOICE_ALLOWED_HOSTS={ENV['VOICE_ALLOWED_HOSTS']}"
    assert not hosts.allows("evil.example") and not hosts.allows(f"10.1.2.4:{port}")


def test_gpu_requested_and_run_as_non_root() -> None:
    resources = CONTAINER["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert int(resources["requests"]["nvidia.com/gpu"]) == 1  # extended resources: request == limit
    pod_sc, container_sc = POD["securityContext"], CONTAINER["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert container_sc["allowPrivilegeEscalation"] is False


def test_hf_cache_on_the_claimed_volume() -> None:
    pvc = OBJECTS["PersistentVolumeClaim"]["metadata"]["name"]
    volumes = {v["name"]: v for v in POD["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in CONTAINER["volumeMounts"]}
    volume = volumes[mounts[ENV["HF_HOME"]]]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc
    # Every replica mounts the same claim, on whichever node it lands.
    assert "ReadWriteMany" in OBJECTS["PersistentVolumeClaim"]["spec"]["accessModes"]


def test_shared_memory_for_the_rings() -> None:
    """ringbuf/ keeps its rings in /dev/shm; a container's default there is 64 MiB."""
    mounts = {m["mountPath"]: m["name"] for m in CONTAINER["volumeMounts"]}
    volume = {v["name"]: v for v in POD["volumes"]}[mounts["/dev/shm"]]
    assert volume["emptyDir"]["medium"] == "Memory"


# ---- probes and stopping -----------------------------------------------------------------------------------


def _get(routes: HttpRoutes, path: str) -> int:
    response = routes.respond(Request(path, Headers({"Host": "pod:8998"})))
    assert response is not None
    return response.status_code


def _routes(status: str) -> HttpRoutes:
    health = Health(status=status, sessions_active=0, max_sessions=4, model="m", engine="moshi",
                    demo_weights=False)
    return HttpRoutes(ROOT / "web", lambda: health, ServerMetrics(["inference-0"]).render, lambda: None)


def test_probes_use_the_servers_routes() -> None:
    assert CONTAINER["readinessProbe"]["httpGet"]["path"] == "/health"
    assert CONTAINER["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert CONTAINER["startupProbe"]["httpGet"]["path"] == "/livez"
    port_name = CONTAINER["ports"][0]["name"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert CONTAINER[probe]["httpGet"]["port"] == port_name
    # What those routes answer: readiness drops a pod that cannot take a session; liveness never restarts
    # one that is only starting, full or draining (a restart ends every live session).
    assert _get(_routes("ok"), "/health") == 200
    for status in ("starting", "full", "draining"):
        assert _get(_routes(status), "/health") == 503, status
        assert _get(_routes(status), "/livez") == 200, status
    assert _get(_routes("ok"), "/metrics") == 200


def test_startup_probe_allows_a_slow_start() -> None:
    probe = CONTAINER["startupProbe"]
    assert probe["failureThreshold"] * probe["periodSeconds"] >= MIN_STARTUP_S


def test_grace_period_covers_prestop_and_drain() -> None:
    cfg = _server_config()
    sleep_s = CONTAINER["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert sleep_s >= 5, "endpoints need a few seconds to drop the pod before SIGTERM"
    grace = POD["terminationGracePeriodSeconds"]
    assert grace >= sleep_s + cfg.drain_timeout_s + STOP_MARGIN_S, (
        f"terminationGracePeriodSeconds {grace} < preStop {sleep_s} + VOICE_DRAIN_TIMEOUT "
        f"{cfg.drain_timeout_s:g} + {STOP_MARGIN_S} s to stop: the kubelet would SIGKILL mid-drain")
    # A session live at SIGTERM ends on its own before the drain would cut it.
    assert cfg.max_session_s is not None and cfg.max_session_s < cfg.drain_timeout_s


# ---- autoscaling -------------------------------------------------------------------------------------------


def test_hpa_scales_the_deployment() -> None:
    ref = HPA["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"], ref["name"]) == ("apps/v1", "Deployment",
                                                             DEPLOYMENT["metadata"]["name"])
    assert 1 <= HPA["spec"]["minReplicas"] <= HPA["spec"]["maxReplicas"]
    assert "replicas" not in DEPLOYMENT["spec"], "the HPA owns the count; apply would reset it"


def test_hpa_metric_is_the_adapter_rules() -> None:
    (metric,) = HPA["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == RULE["name"]["as"]
    target = metric["pods"]["target"]
    assert target["type"] == "AverageValue"
    value = _quantity(target["averageValue"])
    assert 0 < value < 1, "an occupancy target must leave free slots: a session past capacity is refused"
    assert value == Fraction(capacity.HPA_TARGET), "deploy/capacity.py's HPA_TARGET differs from the HPA"


def test_adapter_values_have_the_keys_the_chart_reads() -> None:
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["prometheus"]["url"].startswith("http") and isinstance(values["prometheus"]["port"], int)
    assert values["rules"]["default"] is False
    assert set(RULE) == {"seriesQuery", "resources", "name", "metricsQuery"}
    # A Pods metric needs each series tied to its pod (and namespace).
    assert RULE["resources"]["overrides"] == {"namespace": {"resource": "namespace"},
                                              "pod": {"resource": "pod"}}
    for placeholder in ("<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in RULE["metricsQuery"]


def _exported() -> dict[str, str]:
    """Metric name -> type, from what `GET /metrics` renders."""
    kinds: dict[str, str] = {}
    for line in ServerMetrics(["inference-0"]).render().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            kinds[name] = kind
    return kinds


def test_adapter_rule_reads_series_the_server_exports() -> None:
    exported = _exported()
    series = re.findall(r"\b([a-z_][a-z0-9_]*)\{", RULE["seriesQuery"] + " " + RULE["metricsQuery"])
    assert set(series) == {"voice_sessions_active", "voice_sessions_max"}, series
    for name in series:
        assert exported.get(name) == "gauge", f"{name} is not a gauge /metrics exports: {exported}"
    (discovered,) = re.findall(r"^([a-z_][a-z0-9_]*)\{", RULE["seriesQuery"])
    assert re.search(RULE["name"]["matches"], discovered)
    # Both series carry the namespace and pod labels the overrides map.
    assert 'namespace!=""' in RULE["seriesQuery"] and 'pod!=""' in RULE["seriesQuery"]
    # A pod reports 0 slots until its model is loaded: the division must drop it, not yield NaN/Inf.
    guarded = r"voice_sessions_max\{[^}]*\}\)\s*by\s*\(<<\.GroupBy>>\)\s*>\s*0\)"
    assert re.search(guarded, RULE["metricsQuery"])


def test_scale_down_is_slower_than_scale_up() -> None:
    behavior = HPA["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    down = behavior["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 600, "a pod removed and needed again costs a cold start"
    for policy in down["policies"]:
        assert policy["type"] == "Pods" and policy["value"] == 1 and policy["periodSeconds"] >= 300


# ---- capacity ----------------------------------------------------------------------------------------------


def test_capacity_table_in_readme_is_current() -> None:
    printed = capacity.table(capacity.RESULTS.read_text(encoding="utf-8"))
    in_readme = capacity.table_in((K8S / "README.md").read_text(encoding="utf-8"))
    assert in_readme == printed, "refresh it: python deploy/capacity.py --readme"


def test_capacity_runs_as_a_script() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "deploy" / "capacity.py")], capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout == capacity.table(capacity.RESULTS.read_text(encoding="utf-8"))


def test_capacity_uses_the_measured_cpu_figure() -> None:
    results = capacity.RESULTS.read_text(encoding="utf-8")
    cpu = capacity.cpu_figure(results)
    assert cpu.sessions_per_pod == 32
    # A marker that drifts from the measured line is refused rather than used.
    with pytest.raises(ValueError, match="marker says 31"):
        capacity.cpu_figure(results.replace("cpu_demo_sessions_per_pod=32", "cpu_demo_sessions_per_pod=31"))


def test_capacity_arithmetic_is_exact() -> None:
    assert capacity.pods_needed(21, 3, "0.7") == 10  # with a float 0.7: 10.000000000000002, so 11
    assert capacity.pods_needed(100, 32, "0.7") == 5
    assert capacity.pods_needed(100, 32, "1") == 4
    assert capacity.pods_needed(10_000, 10, "1") == 1_000


def test_capacity_reads_a_gpu_figure_only_from_a_gpu_run() -> None:
    def block(body: str) -> str:
        return f"{capacity.GPU_BEGIN}\n{body}\n{capacity.GPU_END}\n"

    gpu = ("**GPU check** on NVIDIA H100 80GB HBM3, 2026-01-01 00:00 UTC: torch 2, CUDA 12, moshi 0.2; "
           "Moshi 7B shape, random bf16 weights. Command: `bench/gpu_check`.\n\n| check | figure |\n"
           "| --- | --- |\n| (b) most sessions held | 24 |")
    assert capacity.gpu_figure(block(gpu)).sessions_per_pod == 24
    tiny = gpu.replace("NVIDIA H100 80GB HBM3", "cpu").replace("Moshi 7B shape", "the demo model (--tiny)")
    assert capacity.gpu_figure(block(tiny)).sessions_per_pod is None
    assert capacity.gpu_figure(block("| — | — | not run: no GPU was available |")).sessions_per_pod is None
