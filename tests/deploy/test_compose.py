"""docker-compose.yml, the Dockerfile, haproxy and the Kubernetes manifests, checked structurally (there is
no Docker engine in CI): every cme command is a valid `cme` command line, every file and volume exists,
the Prometheus targets are exactly the compose services and their metrics ports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from services.cli import build_parser
from shared.redis_acl import ACL_FILE, K8S_SECRET, ROLES, URL_ENV, write_deploy_secrets
from tests.deploy import COMPOSE, DEPLOY, PROMETHEUS, PROMETHEUS_LOCAL, ROOT, load_yaml

SERVICE_COMMANDS = {"matcher", "gateway", "feeds"}
DOCKERFILE = DEPLOY / "Dockerfile"
HAPROXY = DEPLOY / "haproxy" / "haproxy.cfg"
K8S = DEPLOY / "k8s" / "cme.yaml"
SECRETS = DEPLOY / "secrets"  # written by `cme redis-secrets`, git-ignored


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `cme redis-secrets --out deploy/secrets` writes, written to a temporary directory instead."""
    out = tmp_path_factory.mktemp("secrets")
    write_deploy_secrets(out)
    return out


def env_file(path: Path) -> dict[str, str]:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)


def in_secrets(source: str) -> str | None:
    """The file name, if a compose path points into deploy/secrets/."""
    path = (DEPLOY / source).resolve()
    return path.name if path.parent == SECRETS else None


def compose() -> dict[str, Any]:
    data: dict[str, Any] = load_yaml(COMPOSE)
    return data


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def cme_services() -> dict[str, dict[str, Any]]:
    """Compose services that run our image (built from deploy/Dockerfile)."""
    return {name: s for name, s in services().items() if "build" in s}


def parse(argv: list[str]) -> Any:
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse exits on a bad command line
        raise AssertionError(f"`cme {' '.join(argv)}` is not a valid command line") from exc


def bind_mounts(service: dict[str, Any]) -> list[tuple[Path, str]]:
    """(source in the repo, target in the container) of each bind mount."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            mounts.append(((DEPLOY / source).resolve(), target))
    return mounts


def scrape_targets(config: Path) -> dict[str, set[str]]:
    return {
        job["job_name"]: {t for sc in job["static_configs"] for t in sc["targets"]}
        for job in load_yaml(config)["scrape_configs"]
    }


def test_compose_parses() -> None:
    data = compose()
    assert data["name"] == "cme"
    assert set(services()) >= {"redis", "matcher", "prometheus", "grafana"}


def test_topology_one_matcher_two_gateways_two_feeds() -> None:
    commands = [s["command"][0] for s in cme_services().values()]
    assert commands.count("matcher") == 1, "exactly one matcher per symbol stream"
    assert commands.count("gateway") == 2
    assert commands.count("feeds") == 2


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in services().items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert context == ROOT, f"{name}: build context must be the repository root"
            assert (context / service["build"]["dockerfile"]).resolve() == DOCKERFILE
        else:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag ({image})"


@pytest.mark.parametrize("name", sorted(cme_services()))
def test_cme_commands_are_valid(name: str, generated: Path) -> None:
    service = cme_services()[name]
    args = parse(service["command"])
    assert args.command in SERVICE_COMMANDS, f"{name}: runs `cme {args.command}`"
    assert args.instance == name, f"{name}: --instance should be the compose service name"
    assert args.metrics_port == 9100
    assert not any("--redis-url" in a for a in service["command"]), f"{name}: a password on the command line"
    # Each service logs in as its own ACL user, from its own env file (CME_REDIS_URL).
    assert in_secrets(service["env_file"]) == f"{args.command}.env", f"{name}: env_file {service['env_file']}"
    redis = urlparse(env_file(generated / f"{args.command}.env")[URL_ENV])
    assert redis.scheme == "redis" and redis.hostname in services() and redis.username == args.command
    assert "redis" in service["depends_on"]
    if hasattr(args, "host"):
        assert args.host == "0.0.0.0", f"{name}: must listen on every interface of its container"
    metrics_host = args.metrics_host or getattr(args, "host", None)  # as `cme` resolves it
    assert metrics_host == "0.0.0.0", f"{name}: Prometheus cannot scrape /metrics on {metrics_host}"
    if args.command == "matcher":
        targets = [target for volume in service["volumes"] for target in [volume.split(":")[1]]]
        assert args.data_dir in targets, "the matcher's checkpoints must live on a volume"


def test_redis_is_7_with_aof_on_a_volume() -> None:
    redis = services()["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])
    assert "healthcheck" in redis


def test_redis_loads_the_generated_acl_and_its_health_check_logs_in(generated: Path) -> None:
    redis = services()["redis"]
    command = redis["command"]
    acl = command[command.index("--aclfile") + 1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in redis["volumes"]}
    assert in_secrets(mounts[acl]) == ACL_FILE and (generated / ACL_FILE).read_text().startswith(
        "user default off"
    )
    assert in_secrets(redis["env_file"]) == "admin.env"
    assert "REDISCLI_AUTH" in env_file(generated / "admin.env")
    assert "--user admin" in " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_generated_secrets_are_never_committed() -> None:
    ignore = (SECRETS / ".gitignore").read_text().split()
    assert ignore[-2:] == ["*", "!.gitignore"], "deploy/secrets/ must ignore everything but its .gitignore"


def test_volumes_and_files_exist(generated: Path) -> None:
    declared = set(compose().get("volumes") or {})
    used = set()
    for name, service in services().items():
        for source in [service["env_file"]] if "env_file" in service else []:
            secret = in_secrets(source)
            assert secret and (generated / secret).exists(), f"{name}: `cme redis-secrets` writes no {source}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if in_secrets(source):  # made by `cme redis-secrets`, not in the repository
                assert (generated / str(in_secrets(source))).exists(), f"{name}: {source} is not generated"
            elif source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_depends_on_and_ports() -> None:
    host_ports: list[str] = []
    for name, service in services().items():
        for dep in service.get("depends_on", []):
            assert dep in services(), f"{name} depends on unknown {dep}"
        for port in service.get("ports", []):
            host_ports.append(str(port).split(":")[0])
    assert len(set(host_ports)) == len(host_ports), f"a host port is published twice: {host_ports}"
    published = set(host_ports)
    assert {"8000", "8001", "8002", "9090", "3000"} <= published


def test_prometheus_scrapes_every_cme_service() -> None:
    jobs = scrape_targets(PROMETHEUS)
    expected: dict[str, set[str]] = {}
    for name, service in cme_services().items():
        args = parse(service["command"])
        expected.setdefault(args.command, set()).add(f"{name}:{args.metrics_port}")
    for job, targets in expected.items():
        assert jobs.get(job) == targets, f"job {job}: {jobs.get(job)} != {targets}"
    assert set(jobs) - set(expected) <= {"prometheus"}


def test_prometheus_mounts_its_config_and_rules() -> None:
    prometheus = services()["prometheus"]
    mounts = dict((target, source) for source, target in bind_mounts(prometheus))
    config_arg = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = Path(config_arg.split("=", 1)[1])
    source = mounts[str(config_path.parent)]
    assert source / config_path.name == PROMETHEUS
    for rule_file in load_yaml(PROMETHEUS)["rule_files"]:
        assert (source / rule_file).is_file(), rule_file
    assert any(port.endswith(":9090") for port in prometheus["ports"])


def test_local_prometheus_config() -> None:
    """deploy/prometheus/prometheus.local.yml scrapes `cme up` (ports 9100-9105) with the same rules."""
    local = load_yaml(PROMETHEUS_LOCAL)
    assert local["rule_files"] == load_yaml(PROMETHEUS)["rule_files"]
    targets = set().union(*scrape_targets(PROMETHEUS_LOCAL).values())
    assert targets == {f"127.0.0.1:{port}" for port in range(9100, 9106)}
    default = build_parser().parse_args(["up"])
    assert default.metrics_port == 9100


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert 'ENTRYPOINT ["cme"]' in text
    assert "pip install -e" not in text and "--editable" not in text
    assert re.search(r"^EXPOSE .*\b9100\b", text, re.M)
    copies = [
        line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line
    ]
    assert copies, "the Dockerfile copies the sources"
    for source in (s for sources in copies for s in sources):
        assert (ROOT / source).exists(), f"COPY {source}: no such file"
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd is not None
    parse(json.loads(cmd.group(1)))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "cme" in scripts, "the image's entry point is the `cme` script of pyproject.toml"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for needed in ("pyproject.toml", "README.md", "shared/", "services/"):
        assert f"!{needed}" in ignore, f"Dockerfile.dockerignore drops {needed}"


def haproxy_servers() -> dict[str, list[tuple[str, str, int]]]:
    """backend -> [(server name, host, port)]."""
    backends: dict[str, list[tuple[str, str, int]]] = {}
    current = None
    for line in HAPROXY.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "backend":
            current = words[1]
            backends[current] = []
        elif words[0] in {"frontend", "defaults", "global", "resolvers"}:
            current = None
        elif words[0] == "server" and current is not None:
            host, port = words[2].rsplit(":", 1)
            backends[current].append((words[1], host, int(port)))
    return backends


def test_haproxy_balances_every_gateway_and_feed() -> None:
    lb = services()["lb"]
    assert (HAPROXY, "/usr/local/etc/haproxy/haproxy.cfg") in bind_mounts(lb)
    backends = haproxy_servers()
    for backend, servers in backends.items():
        for name, host, port in servers:
            assert name == host and host in cme_services(), f"{backend}: unknown server {host}"
            args = parse(cme_services()[host]["command"])
            listening = {args.port} if args.command == "gateway" else {args.md_port, args.trades_port}
            assert port in listening, f"{backend}: {host} does not listen on {port}"
    for command, backend in (("gateway", "gateways"), ("feeds", "md_feeds"), ("feeds", "trade_feeds")):
        wanted = {n for n, s in cme_services().items() if s["command"][0] == command}
        assert {host for _, host, _ in backends[backend]} == wanted, backend
    assert set(lb["depends_on"]) == {n for n, s in cme_services().items() if s["command"][0] != "matcher"}


@pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)"
)
def test_haproxy_config_is_valid() -> None:
    proc = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def k8s_objects() -> list[dict[str, Any]]:
    import yaml

    return [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]


def test_k8s_manifests(generated: Path) -> None:
    objects = k8s_objects()
    workloads = {o["metadata"]["name"]: o for o in objects if o["kind"] in {"Deployment", "StatefulSet"}}
    assert set(workloads) == {"redis", "matcher", "gateway", "feeds"}
    assert workloads["matcher"]["kind"] == "StatefulSet" and workloads["matcher"]["spec"]["replicas"] == 1
    assert workloads["gateway"]["kind"] == workloads["feeds"]["kind"] == "Deployment"
    services_ = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    for name, workload in workloads.items():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"] == labels, name
        container = workload["spec"]["template"]["spec"]["containers"][0]
        if container["image"].startswith("cme"):
            args = parse([a.replace("$(POD_NAME)", "pod-0") for a in container["args"]])
            assert args.command == name
            assert not any("--redis-url" in a for a in container["args"]), f"{name}: a password in args"
            env = {e["name"]: e for e in container["env"]}
            ref = env[URL_ENV]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": K8S_SECRET, "key": f"{name}.url"}, f"{name}: {ref}"
            url = urlparse(secret_data(generated)[ref["key"]])
            assert url.hostname in services_ and url.username == name
            assert (args.metrics_host or getattr(args, "host", None)) == "0.0.0.0", f"{name}: metrics host"
            annotations = workload["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(args.metrics_port)
    for name, service in services_.items():
        assert service["spec"]["selector"] == workloads[name]["spec"]["template"]["metadata"]["labels"], name


def secret_data(generated: Path) -> dict[str, str]:
    secret = json.loads((generated / "k8s-secret.json").read_text())
    assert secret["metadata"] == {"name": K8S_SECRET, "namespace": "cme"}
    data: dict[str, str] = secret["stringData"]
    return data


def test_k8s_redis_uses_the_secrets_acl_only(generated: Path) -> None:
    redis = next(o for o in k8s_objects() if o["kind"] == "StatefulSet" and o["metadata"]["name"] == "redis")
    pod = redis["spec"]["template"]["spec"]
    container = pod["containers"][0]
    acl = container["args"][container["args"].index("--aclfile") + 1]
    mount = next(m for m in container["volumeMounts"] if acl.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == K8S_SECRET
    assert volume["secret"]["items"] == [{"key": ACL_FILE, "path": acl.rsplit("/", 1)[1]}], "no URLs in redis"
    auth = next(e for e in container["env"] if e["name"] == "REDISCLI_AUTH")["valueFrom"]["secretKeyRef"]
    assert auth["key"] in secret_data(generated) and "--user admin" in " ".join(
        container["readinessProbe"]["exec"]["command"]
    )
    assert set(secret_data(generated)) == {ACL_FILE, "admin.password", *(f"{user}.url" for user in ROLES)}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels, matchExpressions with In) against pod labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_k8s_network_policies() -> None:
    objects = k8s_objects()
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]
    pods = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objects
        if o["kind"] in {"Deployment", "StatefulSet"}
    }
    assert any(p["podSelector"] == {} and not p.get("ingress") for p in policies), "a default deny"
    prometheus = [{"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "prometheus"}]

    def allowed(pod: str, port: int) -> list[list[dict[str, Any]]]:
        """The `from` lists of every rule letting something reach `pod` on `port` ([] = anyone)."""
        found = []
        for policy in policies:
            if "Ingress" in policy["policyTypes"] and selects(policy["podSelector"], pods[pod]):
                for rule in policy.get("ingress", []):
                    if any(p["port"] == port for p in rule["ports"]):
                        found.append(rule.get("from", []))
        return found

    redis_from = allowed("redis", 6379)
    assert len(redis_from) == 1 and len(redis_from[0]) == 1
    peer = redis_from[0][0]
    assert set(peer) == {"podSelector"}, "Redis: pods of this namespace only"
    clients = {name for name, labels in pods.items() if selects(peer["podSelector"], labels)}
    assert clients == SERVICE_COMMANDS
    for pod in SERVICE_COMMANDS:
        rules = allowed(pod, 9100)
        assert rules and all(len(r) == 1 for r in rules), f"{pod}: /metrics from anyone"
        for (scraper,) in rules:
            selectors = [scraper["namespaceSelector"]["matchLabels"], scraper["podSelector"]["matchLabels"]]
            assert selectors == prometheus, f"{pod}: /metrics from {scraper}"
    for pod, port in (("gateway", 8000), ("feeds", 8001), ("feeds", 8002)):
        assert allowed(pod, port) == [[]], f"{pod}: clients on {port}"
    assert not allowed("matcher", 8000) and not allowed("redis", 9100)
