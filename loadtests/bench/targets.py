"""What the benchmark starts: the upstreams and each proxy under test, pinned to their cores,
and the tools it installs when missing (nginx-light and wrk from Debian, vllm-router from PyPI
into its own virtualenv so the project's .venv stays as it is)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.bench.upstream import FIXED_BODY

ROOT = Path(__file__).resolve().parents[2]
PROXY_CORE, LOAD_CORE = "0", "1"
ROUTER_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edge-bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(core: str, *cmd: str) -> list[str]:
    return ["taskset", "-c", core, *cmd]


@dataclass
class Proc:
    """A started process (its own session, so its whole group stops with it)."""

    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, grace_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(5)

    def __repr__(self) -> str:
        return f"<Proc {self.name} pid={self.pid} {self.url}>"


@dataclass
class Launcher:
    """Starts processes with logs under `logs`, and stops every one it started."""

    logs: Path
    started: list[Proc] = field(default_factory=list)

    def start(
        self, name: str, cmd: list[str], url: str, ready: str, env: dict[str, str] | None = None
    ) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **(env or {})}, cwd=ROOT,
            )  # fmt: skip
        proc = Proc(name, popen, url, log)
        self.started.append(proc)
        wait_ready(url + ready, proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.stop()
        self.started.clear()


def wait_ready(url: str, proc: Proc, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}); see {proc.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} not ready at {url} within {timeout_s:.0f} s")
        time.sleep(0.1)


# --- tools -----------------------------------------------------------------------------------


def ensure_debian_tools() -> dict[str, str]:
    """nginx and wrk, installed with apt-get when missing; name -> problem for those still not."""
    need = [pkg for tool, pkg in (("nginx", "nginx-light"), ("wrk", "wrk")) if not _which(tool)]
    if need:
        sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        apt = [*sudo, "apt-get", "-o", "DPkg::Lock::Timeout=180"]
        for cmd in (
            [*apt, "update", "-qq"],
            [*apt, "install", "-y", "-qq", "--no-install-recommends", *need],
        ):
            subprocess.run(cmd, env=env, timeout=600, check=False, capture_output=True)
    return {
        t: f"{t} is not installed and apt-get could not install it"
        for t in ("nginx", "wrk")
        if not _which(t)
    }


def _which(tool: str) -> str | None:
    return shutil.which(tool) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / tool).exists()), None
    )


def ensure_vllm_router() -> tuple[Path | None, str]:
    """(the vllm-router command, its version) or (None, why it is not available)."""
    exe = ROUTER_VENV / "vllm-router" / "bin" / "vllm-router"
    pip = exe.with_name("pip")
    if not exe.exists():
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(exe.parents[1])],
                check=True,
                timeout=120,
                capture_output=True,
            )
            subprocess.run(
                [str(pip), "install", "-q", "vllm-router"],
                check=True,
                timeout=900,
                capture_output=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            return None, f"pip install vllm-router failed: {str(exc)[:200]}"
    if not exe.exists():
        return None, "vllm-router installed no vllm-router command"
    show = subprocess.run(
        [str(pip), "show", "vllm-router"], capture_output=True, text=True, timeout=60
    )
    version = next(
        (ln.split()[-1] for ln in show.stdout.splitlines() if ln.startswith("Version")), "?"
    )
    return exe, version


def tool_version(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (
        (done.stdout + done.stderr).strip().splitlines()[0]
        if (done.stdout + done.stderr).strip()
        else "?"
    )


# --- upstreams --------------------------------------------------------------------------------


def python_upstream(launch: Launcher) -> Proc:
    port = free_port()
    cmd = pinned(LOAD_CORE, sys.executable, "-m", "loadtests.bench.upstream", "--port", str(port))
    return launch.start("upstream-python", cmd, f"http://127.0.0.1:{port}", "/health")


def nginx_static_upstream(launch: Launcher, work: Path) -> Proc:
    """nginx answering every request with the same body the Python upstream sends: the fixed
    JSON endpoint fast enough that it is never what limits a proxy's requests per second."""
    port = free_port()
    body = FIXED_BODY.decode().replace("'", "\\'")
    server = f"""
    server {{
      listen 127.0.0.1:{port} backlog=4096;
      location / {{ default_type application/json; return 200 '{body}'; }}
    }}"""
    conf = _nginx_conf(work / "nginx-static", server)
    return launch.start(
        "upstream-nginx", _nginx_cmd(LOAD_CORE, conf), f"http://127.0.0.1:{port}", "/health"
    )


# --- proxies ----------------------------------------------------------------------------------


def edge(launch: Launcher, work: Path, upstream: str, workers: int = 1, tag: str = "") -> Proc:
    port = free_port()
    config = work / f"edge{tag}.toml"
    # One upstream must hold 10,000 concurrent streams in F4: lift the per-server pool cap.
    config.write_text(
        f"[server]\nport = {port}\nworkers = {workers}\ndrain_timeout_s = 5.0\n"
        f"[upstream]\nmax_connections_per_server = 20000\n"
        f'[models."bench"]\nservers = ["{upstream}"]\n'
    )
    cores = PROXY_CORE if workers == 1 else f"{PROXY_CORE},{LOAD_CORE}"
    edge_exe = str(Path(sys.executable).with_name("edge"))
    cmd = pinned(cores, edge_exe, "serve", "--config", str(config))
    return launch.start(f"edge{tag}", cmd, f"http://127.0.0.1:{port}", "/ready")


def nginx_proxy(launch: Launcher, work: Path, upstream: str, tag: str = "") -> Proc:
    port = free_port()
    server = f"""
    upstream model {{
      server {upstream.removeprefix("http://")};
      keepalive 256;
      keepalive_requests 1000000;
    }}
    server {{
      listen 127.0.0.1:{port} backlog=4096;
      location / {{
        proxy_pass http://model;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout 600s;
      }}
    }}"""
    conf = _nginx_conf(work / f"nginx-proxy{tag}", server)
    return launch.start(
        f"nginx{tag}", _nginx_cmd(PROXY_CORE, conf), f"http://127.0.0.1:{port}", "/health"
    )


def vllm_router(launch: Launcher, exe: Path, upstream: str, tag: str = "") -> Proc:
    port = free_port()
    cmd = pinned(
        PROXY_CORE, str(exe), "--host", "127.0.0.1", "--port", str(port), "--worker-urls", upstream,
        "--policy", "round_robin", "--disable-retries", "--disable-circuit-breaker",
        # No flag turns health checks off: one a day is as good as none for a 1-minute run.
        "--health-check-interval-secs", "86400", "--worker-startup-check-interval", "1",
        "--request-timeout-secs", "600", "--log-level", "error",
    )  # fmt: skip
    # One tokio worker thread: the same single core the other proxies get.
    env = {"TOKIO_WORKER_THREADS": "1"}
    return launch.start(f"vllm-router{tag}", cmd, f"http://127.0.0.1:{port}", "/health", env)


# worker_connections above the open-file limit on purpose: with it equal, nginx ran out of
# connection slots (~1,200 short) before it ran out of files at ~9,400 streams; the files are
# then the only bound, as for the other proxies. Each slot costs ~100 bytes until used.
def _nginx_conf(prefix: Path, server: str) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    temp = " ".join(
        f"{k}_temp_path {prefix}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf.write_text(
        f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile 20000;
events {{ worker_connections 24000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  {temp}
  {server}
}}
"""
    )
    return conf


def _nginx_cmd(core: str, conf: Path) -> list[str]:
    nginx = _which("nginx") or "nginx"
    return pinned(
        core, nginx, "-c", str(conf), "-p", str(conf.parent), "-e", str(conf.parent / "error.log")
    )
