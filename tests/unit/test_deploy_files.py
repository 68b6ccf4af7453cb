"""The container and Kubernetes files, checked without a container engine.

They cannot run here, so they are parsed: valid YAML, the services and ports
the code expects, the local runner's exact commands (deploy/local/cluster.py
is the reference), only TOKENCAST_* variables that services/config.py reads,
and shutdown grace periods longer than the drain time.

deploy/nginx/compose.conf is derived from deploy/nginx/tokencast.conf; after
editing tokencast.conf, write it again with

    .venv/bin/python tests/unit/test_deploy_files.py
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
NGINX_CONF = DEPLOY / "nginx" / "tokencast.conf"
COMPOSE_NGINX_CONF = DEPLOY / "nginx" / "compose.conf"

WEB_PORT, REDIS_PORT, NGINX_PORT = 8000, 6379, 8080

COMPOSE_CONF_HEADER = """\
# GENERATED: deploy/nginx/tokencast.conf with the web nodes of
# deploy/docker-compose.yml as its upstream servers. Edit tokencast.conf, then
# write this file again with `.venv/bin/python tests/unit/test_deploy_files.py`
# (the unit tests fail while the two disagree).
"""
RUNNER_COMMENT = "    # The local runner (deploy/local/cluster.py) rewrites these lines.\n"
COMPOSE_COMMENT = "    # The web nodes of deploy/docker-compose.yml.\n"
LOCAL_SERVER = re.compile(r"    server 127\.0\.0\.1:\d+( [^\n]*)?;\n")
UPSTREAM_SERVER = re.compile(r"^\s*server\s+([^\s;{]+)[^;]*;", re.MULTILINE)


# --- what the code and the local runner expect ---------------------------------------


def setting_names() -> set[str]:
    """Every TOKENCAST_* variable services/config.py reads."""
    return set(re.findall(r'"(TOKENCAST_[A-Z0-9_]+)"', (ROOT / "services/config.py").read_text()))


@dataclass(frozen=True)
class Runner:
    web: list[str]  # a web node's command line, listening on WEB_PORT
    worker: list[str]
    env_names: set[str]  # the TOKENCAST_* variables it gives its processes


@pytest.fixture(scope="module")
def runner() -> Runner:
    """The commands deploy/local/cluster.py runs, taken from it without starting anything."""
    spec = importlib.util.spec_from_file_location("local_cluster", DEPLOY / "local/cluster.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module.Process, "start", lambda self, wait=True: self)
        cluster = module.LocalCluster(redis_url="redis://redis:6379/0")
        web = cluster.start_web(port=WEB_PORT, node_id="web-1")
        worker = cluster.start_worker(node_id="worker-1")
    for process in (web, worker):
        process.log_path.unlink(missing_ok=True)
    # The runner starts `python -m services.cli`, the module behind the `tokencast` script.
    return Runner(
        web=["tokencast", *web.args],
        worker=["tokencast", *worker.args],
        env_names={name for name in web.env if name.startswith("TOKENCAST_")},
    )


def seconds(value: str | int | float) -> float:
    """A compose (``1m30s``) or nginx (``1h``) duration, in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    text = str(value).strip()
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)?", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {value!r}"
    return sum(float(number) * units[unit or "s"] for number, unit in parts)


# --- Dockerfile -------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def docker(instruction: str) -> list[str]:
    return [rest for word, rest in dockerfile() if word == instruction]


def docker_env() -> dict[str, str]:
    env = {}
    for rest in docker("ENV"):
        for item in shlex.split(rest):
            name, _, value = item.partition("=")
            env[name] = value
    return env


def test_dockerfile_builds_one_image_for_web_and_workers():
    assert docker("FROM") == ["python:3.11-slim"]
    assert any(re.search(r"\bpip install \.(\s|$)", run) for run in docker("RUN"))
    (user,) = docker("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert json.loads(docker("ENTRYPOINT")[-1]) == ["tokencast"]
    env = docker_env()
    assert (env["TOKENCAST_HOST"], env["TOKENCAST_PORT"]) == ("0.0.0.0", str(WEB_PORT))
    assert {name for name in env if name.startswith("TOKENCAST_")} <= setting_names()
    assert docker("EXPOSE") == [str(WEB_PORT)]


def test_dockerfile_healthcheck_needs_no_curl():
    (check,) = docker("HEALTHCHECK")
    assert "/healthz" in check and "curl" not in check and "wget" not in check


# --- YAML -------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_is_valid(path):
    documents = list(yaml.safe_load_all(path.read_text()))
    assert documents and all(isinstance(doc, dict) for doc in documents)


# --- docker-compose.yml -----------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def compose_command(service: dict[str, Any]) -> list[str]:
    """The full command line of a service built from deploy/Dockerfile."""
    entrypoint = service.get("entrypoint") or json.loads(docker("ENTRYPOINT")[-1])
    command = service.get("command") or json.loads(docker("CMD")[-1])
    return [*entrypoint, *command]


def tokencast_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose_services().items() if "build" in s}


def compose_roles(runner: Runner) -> tuple[list[str], list[str]]:
    services = tokencast_services()
    web = [name for name, s in services.items() if compose_command(s) == runner.web]
    workers = [name for name, s in services.items() if compose_command(s) == runner.worker]
    return web, workers


def test_compose_has_redis_three_web_nodes_two_workers_and_nginx(runner):
    web, workers = compose_roles(runner)
    assert (len(web), len(workers)) == (3, 2)
    # Every tokencast service runs exactly the local runner's web or worker command.
    assert sorted(web + workers) == sorted(tokencast_services())
    others = [s["image"].split(":")[0] for s in compose_services().values() if "build" not in s]
    assert sorted(others) == ["nginx", "redis"]


def test_compose_builds_the_dockerfile():
    for name, service in tokencast_services().items():
        build = service["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE, (
            name
        )


def test_compose_environment(runner):
    services = compose_services()
    redis = {name for name, s in services.items() if s.get("image", "").startswith("redis")}
    node_ids = []
    for name, service in tokencast_services().items():
        env = service["environment"]
        assert set(env) <= setting_names(), f"{name}: unknown {set(env) - setting_names()}"
        assert runner.env_names <= set(env), f"{name}: lacks {runner.env_names - set(env)}"
        url = urlsplit(env["TOKENCAST_REDIS_URL"])
        assert (url.hostname in redis, url.port) == (True, REDIS_PORT), name
        node_ids.append(env["TOKENCAST_NODE_ID"])
    assert len(set(node_ids)) == len(node_ids), node_ids
    for service in services.values():
        if service.get("image", "").startswith("redis"):
            assert "--port" not in service.get("command", [])  # the default, 6379


def redis_options(command: list[str]) -> dict[str, str]:
    """``redis-server --name value …`` as {name: value}."""
    assert command[0] == "redis-server", command
    assert len(command) % 2 == 1 and all(word.startswith("--") for word in command[1::2]), command
    return {
        name.removeprefix("--"): value
        for name, value in zip(command[1::2], command[2::2], strict=True)
    }


def test_compose_redis_keeps_an_append_only_file():
    (redis,) = [s for s in compose_services().values() if s.get("image", "").startswith("redis")]
    options = redis_options(redis["command"])
    assert (options["appendonly"], options["appendfsync"]) == ("yes", "everysec")
    assert any(volume.endswith(":/data") for volume in redis["volumes"])


def test_compose_stop_grace_period_outlasts_the_drain():
    for name, service in tokencast_services().items():
        drain = float(service["environment"]["TOKENCAST_DRAIN_SECONDS"])
        assert seconds(service["stop_grace_period"]) > drain, name


def test_compose_workers_turn_off_the_http_healthcheck(runner):
    _web, workers = compose_roles(runner)
    for name in workers:
        assert compose_services()[name]["healthcheck"] == {"disable": True}


def test_compose_nginx_fronts_the_web_nodes(runner):
    (nginx,) = [s for s in compose_services().values() if s.get("image", "").startswith("nginx")]
    assert f"{NGINX_PORT}:{NGINX_PORT}" in nginx["ports"]
    mounted = {volume.split(":")[0] for volume in nginx["volumes"]}
    assert mounted == {"./" + str(COMPOSE_NGINX_CONF.relative_to(DEPLOY))}
    web, _workers = compose_roles(runner)
    conf = COMPOSE_NGINX_CONF.read_text()
    assert UPSTREAM_SERVER.findall(conf) == [f"{name}:{WEB_PORT}" for name in web]
    assert f"listen {NGINX_PORT};" in conf
    assert set(nginx["depends_on"]) == set(web)


# --- Kubernetes -------------------------------------------------------------------------


def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") != "Kustomization":
                objects[doc["kind"], doc["metadata"]["name"]] = doc
    return objects


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for (k, _name), doc in k8s().items() if k == kind]


def configmap() -> dict[str, str]:
    (only,) = of_kind("ConfigMap")
    return only["data"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def deployment_running(command: list[str]) -> dict[str, Any]:
    (found,) = [
        d
        for d in of_kind("Deployment")
        if container(d).get("command", []) + container(d).get("args", []) == command
    ]
    return found


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def container_port(deployment: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container(deployment)["ports"] if p["name"] == port]
    return number


def prestop_seconds(deployment: dict[str, Any]) -> float:
    command = container(deployment).get("lifecycle", {}).get("preStop", {}).get("exec", {})
    words = command.get("command", [])
    return float(words[1]) if words[:1] == ["sleep"] else 0.0


def test_kustomization_lists_every_manifest():
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(resources) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.stem != "kustomization"
    )


def test_k8s_web_deployment_service_and_probes(runner):
    web = deployment_running(runner.web)
    assert web["spec"]["replicas"] == 3
    assert selects(web["spec"]["selector"]["matchLabels"], pod_labels(web))
    spec = container(web)
    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container_port(web, spec[probe]["httpGet"]["port"]) == WEB_PORT
    (service,) = [s for s in of_kind("Service") if selects(s["spec"]["selector"], pod_labels(web))]
    (port,) = service["spec"]["ports"]
    assert port["port"] == WEB_PORT and container_port(web, port["targetPort"]) == WEB_PORT


def test_k8s_web_has_a_disruption_budget(runner):
    web = deployment_running(runner.web)
    (budget,) = of_kind("PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels(web))


def test_k8s_workers(runner):
    worker = deployment_running(runner.worker)
    assert worker["spec"]["replicas"] == 2
    assert selects(worker["spec"]["selector"]["matchLabels"], pod_labels(worker))


def test_k8s_redis_is_where_the_configmap_points():
    url = urlsplit(configmap()["TOKENCAST_REDIS_URL"])
    service = k8s()["Service", url.hostname]
    assert url.port == REDIS_PORT
    assert [p["port"] for p in service["spec"]["ports"]] == [REDIS_PORT]
    (redis,) = [
        d for d in of_kind("Deployment") if selects(service["spec"]["selector"], pod_labels(d))
    ]
    assert container_port(redis, service["spec"]["ports"][0]["targetPort"]) == REDIS_PORT


def test_k8s_redis_keeps_an_append_only_file():
    (redis,) = [d for d in of_kind("Deployment") if container(d)["image"].startswith("redis")]
    spec = container(redis)
    options = redis_options(spec.get("command", []) + spec.get("args", []))
    assert (options["appendonly"], options["appendfsync"]) == ("yes", "everysec")
    assert [m["mountPath"] for m in spec["volumeMounts"]] == ["/data"]


def test_k8s_environment(runner):
    (map_name,) = [name for (kind, name) in k8s() if kind == "ConfigMap"]
    assert set(configmap()) <= setting_names(), set(configmap()) - setting_names()
    for command in (runner.web, runner.worker):
        spec = container(deployment_running(command))
        assert {"configMapRef": {"name": map_name}} in spec["envFrom"]
        names = {item["name"] for item in spec.get("env", [])}
        assert names <= setting_names(), names - setting_names()
        assert runner.env_names <= names | set(configmap()), runner.env_names - names


def test_k8s_termination_outlasts_prestop_and_drain(runner):
    drain = float(configmap()["TOKENCAST_DRAIN_SECONDS"])
    for command in (runner.web, runner.worker):
        deployment = deployment_running(command)
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        # Kubernetes counts the preStop hook inside the grace period.
        assert grace > prestop_seconds(deployment) + drain, command


# --- nginx ------------------------------------------------------------------------------


def derive_compose_conf(local_conf: str, web_nodes: list[str]) -> str:
    """tokencast.conf with ``web_nodes`` (compose service names) as its upstream servers."""
    found = list(LOCAL_SERVER.finditer(local_conf))
    if not found:
        raise ValueError(f"{NGINX_CONF}: no `server 127.0.0.1:<port> …;` lines to replace")
    options = found[0].group(1) or ""
    servers = "".join(f"    server {name}:{WEB_PORT}{options};\n" for name in web_nodes)
    start, end = found[0].start(), found[-1].end()
    conf = local_conf[:start] + servers + local_conf[end:]
    return COMPOSE_CONF_HEADER + conf.replace(RUNNER_COMMENT, COMPOSE_COMMENT)


def compose_web_nodes() -> list[str]:
    return sorted(
        name for name, s in tokencast_services().items() if compose_command(s)[1:2] == ["serve"]
    )


def test_compose_conf_is_derived_from_tokencast_conf():
    expected = derive_compose_conf(NGINX_CONF.read_text(), compose_web_nodes())
    assert COMPOSE_NGINX_CONF.read_text() == expected, (
        "deploy/nginx/compose.conf is stale: run `.venv/bin/python tests/unit/test_deploy_files.py`"
    )


def test_compose_conf_server_blocks_are_identical():
    def server_block(conf: str) -> str:
        return conf[conf.index("\nserver {") :]

    assert server_block(COMPOSE_NGINX_CONF.read_text()) == server_block(NGINX_CONF.read_text())


@pytest.mark.parametrize("path", [NGINX_CONF, COMPOSE_NGINX_CONF], ids=lambda p: p.name)
def test_nginx_keeps_the_sse_settings(path):
    from services.config import Settings

    conf = path.read_text()
    for directive in ("least_conn;", "proxy_buffering off;", "proxy_http_version 1.1;"):
        assert re.search(rf"^\s*{re.escape(directive)}", conf, re.MULTILINE), directive
    (timeout,) = re.findall(r"^\s*proxy_read_timeout\s+(\S+);", conf, re.MULTILINE)
    assert seconds(timeout) > Settings().keepalive_s


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
@pytest.mark.parametrize("path", [NGINX_CONF, COMPOSE_NGINX_CONF], ids=lambda p: p.name)
def test_nginx_accepts_the_config(path, tmp_path):
    # compose.conf's upstream names only resolve inside compose: test it on loopback.
    conf = re.sub(r"\bweb(\d+):\d+", r"127.0.0.1:800\1", path.read_text())
    (tmp_path / "site.conf").write_text(conf)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nevents {{}}\nhttp {{\n"
        f"  client_body_temp_path {tmp_path}/body;\n  proxy_temp_path {tmp_path}/proxy;\n"
        f"  fastcgi_temp_path {tmp_path}/fastcgi;\n  uwsgi_temp_path {tmp_path}/uwsgi;\n"
        f"  scgi_temp_path {tmp_path}/scgi;\n  include {tmp_path}/site.conf;\n}}\n"
    )
    files = ["-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "e.log")]
    result = subprocess.run(
        ["nginx", "-t", *files],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr


if __name__ == "__main__":
    COMPOSE_NGINX_CONF.write_text(derive_compose_conf(NGINX_CONF.read_text(), compose_web_nodes()))
    print(f"wrote {COMPOSE_NGINX_CONF.relative_to(ROOT)}", file=sys.stderr)
