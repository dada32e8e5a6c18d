"""edge: an asyncio load-balancing edge proxy for fleets of OpenAI-compatible model servers."""

from pathlib import Path as _Path


def _refuse_stale_native_build() -> None:
    # In a checkout, the modules compiled by `make compile` sit beside their sources and win the
    # import. Running a compiled module older than its source would run yesterday's code with
    # no sign of it, so refuse loudly instead. Installed packages have no setup.py beside them.
    here = _Path(__file__).parent
    if not (here.parent / "setup.py").exists():
        return
    for native in here.rglob("*.so"):
        source = native.with_name(native.name.split(".", 1)[0] + ".py")
        if source.exists() and source.stat().st_mtime > native.stat().st_mtime:
            raise ImportError(
                f"{source} changed after it was compiled: run `make compile` "
                "(or delete the edge/**/*.so files to run the pure-Python modules)"
            )


_refuse_stale_native_build()
