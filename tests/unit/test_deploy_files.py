"""The deployment files, checked offline (there is no container engine here): the Dockerfile,
docker-compose.yml as Debian's docker-compose resolves it with .env, the Postgres init script
run against a real Postgres, the Prometheus and Grafana configuration, and every Kubernetes
manifest validated against the schemas kubernetes-validate ships.

Beyond "the files parse", they are held to what the platform needs: each service's command
is accepted by that service's own flag parser, each stateful service has a database and a
role of its own that Postgres really creates (and that cannot reach another's), Prometheus'
rules turn a Consul entry into the instance's metrics address, only the edge is published,
and the copies that kustomize forces on us (the init script, the scrape rules) stay equal.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from scripts.postgres_server import PostgresServer, find_pg_bin
from services.cli import parse_args

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
INIT_SCRIPT = ROOT / "deploy" / "postgres" / "init" / "01-databases.sh"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
HAPROXY_CONFIG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
KUBERNETES = ROOT / "deploy" / "kubernetes"

# The platform: compose service / Kubernetes name (= Consul name) -> module under services/.
PLATFORM = {
    "users": "users",
    "catalog": "catalog",
    "payments": "payments",
    "delivery": "delivery",
    "orders": "orders",
    "notifications": "notifications",
    "order-history": "order_history",
    "gateway": "gateway",
}
STATELESS = {"gateway"}
STATEFUL = sorted(set(PLATFORM) - STATELESS)
# Those that publish (outbox relay) or consume events, and so need NATS up.
EVENTS = {"catalog", "delivery", "orders", "notifications", "order-history"}
GRPC_PORT, METRICS_PORT, GATEWAY_HTTP_PORT = 50051, 9464, 8081
# What an instance registers its metrics port as (mesh/server/mesh_server.py; the
# integration tests read it from real Consul entries, tests/integration/platform.py).
METRICS_META = "metrics_port"
# Published on the host: the UIs and the edge in front of the gateway, nothing else.
UI_PORTS = {"consul-server-1": {8500}, "jaeger": {16686}, "prometheus": {9090}, "grafana": {3000}}
EDGE_PORTS = {"edge": {8080, 8081}}
# gRPC probes are GA from 1.27; 1.30 and the newest schemas the package ships.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())


def role_of(service: str) -> str:
    return service.replace("-", "_")


def service_flags(module: str) -> tuple[str, Any]:
    """The Consul name and the own-flags function of services.<module> (as its __main__)."""
    main = importlib.import_module(f"services.{module}.__main__")
    return main.SERVICE, getattr(main, "flags", None)


def parse_service_command(module: str, argv: list[str]) -> argparse.Namespace:
    """argv parsed by the service's real parser (SystemExit 2 on a flag it does not know)."""
    name, flags = service_flags(module)
    return parse_args(name, argv, flags)


# --- the image ------------------------------------------------------------------------------


def dockerfile_stages() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The Dockerfile's ARGs before its first FROM, and its instructions stage by stage
    (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    global_args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((keyword, rest))
        elif keyword == "ARG":
            name, _, default = rest.partition("=")
            global_args[name] = default
    return global_args, stages


def test_the_image_runs_any_service_as_a_user_with_the_health_probe() -> None:
    global_args, stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder and the final image"
    final = dict(stages[-1])  # the last of each instruction in the final stage
    assert final["FROM"] == "python:${PYTHON_VERSION}-slim"
    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(required).contains(global_args["PYTHON_VERSION"])
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0"), "the final stage runs as a user that is not root"
    assert "python -m mesh.health_probe 127.0.0.1:${PORT}" in final["HEALTHCHECK"]
    assert "PORT=50051" in final["ENV"]
    assert final["ENTRYPOINT"] == '["python", "-m"]'
    assert final["WORKDIR"] == "/app"
    copied = [rest.split() for keyword, rest in stages[-1] if keyword == "COPY"]
    assert ["services/", "services/"] in copied, "services/ in /app, run from there"
    assert all(parts[0].startswith("--from=") for parts in copied if parts[0] != "services/")
    installs = " ".join(rest for keyword, rest in stages[0] if keyword == "RUN")
    assert 'pip install ./protos ".[platform]"' in installs


def test_the_image_carries_every_first_party_package_the_services_import() -> None:
    # A service importing scripts/ or tests/ would start here and fail in the image.
    carried = {"mesh", "meshkit", "meshctl", "foodmesh", "services"}
    first_party = {"mesh", "meshkit", "meshctl", "foodmesh", "services", "scripts", "tests"}
    imported: set[str] = set()
    for source in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    assert imported & first_party <= carried
    ignored = (ROOT / ".dockerignore").read_text().split()
    for package in ("mesh", "meshkit", "meshctl", "protos", "services", "pyproject.toml"):
        assert package not in ignored, f".dockerignore leaves {package} out of the build"


def test_the_platform_list_is_every_service_with_a_main() -> None:
    found = {path.parent.name for path in (ROOT / "services").glob("*/__main__.py")}
    assert found == set(PLATFORM.values()), "a new service needs its place in deploy/"


# --- docker-compose.yml ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """docker-compose.yml as `docker-compose config` resolves it: .env read, anchors merged."""
    docker_compose = shutil.which("docker-compose")
    assert docker_compose, "docker-compose not found: scripts/bootstrap.sh installs Debian's"
    # Only .env's values: none of this environment's (a POSTGRES_PASSWORD of the shell).
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    done = subprocess.run(
        [docker_compose, "-f", str(COMPOSE_FILE), "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    resolved: dict[str, Any] = yaml.safe_load(done.stdout)
    return resolved


def test_compose_config_accepts_the_file_and_pyyaml_reads_it(compose: dict[str, Any]) -> None:
    raw = yaml.safe_load(COMPOSE_FILE.read_text())  # merge keys and anchors included
    assert set(raw["services"]) == set(compose["services"])
    assert set(PLATFORM) <= set(compose["services"])


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(part) for part in cmd]


def published(service: dict[str, Any]) -> set[int]:
    ports = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published"):
                ports.add(int(port["published"]))
        else:
            parts = str(port).split(":")
            if len(parts) > 1:
                ports.add(int(parts[-2]))
    return ports


@pytest.mark.parametrize("name", sorted(PLATFORM))
def test_each_compose_service_runs_by_its_own_flags(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = compose["services"][name]
    argv = command(service)
    assert argv[0] == f"services.{PLATFORM[name]}", "the image's entrypoint is python -m"
    env = environment(service)
    for variable in ("DATABASE_URL", "NATS_URL"):
        if variable in env:
            monkeypatch.setenv(variable, env[variable])
        else:
            monkeypatch.delenv(variable, raising=False)
    args = parse_service_command(PLATFORM[name], argv[1:])
    assert (args.host, args.port, args.metrics_port) == ("0.0.0.0", GRPC_PORT, METRICS_PORT)
    assert args.metrics, "Prometheus finds the instance by its metrics port"
    if name in STATEFUL:
        assert args.database_url == env["DATABASE_URL"], "the service reads DATABASE_URL"
        assert args.nats_url == env["NATS_URL"]
    if name == "gateway":
        assert args.http_port == GATEWAY_HTTP_PORT
        policy = Path(str(args.gateway_policy))
        assert (ROOT / policy.relative_to("/app")).is_file(), "the policy file is in the image"


@pytest.mark.parametrize("name", sorted(PLATFORM))
def test_each_compose_service_is_replicated_checked_and_wired(
    compose: dict[str, Any], name: str
) -> None:
    services = compose["services"]
    service = services[name]
    assert service["deploy"]["replicas"] >= 2
    assert service["healthcheck"]["test"] == [
        "CMD", "python", "-m", "mesh.health_probe", f"127.0.0.1:{GRPC_PORT}",
    ]  # fmt: skip
    env = environment(service)
    assert env["CONSUL_HTTP_ADDR"] == "consul-client:8500" and "consul-client" in services
    otlp = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert (otlp.hostname, otlp.port) == ("jaeger", 4317) and "jaeger" in services
    assert env["OTEL_SERVICE_NAME"] == name
    depends = service["depends_on"]
    assert {"consul-client", "jaeger"} <= set(depends)
    assert all(dep["condition"] == "service_healthy" for dep in depends.values())
    nats_nodes = sorted(node for node in services if node.startswith("nats-"))
    if name in STATEFUL:
        assert env["NATS_URL"].split(",") == [f"nats://{node}:4222" for node in nats_nodes]
        assert "postgres" in depends
    if name in EVENTS:
        assert set(nats_nodes) <= set(depends)
    if name == "orders":  # after what it calls, as scripts/dev starts it
        assert {"users", "catalog", "payments", "delivery"} <= set(depends)


def test_every_container_has_a_health_check(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
        for dependency in service.get("depends_on") or {}:
            assert compose["services"][dependency].get("healthcheck"), dependency


def database_urls(compose: dict[str, Any]) -> dict[str, Any]:
    return {
        name: urlsplit(environment(compose["services"][name])["DATABASE_URL"]) for name in STATEFUL
    }


def test_each_service_has_a_database_and_a_role_of_its_own(compose: dict[str, Any]) -> None:
    urls = database_urls(compose)
    for name, url in urls.items():
        assert url.scheme == "postgresql"
        assert (url.hostname, url.port) == ("postgres", 5432)
        assert url.username == role_of(name) and url.path == f"/{role_of(name)}"
        assert url.password, name
    assert len({url.username for url in urls.values()}) == len(urls)
    assert len({url.path for url in urls.values()}) == len(urls)
    assert "DATABASE_URL" not in environment(compose["services"]["gateway"])


def test_the_init_script_makes_the_roles_the_services_log_in_as(compose: dict[str, Any]) -> None:
    """The script the postgres image runs, run against a real Postgres with the compose
    file's passwords: each service's DATABASE_URL logs in to its own database, and is refused
    by another service's."""
    urls = database_urls(compose)
    postgres_env = environment(compose["services"]["postgres"])
    psql = str(find_pg_bin() / "psql")
    with PostgresServer() as server:
        made = subprocess.run(
            ["bash", str(INIT_SCRIPT)],
            env={
                **postgres_env,
                "PATH": f"{find_pg_bin()}:{os.environ['PATH']}",
                "PGHOST": str(server.data_dir.parent),  # the cluster's socket directory
                "PGPORT": str(server.port),
                "POSTGRES_USER": "postgres",
                "POSTGRES_DB": "postgres",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stderr

        def connect(url: Any, database: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [psql, "-h", "127.0.0.1", "-p", str(server.port), "-U", url.username,
                 "-d", database, "-Atc", "SELECT current_user || ' ' || current_database()"],
                env={**os.environ, "PGPASSWORD": url.password},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )  # fmt: skip

        names = list(urls)
        for index, name in enumerate(names):
            url, role = urls[name], role_of(name)
            own = connect(url, url.path.lstrip("/"))
            assert own.returncode == 0, own.stderr
            assert own.stdout.split() == [role, role]
            other = role_of(names[(index + 1) % len(names)])
            refused = connect(url, other)
            assert refused.returncode != 0
            assert f'permission denied for database "{other}"' in refused.stderr


def test_the_init_script_refuses_to_run_without_a_password() -> None:
    done = subprocess.run(
        ["bash", str(INIT_SCRIPT)],
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1 and "USERS_DB_PASSWORD is not set" in done.stderr


def test_three_consul_servers_and_the_agent_the_services_use(compose: dict[str, Any]) -> None:
    services = compose["services"]
    servers = sorted(name for name in services if "-server" in command(services[name]))
    assert servers == ["consul-server-1", "consul-server-2", "consul-server-3"]
    for name in [*servers, "consul-client"]:
        argv = command(services[name])
        assert argv[0] == "agent"
        assert {f"-retry-join={server}" for server in servers} <= set(argv)
        assert "-client=0.0.0.0" in argv
        if name in servers:
            assert "-bootstrap-expect=3" in argv and f"-node={name}" in argv


def test_three_nats_nodes_in_one_jetstream_cluster(compose: dict[str, Any]) -> None:
    services = compose["services"]
    nodes = sorted(name for name in services if name.startswith("nats-"))
    assert len(nodes) == 3
    routes = ",".join(f"nats://{node}:6222" for node in nodes)
    names = set()
    for node in nodes:
        argv = command(services[node])
        assert "--jetstream" in argv and "--cluster_name=foodmesh" in argv
        assert f"--routes={routes}" in argv and "--http_port=8222" in argv
        names |= {arg for arg in argv if arg.startswith("--server_name=")}
        assert "8222/healthz" in " ".join(services[node]["healthcheck"]["test"])
    assert len(names) == 3, "JetStream clustering needs a distinct server name per node"


def test_only_the_gateway_and_the_uis_are_published(compose: dict[str, Any]) -> None:
    services = compose["services"]
    publishing = {name: published(service) for name, service in services.items()}
    assert {name: ports for name, ports in publishing.items() if ports} == {
        **UI_PORTS,
        **EDGE_PORTS,
    }
    # The edge forwards its two ports to the gateway's gRPC and HTTP ports, and nowhere else.
    backends = re.findall(r"server-template \S+ \d+ (\S+):(\d+)", HAPROXY_CONFIG.read_text())
    assert sorted(backends) == [("gateway", str(GRPC_PORT)), ("gateway", str(GATEWAY_HTTP_PORT))]
    assert compose["services"]["edge"]["depends_on"] == {
        "gateway": {"condition": "service_healthy"}
    }


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabeling (the keep and replace actions) of one target: its labels after
    `rules`, or None when dropped."""
    labels = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(
            labels.get(name, "") for name in rule.get("source_labels", [])
        )
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep":
            if match is None:
                return None
        elif action == "replace":
            if match is not None:
                replacement = re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1"))
                labels[rule["target_label"]] = match.expand(replacement)
        else:
            raise AssertionError(f"relabel action {action} is not modelled here")
    return labels


def consul_target(meta: dict[str, str]) -> dict[str, str]:
    """The labels Prometheus' Consul discovery gives an instance registered by the mesh."""
    target = {
        "__address__": "172.18.0.9:50051",
        "__meta_consul_address": "172.18.0.2",  # the agent's node
        "__meta_consul_service": "catalog",
        "__meta_consul_service_address": "172.18.0.9",
        "__meta_consul_service_port": "50051",
        "__meta_consul_service_id": "catalog-1a2b",
    }
    target |= {f"__meta_consul_service_metadata_{key}": value for key, value in meta.items()}
    return target


def scrape_job(config: dict[str, Any]) -> dict[str, Any]:
    [job] = [job for job in config["scrape_configs"] if job.get("consul_sd_configs")]
    return job


def test_prometheus_scrapes_each_instance_at_its_metrics_port(compose: dict[str, Any]) -> None:
    job = scrape_job(yaml.safe_load(PROMETHEUS_CONFIG.read_text()))
    [consul] = job["consul_sd_configs"]
    assert consul["server"] == environment(compose["services"]["catalog"])["CONSUL_HTTP_ADDR"]
    assert "grpc" in consul.get("tags", ["grpc"])
    rules = job["relabel_configs"]
    scraped = relabel(consul_target({METRICS_META: "9464", "version": "0.1.0"}), rules)
    assert scraped is not None and scraped["__address__"] == "172.18.0.9:9464"
    assert scraped["instance"] == "catalog-1a2b" and scraped["consul_service"] == "catalog"
    assert relabel(consul_target({"version": "0.1.0"}), rules) is None, "no metrics_port"
    mounted = [volume for volume in compose["services"]["prometheus"]["volumes"]]
    assert any(str(PROMETHEUS_CONFIG) in str(volume) for volume in mounted)


def test_grafana_reads_prometheus_and_the_dashboards_folder(compose: dict[str, Any]) -> None:
    provisioning = GRAFANA / "provisioning"
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    url = urlsplit(source["url"])
    assert url.hostname == "prometheus" and url.port in published(compose["services"]["prometheus"])
    [provider] = yaml.safe_load((provisioning / "dashboards" / "foodmesh.yml").read_text())[
        "providers"
    ]
    volumes = [str(volume) for volume in compose["services"]["grafana"]["volumes"]]
    dashboards = f"{GRAFANA / 'dashboards'}:{provider['options']['path']}"
    assert any(volume.startswith(dashboards) for volume in volumes)
    assert any(volume.startswith(f"{provisioning}:/etc/grafana/provisioning") for volume in volumes)


# --- Kubernetes -----------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.rglob("*.yaml") if path.name != "kustomization.yaml")


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    documents = []
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                document["__file__"] = path.relative_to(KUBERNETES).as_posix()
                documents.append(document)
    return documents


def resources(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in manifests if doc["kind"] == kind}


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates(manifests: list[dict[str, Any]], version: str) -> None:
    failures = []
    for document in manifests:
        resource = {key: value for key, value in document.items() if key != "__file__"}
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as e:
            where = ".".join(str(part) for part in getattr(e, "path", []))
            failures.append(f"{document['__file__']} {document['kind']}: {where}: {e.message}")
    assert not failures, "\n".join(failures)


def test_validation_is_strict_enough_to_fail() -> None:
    [deployment] = [
        doc
        for doc in yaml.safe_load_all((KUBERNETES / "services" / "orders.yaml").read_text())
        if doc["kind"] == "Deployment"
    ]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_the_kustomization_lists_every_manifest(manifests: list[dict[str, Any]]) -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert sorted(listed) == sorted(p.relative_to(KUBERNETES).as_posix() for p in manifest_files())
    assert kustomization["namespace"] == "foodmesh"
    for document in manifests:
        if document["kind"] != "Namespace":
            assert document["metadata"].get("namespace") == "foodmesh", document["__file__"]


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return bool(selector) and selector.items() <= labels.items()


@pytest.mark.parametrize("name", sorted(PLATFORM))
def test_each_deployment_is_replicated_probed_limited_and_unprivileged(
    manifests: list[dict[str, Any]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = resources(manifests, "Deployment")[name]
    assert deployment["spec"]["replicas"] >= 2
    container = container_of(deployment)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("NATS_URL", raising=False)
    argv = [arg.replace("$(POD_IP)", "10.1.2.3") for arg in container["args"]]
    assert argv[0] == f"services.{PLATFORM[name]}"
    args = parse_service_command(PLATFORM[name], argv[1:])
    assert (args.port, args.metrics_port, args.advertise_host) == (
        GRPC_PORT,
        METRICS_PORT,
        "10.1.2.3",
    )
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == args.port, probe
    limits = container["resources"]
    assert {"cpu", "memory"} <= set(limits["requests"]) and {"cpu", "memory"} <= set(
        limits["limits"]
    )
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    budgets = [
        pdb
        for pdb in resources(manifests, "PodDisruptionBudget").values()
        if selects(pdb["spec"]["selector"]["matchLabels"], deployment)
    ]
    assert len(budgets) == 1 and budgets[0]["spec"]["minAvailable"] >= 1
    services = [
        svc
        for svc in resources(manifests, "Service").values()
        if selects(svc["spec"].get("selector", {}), deployment)
    ]
    assert len(services) == 1


@pytest.mark.parametrize("name", sorted(PLATFORM))
def test_each_deployment_finds_consul_jaeger_nats_and_its_database(
    manifests: list[dict[str, Any]], name: str
) -> None:
    container = container_of(resources(manifests, "Deployment")[name])
    env = env_of(container)
    names = list(env)
    # Its node's agent: the host IP, defined before the variable that refers to it.
    assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
    assert env["CONSUL_HTTP_ADDR"]["value"] == "$(HOST_IP):8500"
    assert names.index("HOST_IP") < names.index("CONSUL_HTTP_ADDR")
    client = resources(manifests, "DaemonSet")["consul-client"]
    ports = container_of(client)["ports"]
    assert any(port.get("hostPort") == 8500 for port in ports)
    assert env["OTEL_SERVICE_NAME"]["value"] == name
    [source] = container["envFrom"]
    config = resources(manifests, "ConfigMap")[source["configMapRef"]["name"]]["data"]
    assert urlsplit(config["OTEL_EXPORTER_OTLP_ENDPOINT"]).hostname in resources(
        manifests, "Service"
    )
    nats = resources(manifests, "StatefulSet")["nats"]
    assert config["NATS_URL"].split(",") == [
        f"nats://nats-{index}.{nats['spec']['serviceName']}:4222"
        for index in range(nats["spec"]["replicas"])
    ]
    if name in STATELESS:
        assert "DATABASE_URL" not in env
        return
    role = role_of(name)
    assert env["DATABASE_URL"]["value"] == (
        f"postgresql://{role}:$(DB_PASSWORD)@$(POSTGRES_HOST):$(POSTGRES_PORT)/{role}"
    )
    assert names.index("DB_PASSWORD") < names.index("DATABASE_URL")
    secret = env["DB_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert secret["name"] == f"{name}-database"
    assert secret["key"] in resources(manifests, "Secret")[secret["name"]]["stringData"]
    assert config["POSTGRES_HOST"] in resources(manifests, "Service")
    # Postgres creates the role with the password from the same Secret.
    postgres_env = env_of(container_of(resources(manifests, "StatefulSet")["postgres"]))
    assert postgres_env[f"{role.upper()}_DB_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret


def test_consul_servers_and_client_agents_as_the_helm_chart_runs_them(
    manifests: list[dict[str, Any]],
) -> None:
    servers = resources(manifests, "StatefulSet")["consul-server"]
    assert servers["spec"]["replicas"] == 3
    headless = resources(manifests, "Service")[servers["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    words = container_of(servers)["command"][-1].replace("\\", " ").split()
    assert "-server" in words and "-bootstrap-expect=3" in words
    for index in range(3):
        joins = f"-retry-join=consul-server-{index}.consul-server.${{NAMESPACE}}.svc"
        assert joins in words
    client = container_of(resources(manifests, "DaemonSet")["consul-client"])
    client_words = client["command"][-1].replace("\\", " ").split()
    assert "-server" not in client_words
    assert "-retry-join=consul-server-0.consul-server.${NAMESPACE}.svc" in client_words
    assert '-node="${NODE}"' in client_words


def test_nats_is_three_jetstream_nodes_routed_through_the_headless_service(
    manifests: list[dict[str, Any]],
) -> None:
    nats = resources(manifests, "StatefulSet")["nats"]
    assert nats["spec"]["replicas"] == 3
    service = resources(manifests, "Service")[nats["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    args = container_of(nats)["args"]
    assert "--jetstream" in args and "--server_name=$(POD_NAME)" in args
    assert "--routes=" + ",".join(f"nats://nats-{i}.nats:6222" for i in range(3)) in args


def test_the_copies_kustomize_forces_stay_equal_to_the_compose_files(
    manifests: list[dict[str, Any]],
) -> None:
    init = resources(manifests, "ConfigMap")["postgres-init"]["data"]["01-databases.sh"]
    assert init == INIT_SCRIPT.read_text(), "deploy/kubernetes/postgres.yaml's copy differs"
    cluster = yaml.safe_load(
        resources(manifests, "ConfigMap")["prometheus"]["data"]["prometheus.yml"]
    )
    compose_job = scrape_job(yaml.safe_load(PROMETHEUS_CONFIG.read_text()))
    cluster_job = scrape_job(cluster)
    assert cluster_job["relabel_configs"] == compose_job["relabel_configs"]
    [consul] = cluster_job["consul_sd_configs"]
    host = consul["server"].split(".")[0]
    assert host in resources(manifests, "Service"), "Prometheus asks a Consul Service that exists"


def test_every_workload_has_resources_and_runs_as_a_user(
    manifests: list[dict[str, Any]],
) -> None:
    for kind in ("Deployment", "StatefulSet", "DaemonSet"):
        for name, workload in resources(manifests, kind).items():
            pod = workload["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            for container in pod["containers"]:
                assert container["resources"]["limits"], name
                assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
