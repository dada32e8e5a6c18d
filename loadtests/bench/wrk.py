"""wrk against a proxy: requests/s at saturation (F1), pinned to the load's core."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any, Final

from loadtests.bench.targets import LOAD_CORE, pinned

PATH: Final = "/v1/chat/completions"
POST_LUA: Final = Path(__file__).with_name("post.lua")


def wrk(url: str, seconds: int, connections: int = 64) -> dict[str, Any]:
    """One wrk round of `seconds` on `connections`: requests, requests/s, errors."""
    lua, target = str(POST_LUA), url + PATH
    cmd = pinned(LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", lua, target)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
    out = done.stdout
    found = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        raise RuntimeError(f"wrk gave no result: {(done.stderr or out)[-300:]}")
    return {
        "requests": int(found[1]),
        "rps": float(rps[1]) if rps else 0.0,
        "errors": (int(non2xx[1]) if non2xx else 0) + (sum(map(int, sock.groups())) if sock else 0),
    }
