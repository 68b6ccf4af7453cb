"""A local tokencast cluster on loopback: Redis, web nodes, workers and nginx.

    .venv/bin/python deploy/local/cluster.py --web 3 --workers 2

prints the URL (nginx) and runs until Ctrl-C, then stops everything it
started. It uses the Redis at TOKENCAST_REDIS_URL when that is set, else
starts its own. The cluster tests drive the same classes.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "tokencast.conf"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(
    check: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the thing may not be up yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")


def http_status(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


class RedisServer:
    """A redis-server of our own on a free port, which may be stopped and restarted."""

    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()):
        self.port = port or free_port()
        self.extra_args = extra_args
        self.dir = tempfile.mkdtemp(prefix="tokencast-redis-")
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        # No automatic snapshots; SHUTDOWN SAVE still writes one (a clean restart).
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dbfilename",
                "dump.rdb",
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self.ping, 10, what=f"redis-server on {self.port}")
        return self

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def cli(self, *args: str) -> str:
        return subprocess.run(
            ["redis-cli", "-p", str(self.port), *args], capture_output=True, text=True, timeout=10
        ).stdout

    def shutdown_save(self) -> None:
        """A clean stop that keeps the data (it is loaded again on start)."""
        self.cli("SHUTDOWN", "SAVE")
        if self.process:
            self.process.wait(10)

    def kill(self) -> None:
        """SIGKILL: whatever was in memory is lost."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def forget(self) -> None:
        """Drop any snapshot, so the next start is empty (a crash without persistence)."""
        Path(self.dir, "dump.rdb").unlink(missing_ok=True)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Process:
    """A ``tokencast serve`` or ``tokencast worker`` process."""

    def __init__(self, args: list[str], env: dict[str, str], port: int | None = None):
        self.args = args
        self.env = env
        self.port = port
        self.process: subprocess.Popen | None = None
        fd, path = tempfile.mkstemp(prefix="tokencast-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, wait: bool = True) -> Process:
        with self.log_path.open("ab") as log:  # the child keeps its own copy
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *self.args],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait:
            check = self.ready if self.port else self.worker_ready
            wait_until(check, 15, what=f"tokencast {' '.join(self.args)}")
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(f"tokencast {' '.join(self.args)} exited:\n{self.log()}")

    def ready(self) -> bool:
        self._check_alive()
        return http_status(f"{self.url}/readyz") == 200

    def worker_ready(self) -> bool:
        self._check_alive()
        return " ready (" in self.log()

    def signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def render_nginx(ports: list[int], listen: int) -> str:
    """deploy/nginx/tokencast.conf with our upstream ports and listen port."""
    conf = NGINX_CONF.read_text()
    servers = "".join(
        f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=2s;\n" for port in ports
    )
    conf = re.sub(r"(    server 127\.0\.0\.1:\d+ [^\n]*\n)+", servers, conf, count=1)
    return conf.replace("listen 8080;", f"listen 127.0.0.1:{listen};")


class Nginx:
    """nginx in the foreground, configured from deploy/nginx/tokencast.conf."""

    def __init__(self, ports: list[int], listen: int | None = None):
        self.listen = listen or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tokencast-nginx-"))
        self.ports = ports
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen}"

    def start(self) -> Nginx:
        (self.dir / "tokencast.conf").write_text(render_nginx(self.ports, self.listen))
        user = "user root;\n" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(
            f"{user}worker_processes 1;\nerror_log {self.dir}/error.log warn;\n"
            f"pid {self.dir}/nginx.pid;\nevents {{ worker_connections 8192; }}\n"
            "http {\n"
            f"  access_log off;\n  client_body_temp_path {self.dir}/body;\n"
            f"  proxy_temp_path {self.dir}/proxy;\n  fastcgi_temp_path {self.dir}/fastcgi;\n"
            f"  uwsgi_temp_path {self.dir}/uwsgi;\n  scgi_temp_path {self.dir}/scgi;\n"
            f"  include {self.dir}/tokencast.conf;\n}}\n"
        )
        self.process = subprocess.Popen(
            ["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(lambda: http_status(f"{self.url}/healthz") == 200, 10, what="nginx")
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


class LocalCluster:
    """Redis (ours or TOKENCAST_REDIS_URL's), web nodes, workers and nginx in front."""

    def __init__(
        self,
        web: int = 3,
        workers: int = 2,
        redis_url: str | None = None,
        port: int | None = None,
        **settings: str,
    ):
        self.web_count = web
        self.worker_count = workers
        self.redis: RedisServer | None = None
        self.redis_url = redis_url
        self.port = port
        self.settings = {"key_prefix": f"local-{secrets.token_hex(4)}", **settings}
        self.web: list[Process] = []
        self.workers: list[Process] = []
        self.nginx: Nginx | None = None

    @property
    def url(self) -> str:
        assert self.nginx is not None
        return self.nginx.url

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAST_")}
        assert self.redis_url is not None
        env.update(TOKENCAST_REDIS_URL=self.redis_url, PYTHONUNBUFFERED="1")
        env.update(
            {f"TOKENCAST_{k.upper()}": str(v) for k, v in {**self.settings, **extra}.items()}
        )
        return env

    def start(self) -> LocalCluster:
        try:
            if self.redis_url is None:
                self.redis = RedisServer().start()
                self.redis_url = self.redis.url
            for index in range(self.web_count):
                self.web.append(self.start_web(node_id=f"web-{index + 1}"))
            for index in range(self.worker_count):
                self.workers.append(self.start_worker(node_id=f"worker-{index + 1}"))
            self.nginx = Nginx([node.port for node in self.web if node.port], self.port).start()
        except BaseException:
            self.stop()
            raise
        return self

    def start_web(self, port: int | None = None, **extra: str) -> Process:
        port = port or free_port()
        return Process(["serve", "--port", str(port)], self.env(**extra), port=port).start()

    def start_worker(self, **extra: str) -> Process:
        return Process(["worker"], self.env(**extra)).start()

    def restart_web(self, index: int) -> Process:
        """Start web node ``index`` again on its port (after it was killed)."""
        old = self.web[index]
        old.stop()
        self.web[index] = Process(old.args, old.env, port=old.port).start()
        return self.web[index]

    def stop(self) -> None:
        for process in self.web + self.workers:
            process.stop()
        if self.nginx:
            self.nginx.stop()
        if self.redis:
            self.redis.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--web", type=int, default=3, help="web nodes (default 3)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--port", type=int, default=8080, help="nginx port (default 8080)")
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        print("nginx is not installed (apt-get install nginx)", file=sys.stderr)
        return 1
    cluster = LocalCluster(
        web=args.web,
        workers=args.workers,
        port=args.port,
        redis_url=os.environ.get("TOKENCAST_REDIS_URL"),
        key_prefix=os.environ.get("TOKENCAST_KEY_PREFIX", "tokencast"),
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster.start()
    print(
        f"tokencast: {cluster.url}  (redis {cluster.redis_url}; "
        f"web nodes {', '.join(n.url for n in cluster.web)}; {args.workers} workers)"
    )
    print("Ctrl-C stops everything.", flush=True)
    try:
        while not stop:
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
