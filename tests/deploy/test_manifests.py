"""Every file under ``deploy/`` parses and agrees with the project it deploys.

``deploy/`` holds manifests only (README.md, "Deployment"); nothing here runs a
cluster. What can be checked without one is checked against the project's own
declarations, so a renamed metric, CLI flag, spec key, port or version breaks this
suite instead of a deployment:

- YAML and JSON parse; Kubernetes objects have ``apiVersion``, ``kind`` and a name.
- Images are ``landscape-probe:<pyproject version>``, the tag the Dockerfile and
  README declare; Ray and torch versions agree between the Dockerfile, the KubeRay
  manifests and the Makefile.
- Every ``probe`` invocation (container command/args, RayJob entrypoints) parses with
  ``cluster.cli._parser()``; the spec it names is a key of a ConfigMap mounted at
  that path in the pod that runs it; the spec loads with ``cluster.spec.load_spec``
  (with the invocation's ``--set`` overrides); its data paths lie on the shared PVC
  in every pod that touches them; a ``ray://`` address names the RayCluster's head
  Service and client port.
- Ports are the project's: ``cluster.metrics.DEFAULT_PORT`` and the Ray ports of
  ``deploy/kuberay/raycluster.yaml``; port names mean one number everywhere; Services
  and Prometheus targets point at declared ports.
- The monitoring manifests (rules, scrape config, dashboard) are checked against
  ``cluster.metrics`` in ``test_monitoring.py``.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml
from monitoring_files import alert_rules, declared_labels

from cluster.audit import parse_duration
from cluster.cli import _parser
from cluster.metrics import DEFAULT_PORT
from cluster.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "landscape-probe.json"
RAYCLUSTER = DEPLOY / "kuberay" / "raycluster.yaml"

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"landscape-probe:{VERSION}"

# rayStartParams of the standing cluster's head whose values are the project's Ray ports.
RAY_PORT_PARAMS = ("port", "dashboard-port", "ray-client-server-port", "metrics-export-port")
# Non-probe metrics the rules may use: Prometheus's own scrape health.
PROMETHEUS_METRICS = {"up"}
# Labels Prometheus puts on every scraped series.
TARGET_LABELS = {"job", "instance"}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
    "atan2",
}


# ---------------------------------------------------------------- loading


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _load_all(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _objects() -> list[tuple[Path, dict]]:
    """Kubernetes objects: every YAML document outside deploy/prometheus/."""
    return [(p, doc) for p in _yaml_files() if PROMETHEUS not in p.parents for doc in _load_all(p)]


def _by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in _objects() if doc["kind"] == kind]


def _named(kind: str, name: str) -> dict:
    found = [doc for doc in _by_kind(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} named {name!r} under deploy/, found {len(found)}"
    return found[0]


def _pods(node) -> Iterator[dict]:
    """Every pod spec (a mapping with a ``containers`` list) anywhere inside ``node``."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for value in node.values():
            yield from _pods(value)
    elif isinstance(node, list):
        for value in node:
            yield from _pods(value)


def _ray_cluster_specs(node) -> Iterator[dict]:
    """RayCluster specs: a RayCluster's ``spec`` and every ``rayClusterSpec`` (RayJob, RayCronJob)."""
    if isinstance(node, dict):
        if node.get("kind") == "RayCluster":
            yield node["spec"]
        if isinstance(node.get("rayClusterSpec"), dict):
            yield node["rayClusterSpec"]
        for key, value in node.items():
            if key != "rayClusterSpec":
                yield from _ray_cluster_specs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _ray_cluster_specs(value)


def _group_pods(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def _head_params() -> dict:
    return _load_all(RAYCLUSTER)[0]["spec"]["headGroupSpec"]["rayStartParams"]


def _project_ports() -> dict[str, int]:
    """Port numbers the project uses, by where they come from."""
    params = _head_params()
    missing = [k for k in RAY_PORT_PARAMS if k not in params]
    assert not missing, f"{RAYCLUSTER.name}: head rayStartParams must spell out {', '.join(missing)}"
    return {"cluster.metrics.DEFAULT_PORT": DEFAULT_PORT, **{k: int(params[k]) for k in RAY_PORT_PARAMS}}


# ------------------------------------------------------- probe invocations


@dataclass(frozen=True, repr=False)
class Invocation:
    """One ``probe ...`` command found in a manifest, with the pod it runs in and the
    pods of the Ray cluster beside it (RayJob, RayCronJob; empty otherwise)."""

    where: str
    argv: list[str]
    pod: dict
    container: dict
    cluster_pods: list[dict]

    def args(self):
        try:
            return _parser().parse_args(self.argv[1:])
        except SystemExit:
            pytest.fail(f"{self.where}: `{shlex.join(self.argv)}` does not parse with cluster.cli._parser()")

    def __repr__(self) -> str:
        return self.where


def _invocations() -> list[Invocation]:
    found = []
    for path, doc in _objects():
        rel = path.relative_to(ROOT)
        name = f"{rel}:{doc['kind']}/{doc['metadata']['name']}"
        # RayJob / RayCronJob entrypoints run on the head pod of the cluster beside them.
        stack = [doc]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                if isinstance(node.get("entrypoint"), str):
                    argv = shlex.split(node["entrypoint"])
                    assert argv and argv[0] == "probe", f"{name}: entrypoint does not run probe: {node['entrypoint']!r}"
                    cluster = node.get("rayClusterSpec")
                    assert cluster, f"{name}: an entrypoint needs a rayClusterSpec beside it to know where it runs"
                    head = cluster["headGroupSpec"]["template"]["spec"]
                    found.append(
                        Invocation(f"{name} entrypoint", argv, head, head["containers"][0], _group_pods(cluster))
                    )
                stack.extend(node.values())
            elif isinstance(node, list):
                stack.extend(node)
        for pod in _pods(doc):
            for container in pod["containers"]:
                argv = [*container.get("command", []), *container.get("args", [])]
                if argv and argv[0] == "probe":
                    found.append(
                        Invocation(f"{name} container {container['name']}", [str(a) for a in argv], pod, container, [])
                    )
    return found


def _submitted_to(inv: Invocation) -> dict:
    """The RayCluster spec that ``probe submit --address http://HOST:PORT`` reaches: KubeRay names the
    head Service ``<name>-head-svc``; the port is its dashboard (Jobs API) port."""
    address = inv.args().address
    m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", address)
    assert m, f"{inv}: cannot read the Jobs API address {address!r}"
    host, port = m.group(1), int(m.group(2))
    names = [rc["metadata"]["name"] for rc in _by_kind("RayCluster")]
    assert host.endswith("-head-svc") and host[: -len("-head-svc")] in names, (
        f"{inv}: {host} is not the head Service KubeRay creates for a RayCluster here ({names} -> <name>-head-svc)"
    )
    cluster = _named("RayCluster", host[: -len("-head-svc")])["spec"]
    dashboard = int(cluster["headGroupSpec"]["rayStartParams"]["dashboard-port"])
    assert port == dashboard, f"{inv}: {address} is not the cluster's dashboard (Jobs API) port {dashboard}"
    return cluster


def _job(inv: Invocation):
    """``(args, pod, container)`` of what an invocation runs where: for ``probe submit --verb V
    --verb-args A`` the submitted ``probe V SPEC A`` on the head of the cluster it submits to."""
    args = inv.args()
    if args.verb != "submit":
        return args, inv.pod, inv.container
    job = [args.verb_name, args.spec, *shlex.split(args.verb_args)]
    for o in args.overrides:
        job += ["--set", o]
    head = _submitted_to(inv)["headGroupSpec"]["template"]["spec"]
    try:
        return _parser().parse_args(job), head, head["containers"][0]
    except SystemExit:
        pytest.fail(f"{inv}: the submitted `probe {shlex.join(job)}` does not parse with cluster.cli._parser()")


def _configmap_file(inv: Invocation, path: str) -> tuple[str, str]:
    """(ConfigMap name, key) that provides ``path`` inside the invocation's container."""
    target = PurePosixPath(path)
    volumes = {v["name"]: v for v in inv.pod.get("volumes", [])}
    for mount in inv.container.get("volumeMounts", []):
        root = PurePosixPath(mount["mountPath"])
        if root not in target.parents:
            continue
        volume = volumes.get(mount["name"])
        assert volume is not None, f"{inv}: volumeMount {mount['name']!r} has no volume"
        assert "configMap" in volume, f"{inv}: {path} is on volume {mount['name']!r}, which is not a ConfigMap"
        relative = str(target.relative_to(root))
        items = volume["configMap"].get("items")
        key = next((i["key"] for i in items if i["path"] == relative), None) if items else relative
        assert key is not None, f"{inv}: ConfigMap volume {mount['name']!r} projects no item to {relative!r}"
        return volume["configMap"]["name"], key
    pytest.fail(f"{inv}: no volumeMount of the container provides {path}")


def _spec_of(inv: Invocation, tmp_path: Path):
    """The spec an invocation names, loaded from the mounted ConfigMap key with its overrides."""
    args = inv.args()
    cm_name, key = _configmap_file(inv, args.spec)
    data = _named("ConfigMap", cm_name).get("data", {})
    assert key in data, f"{inv}: ConfigMap {cm_name!r} has no key {key!r} (keys: {', '.join(data)})"
    spec_file = tmp_path / key
    spec_file.write_text(data[key])
    return load_spec(spec_file, args.overrides)


def _specs(tmp_path: Path) -> list[tuple[Invocation, object]]:
    """(invocation, loaded spec) for every invocation that names a spec."""
    found = []
    for i, inv in enumerate(_invocations()):
        if hasattr(inv.args(), "spec"):
            folder = tmp_path / str(i)
            folder.mkdir()
            found.append((inv, _spec_of(inv, folder)))
    return found


def _pvc_mounts(pod: dict) -> dict[PurePosixPath, str]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {}
    for container in pod["containers"]:
        for m in container.get("volumeMounts", []):
            claim = volumes.get(m["name"], {}).get("persistentVolumeClaim")
            if claim:
                mounts[PurePosixPath(m["mountPath"])] = claim["claimName"]
    return mounts


def _static_prefix(path: str) -> PurePosixPath:
    """The folder part of a path or glob before its first wildcard."""
    parts = []
    for part in PurePosixPath(path).parts:
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return PurePosixPath(*parts)


def _ray_cluster_for_address(address: str, inv: Invocation) -> dict:
    """The RayCluster spec that ``ray://HOST:PORT`` reaches: KubeRay names the head Service ``<name>-head-svc``."""
    m = re.fullmatch(r"ray://([a-z0-9-]+):(\d+)", address)
    assert m, f"{inv}: cannot read Ray client address {address!r}"
    host, port = m.group(1), int(m.group(2))
    names = [rc["metadata"]["name"] for rc in _by_kind("RayCluster")]
    assert host.endswith("-head-svc") and host[: -len("-head-svc")] in names, (
        f"{inv}: {host} is not the head Service KubeRay creates for a RayCluster here ({names} -> <name>-head-svc)"
    )
    cluster = _named("RayCluster", host[: -len("-head-svc")])
    client_port = int(cluster["spec"]["headGroupSpec"]["rayStartParams"]["ray-client-server-port"])
    assert port == client_port, f"{inv}: {address} does not use the cluster's Ray client port {client_port}"
    return cluster["spec"]


# ======================================================================== tests


def test_every_yaml_and_json_file_parses():
    files = _yaml_files()
    assert len(files) >= 10, f"expected the deploy/ manifests, found {[str(p) for p in files]}"
    for path in files:
        assert _load_all(path), f"{path.relative_to(ROOT)} holds no YAML document"
    for path in DEPLOY.rglob("*.json"):
        json.loads(path.read_text())


def test_kubernetes_objects_are_well_formed():
    seen = set()
    for path, doc in _objects():
        rel = path.relative_to(ROOT)
        assert isinstance(doc, dict) and {"apiVersion", "kind", "metadata"} <= doc.keys(), (
            f"{rel}: not a Kubernetes object"
        )
        name = doc["metadata"].get("name")
        assert name and "namespace" not in doc["metadata"], f"{rel}: objects are named and namespace-free (kubectl -n)"
        assert (doc["kind"], name) not in seen, f"{rel}: a second {doc['kind']} named {name!r}"
        seen.add((doc["kind"], name))
    kinds = {kind for kind, _ in seen}
    assert {
        "RayCluster",
        "RayJob",
        "RayCronJob",
        "CronJob",
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
    } <= kinds
    for doc in _by_kind("RayCluster") + _by_kind("RayJob") + _by_kind("RayCronJob"):
        assert doc["apiVersion"] == "ray.io/v1", f"{doc['kind']}/{doc['metadata']['name']}: KubeRay's API is ray.io/v1"


def test_images_are_the_one_the_recipe_builds():
    images = [
        (path.relative_to(ROOT), c["image"])
        for path, doc in _objects()
        for pod in _pods(doc)
        for c in [*pod["containers"], *pod.get("initContainers", [])]
    ]
    assert images
    wrong = [f"{p}: {img}" for p, img in images if img != IMAGE]
    assert not wrong, f"every container must run {IMAGE} (pyproject version {VERSION}); got: {wrong}"

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\s*$", dockerfile, re.M)
    assert re.search(rf"^ARG VERSION={re.escape(VERSION)}\s*$", dockerfile, re.M), (
        f"deploy/Dockerfile: ARG VERSION must equal pyproject's version {VERSION}"
    )
    build = f"docker build -f deploy/Dockerfile -t {IMAGE} ."
    for doc in (DEPLOY / "Dockerfile", DEPLOY / "README.md"):
        assert build in doc.read_text(), f"{doc.relative_to(ROOT)} must document `{build}`"


def test_ray_and_torch_versions_agree():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.M).group(1)
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)", dockerfile, re.M).group(1)
    for _, doc in _objects():
        for cluster in _ray_cluster_specs(doc):
            assert cluster.get("rayVersion") == ray_version, (
                f"{doc['kind']}/{doc['metadata']['name']}: "
                f"rayVersion {cluster.get('rayVersion')!r} != Dockerfile's {ray_version}"
            )
    makefile_pin = re.search(r"^TORCH_CPU \?= torch==(\S+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert torch_version == makefile_pin, f"Dockerfile torch {torch_version} != Makefile's CPU pin {makefile_pin}"


def test_probe_invocations_parse_with_the_cli():
    invocations = _invocations()
    verbs = sorted(_job(inv)[0].verb for inv in invocations)
    # RayJob (run), RayCronJob, CronJob and Deployment (audit, the last two submitted as Ray jobs)
    assert verbs.count("run") >= 1 and verbs.count("audit") >= 3, f"probe invocations found: {invocations}"


def test_metrics_endpoints_are_reachable_from_prometheus():
    for inv in _invocations():
        args, pod, container = _job(inv)
        serves = getattr(args, "metrics_port", None) is not None or getattr(args, "every", None) is not None
        if not serves:
            continue
        port = args.metrics_port if args.metrics_port is not None else DEFAULT_PORT
        assert port == DEFAULT_PORT, (
            f"{inv}: --metrics-port {port} is not cluster.metrics.DEFAULT_PORT ({DEFAULT_PORT})"
        )
        assert args.metrics_addr == "0.0.0.0", (
            f"{inv}: metrics bound to {args.metrics_addr}, unreachable from Prometheus"
        )
        declared = [p["containerPort"] for p in container.get("ports", [])]
        assert port in declared, f"{inv}: serves metrics on {port} but the container declares ports {declared}"
        if getattr(args, "every", None):  # the audit service: Service probe-audit must select the pod it runs in
            selector = _named("Service", "probe-audit")["spec"]["selector"]
            labels = next(
                (g["template"]["metadata"]["labels"] for _, doc in _objects() for rc in _ray_cluster_specs(doc)
                 for g in [rc["headGroupSpec"]] if g["template"]["spec"] == pod),
                inv.pod.get("labels", {}),
            )  # fmt: skip
            assert selector.items() <= labels.items(), f"{inv}: Service probe-audit {selector} misses {labels}"


def test_specs_come_from_mounted_configmaps_and_load(tmp_path):
    specs = _specs(tmp_path)
    assert len(specs) >= 4 and all(spec.name for _, spec in specs)


def test_every_configmap_spec_loads_with_absolute_paths(tmp_path):
    loaded = 0
    for cm in _by_kind("ConfigMap"):
        for key, text in cm.get("data", {}).items():
            if not key.endswith((".yaml", ".yml")):
                continue
            (tmp_path / key).write_text(text)
            spec = load_spec(tmp_path / key)
            loaded += 1
            # load_spec resolves relative paths against the spec's folder: in a pod that is
            # the read-only ConfigMap mount, so a relative path would come back under tmp_path.
            inside = [p for p in (spec.output.path, *spec.model.checkpoints) if Path(p).is_relative_to(tmp_path)]
            assert not inside, f"ConfigMap {cm['metadata']['name']}/{key}: use absolute paths, got {inside}"
    assert loaded >= 2, "expected the job and audit specs in a ConfigMap"


def test_spec_data_paths_are_on_the_shared_volume(tmp_path):
    for inv, spec in _specs(tmp_path):
        pods = [inv.pod, *inv.cluster_pods]
        if inv.args().verb == "submit":  # the job runs on the cluster it is submitted to
            pods += _group_pods(_submitted_to(inv))
        address = spec.cluster.address or ""
        if address.startswith("ray://"):
            pods += _group_pods(_ray_cluster_for_address(address, inv))
        paths = [PurePosixPath(spec.output.path), *(_static_prefix(c) for c in spec.model.checkpoints)]
        claims = set()
        for pod in pods:
            mounts = _pvc_mounts(pod)
            for path in paths:
                under = [root for root in mounts if root == path or root in path.parents]
                assert under, f"{inv}: {path} is on no PersistentVolumeClaim in a pod of its cluster (mounts: {mounts})"
                claims.add(mounts[under[0]])
        assert len(claims) == 1, f"{inv}: pods see the spec's data on different claims {claims}"
        claim = claims.pop()
        pvc = _named("PersistentVolumeClaim", claim)
        if len(pods) > 1:
            assert "ReadWriteMany" in pvc["spec"]["accessModes"], f"{claim}: pods on several nodes need ReadWriteMany"


def test_audits_drive_ray_through_the_jobs_api_not_the_ray_client(tmp_path):
    """Ray's documentation steers ML workloads from Ray Client to the Jobs API: every audit is a Ray
    job (a RayJob's entrypoint, or `probe submit` to the standing cluster's dashboard port), and no
    spec attaches through ray://."""
    for inv, spec in _specs(tmp_path):
        assert not (spec.cluster.address or "").startswith("ray://"), f"{inv}: attaches through the Ray client"
    audits = [inv for inv in _invocations() if _job(inv)[0].verb == "audit"]
    assert len(audits) >= 3
    for inv in audits:
        assert inv.cluster_pods or inv.args().verb == "submit", f"{inv}: runs the audit outside a Ray job"
        if inv.args().verb == "submit":
            _submitted_to(inv)  # the head Service's Jobs API port


def test_audit_pods_stop_their_job_gracefully_within_the_grace_period():
    """A pod that follows a submitted audit asks Ray to stop it on SIGTERM; an `--every` audit then
    finishes its pass within RAY_JOB_STOP_WAIT_TIME_S, which the pod's grace period must exceed."""
    followers = [inv for inv in _invocations() if inv.args().verb == "submit" and _job(inv)[0].verb == "audit"]
    assert followers
    for inv in followers:
        args, grace = inv.args(), inv.pod.get("terminationGracePeriodSeconds", 30)
        assert args.stop_on_signal, f"{inv}: without --stop-on-signal a stopped pod leaves its job running"
        if _job(inv)[0].every:
            env = json.loads(args.runtime_env or "{}").get("env_vars", {})
            wait_s = int(env.get("RAY_JOB_STOP_WAIT_TIME_S", 3))  # Ray's default: 3 s, then SIGKILL
            assert wait_s >= 2 * 60 * 15, f"{inv}: RAY_JOB_STOP_WAIT_TIME_S={wait_s} leaves a pass no time to finish"
            assert grace > wait_s, f"{inv}: terminationGracePeriodSeconds {grace} <= RAY_JOB_STOP_WAIT_TIME_S {wait_s}"


def test_ray_start_params_use_the_projects_ports():
    ports = _project_ports()
    expected = {k: str(v) for k, v in ports.items() if k in RAY_PORT_PARAMS}
    for _, doc in _objects():
        for cluster in _ray_cluster_specs(doc):
            groups = [("head", cluster["headGroupSpec"])] + [
                (g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])
            ]
            for group, spec in groups:
                params = spec.get("rayStartParams", {})
                where = f"{doc['kind']}/{doc['metadata']['name']} group {group}"
                not_str = {k: v for k, v in params.items() if not isinstance(v, str)}
                assert not not_str, f"{where}: KubeRay takes rayStartParams as strings, got {not_str}"
                for key, value in params.items():
                    if key in expected:
                        assert value == expected[key], f"{where}: {key}={value}, raycluster.yaml uses {expected[key]}"
            head = cluster["headGroupSpec"]["rayStartParams"]
            assert head.get("dashboard-host") == "0.0.0.0", (
                "the dashboard must listen beyond loopback for the head Service"
            )
            assert "metrics-export-port" in head, "set Ray's metrics-export-port explicitly: Prometheus scrapes it"


def test_container_and_service_ports_are_the_projects():
    allowed = set(_project_ports().values())
    by_name: dict[str, set[int]] = {}
    for path, doc in _objects():
        for pod in _pods(doc):
            for container in pod["containers"]:
                for p in container.get("ports", []):
                    where = f"{path.relative_to(ROOT)}: {container['name']} port {p}"
                    assert p["containerPort"] in allowed, f"{where} is none of the project's ports {sorted(allowed)}"
                    assert p.get("name"), f"{where} has no name (Services and probes refer to ports by name)"
                    by_name.setdefault(p["name"], set()).add(p["containerPort"])
    clashes = {name: sorted(nums) for name, nums in by_name.items() if len(nums) > 1}
    assert not clashes, f"a port name must mean one port everywhere: {clashes}"
    for svc in _by_kind("Service"):
        for p in svc["spec"]["ports"]:
            where = f"Service/{svc['metadata']['name']} port {p['name']}"
            target = p.get("targetPort", p["port"])
            number = by_name.get(target, {None}).copy().pop() if isinstance(target, str) else target
            assert number is not None, f"{where}: targetPort {target!r} names no container port"
            assert p["port"] in allowed and number == p["port"], f"{where}: {p['port']} -> {target} ({number})"


def test_prometheus_targets_are_declared_services_and_ports():
    allowed = set(_project_ports().values())
    services = {svc["metadata"]["name"]: svc for svc in _by_kind("Service")}
    config = _load_all(PROMETHEUS / "prometheus.yml")[0]
    targets = []
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for t in static["targets"]:
                host, port = t.rsplit(":", 1)
                targets.append((job["job_name"], host, int(port)))
        for dns in job.get("dns_sd_configs", []):
            targets += [(job["job_name"], name, int(dns["port"])) for name in dns["names"]]
        assert not job.get("kubernetes_sd_configs"), "Debian's promtool cannot check kubernetes_sd_configs"
    assert targets
    for job, host, port in targets:
        assert port in allowed, f"scrape job {job}: port {port} is none of the project's ports {sorted(allowed)}"
        service = host.split(".")[0]
        assert service in services, f"scrape job {job}: {host} names no Service under deploy/"
        ports = [p["port"] for p in services[service]["spec"]["ports"]]
        assert port in ports, f"scrape job {job}: Service {service} exposes {ports}, not {port}"
    # A probe label named like one Prometheus sets would be renamed exported_<label> unless
    # the scrape job honors labels (and then it would replace the scrape job's own).
    clashing = {name for name, labels in declared_labels().items() if labels & TARGET_LABELS}
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    probe_jobs = {j for j, _, p in targets if p == DEFAULT_PORT}
    assert probe_jobs, "no scrape job reaches cluster.metrics.DEFAULT_PORT"
    assert not clashing or all(jobs[j].get("honor_labels") for j in probe_jobs), (
        f"{sorted(clashing)} declare a label in {sorted(TARGET_LABELS)}: "
        f"scrape jobs {sorted(probe_jobs)} need honor_labels"
    )


def test_stale_audit_alert_allows_for_the_audit_interval():
    stale = next(r for r in alert_rules() if "landscape_probe_audit_last_success_timestamp_seconds" in r["expr"])
    threshold_s = float(re.search(r">\s*([\d.]+)", stale["expr"]).group(1))
    jobs = [_job(inv)[0] for inv in _invocations()]
    intervals = [a.every for a in jobs if a.verb == "audit" and a.every]
    assert intervals, "no `probe audit --every` service under deploy/"
    for every in intervals:
        assert threshold_s >= 2 * parse_duration(every), (
            f"{stale['alert']} fires after {threshold_s:g} s, under 2 audit intervals of {every}: it would flap"
        )
