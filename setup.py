"""The build: the modules on the per-request path compiled to C with mypyc.

The source stays plain, mypy --strict typed Python; mypyc turns it into a C extension per module
that runs the same code with native attribute access and direct calls, which takes about a third
off the interpreter's work per request (loadtests/hotpath.py under callgrind). The modules that
only set things up (app, cli, config, routing/discovery, routing/engines, access/redisconn,
proxy/connections, dev/mock) stay interpreted: they gain nothing per request and keep their
dynamic tests simple. So does every package's `__init__`: mypyc gives a compiled one a wrong
`__path__` (the package's folder twice), and a submodule imported before any compiled module had
loaded the group was then not found (edge.direct's transports import `edge.dialects.errors`
first; tests/direct/test_package.py).

EDGE_PURE=1 builds the pure-Python package (no compiler needed), and so does a machine without a C
compiler or the Python headers; `make` installs editable and pure, then compiles in place with
`make compile`.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from typing import Any

from setuptools import setup

# Everything a proxied request runs through, in data-path order.
HOT = (
    "dialects/paths",
    "dialects/errors",
    "http/server",
    "http/heads",
    "proxy/handler",
    "proxy/exchange",
    "proxy/route",
    "access/auth",
    "access/keys",
    "access/ratelimit",
    "access/metering",
    "routing/balance",
    "routing/affinity",
    "routing/policies",
    "routing/hedging",
    "routing/fleet",
    "routing/health",
    "routing/plan",
    "routing/admission",
    "routing/speaks",
    "routing/attempt",
    "routing/stats",
    "proxy/outbound",
    "proxy/forward",
    "http/client",
    "http/chunked",
    "proxy/relay",
    "proxy/translate",
    "dialects/anthropic",
    "dialects/gemini",
    "observe/record",
    "observe/families",
    "observe/metrics",
    "observe/accesslog",
)


def _can_compile() -> bool:
    """A C compiler and the Python headers: without them (a slim image, a machine with no gcc)
    the package installs pure rather than failing half-way with a compiler error."""
    include = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if os.path.exists(include) and shutil.which(compiler):
        return True
    print(f"edge: no C compiler ({compiler}) or Python headers: building the pure-Python package")
    return False


ext_modules: list[Any] = []  # mypyc's Extension is distutils' or setuptools', by version
if os.environ.get("EDGE_PURE") != "1" and _can_compile():
    from mypyc.build import mypycify

    ext_modules = mypycify(
        [f"edge/{name}.py" for name in HOT], opt_level="3", group_name="edge._native"
    )

setup(ext_modules=ext_modules)
