"""Keys: format and hashing, the `edge keys` command on a key file, and the file store's hot
reload into a running edge."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from edge.access.auth import Keyring
from edge.access.keys import (
    KEY_LENGTH,
    FileBackend,
    FileKeys,
    KeyRecord,
    Limits,
    create_key,
    digest,
    key_id,
    new_key,
)
from edge.cli import main

WS = "0123456789abcdef01234567"


def test_key_format_and_id() -> None:
    kid, key = new_key()
    assert key.startswith("sk-edge-") and len(key) == KEY_LENGTH
    assert key_id(key) == kid and len(kid) == 8
    assert digest(key) == hashlib.sha256(key.encode()).digest()
    assert key_id(key + "x") is None
    assert key_id("sk-live-" + key[8:]) is None
    assert key_id("sk-edge-zzzzzzzz" + key[16:]) is None  # the id part must be hex
    assert new_key()[1] != key


def test_record_round_trip() -> None:
    record = KeyRecord("0a0b0c0d", "n", "ab" * 32, WS, ("m1", "m2"), Limits(1, 2, 3), 5.0, None)
    assert KeyRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


async def test_keyring_checks_digest_and_revocation(tmp_path: Path) -> None:
    path = str(tmp_path / "keys.json")
    backend = FileBackend(path)
    record, key = create_key(backend, "a", limits=Limits(rpm=5))
    watcher = FileKeys(path)
    ring = Keyring(watcher)
    await watcher.refresh()
    found = ring.find(key)
    assert found is not None and found.key_id == record.id and found.limits.rpm == 5
    # Same id, other secret: the id names the record, the digest must still match.
    assert ring.find(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert ring.find("") is None and ring.find("sk-edge-") is None
    assert repr(ring) == "<Keyring active=1 version=1>"
    backend.put(replace(record, revoked=time.time()))
    await watcher.refresh()
    assert ring.find(key) is None
    assert repr(ring) == "<Keyring active=0 version=2>"
    await watcher.refresh()  # unchanged file: not re-read
    assert watcher.version == 2


async def test_broken_file_keeps_the_last_good_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _, key = create_key(FileBackend(str(path)), "a")
    watcher = FileKeys(str(path))
    await watcher.refresh()
    path.write_text('{"keys": [')  # half-written by hand
    await watcher.refresh()
    assert watcher.version == 1 and Keyring(watcher).find(key) is not None


def _keys_cli(*argsets: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Run `edge keys ...` once per argument set, side by side (each start costs ~1 s)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "edge", "keys", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for args in argsets
    ]
    done = []
    for args, proc in zip(argsets, procs, strict=True):
        out, err = proc.communicate(timeout=30)
        done.append(subprocess.CompletedProcess(list(args), proc.returncode, out, err))
    return done


def test_cli_lifecycle(tmp_path: Path) -> None:
    store = tmp_path / "keys.json"
    config = tmp_path / "edge.toml"
    config.write_text(f'[auth]\nmode = "keys"\nkey_store = "{store}"\n')
    s = ("--store", str(store))
    (made,) = _keys_cli(
        ("--config", str(config), "create", "--name", "ci-bot", "--workspace", WS,
         "--models", "a, b", "--rpm", "60", "--tpm", "1000", "--concurrency", "2"),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    kid = key_id(key)
    assert kid is not None and f"created key {kid}" in made.stderr and key not in made.stderr
    on_disk = store.read_text()
    assert key not in on_disk and key[16:] not in on_disk
    assert digest(key).hex() in on_disk
    assert store.stat().st_mode & 0o077 == 0  # readable by its owner only
    (record,) = FileBackend(str(store)).records().values()
    assert (record.workspace, record.models, record.limits) == (WS, ("a", "b"), Limits(60, 1000, 2))

    (listed,) = _keys_cli((*s, "list"))
    (revoked,) = _keys_cli((*s, "revoke", kid))
    assert kid in listed.stdout and "ci-bot" in listed.stdout and "active" in listed.stdout
    assert key not in listed.stdout and record.hash not in listed.stdout
    assert revoked.returncode == 0
    assert FileBackend(str(store)).records()[kid].revoked is not None


def test_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The rest of the command's behaviour, without paying a process start per case."""
    s = ("keys", "--store", str(tmp_path / "keys.json"))
    assert main([*s, "create", "--name", "x"]) == 0
    key = capsys.readouterr().out.strip()
    assert main([*s, "list", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown[0]["id"] == key_id(key) and "hash" not in shown[0]
    assert main([*s, "revoke", "ffffffff"]) == 1
    assert main([*s, "create", "--name", "x", "--workspace", "nothex"]) == 2
    assert "workspace" in capsys.readouterr().err
    assert main(["keys", "create", "--name", "x"]) == 2
    assert "no key store" in capsys.readouterr().err
    assert key not in capsys.readouterr().err


async def test_file_store_hot_reload(start_mock, start_edge, tmp_path: Path) -> None:
    path = str(tmp_path / "keys.json")
    mock = await start_mock()
    worker = await start_edge(
        models={"mock-model": [mock]},
        auth__mode="keys", auth__key_store=path, auth__reload_s=0.05,
    )  # fmt: skip
    backend = FileBackend(path)
    record, key = create_key(backend, "late")  # created after the edge started
    check = f"{worker.url}/libertai/auth/check"
    headers = {"x-api-key": key}
    async with aiohttp.ClientSession() as session:
        assert await _until(session, check, headers, 200)
        backend.put(replace(record, revoked=time.time()))
        assert await _until(session, check, headers, 401)


async def _until(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], want: int
) -> bool:
    for _ in range(100):
        async with session.get(url, headers=headers) as resp:
            if resp.status == want:
                return True
        await asyncio.sleep(0.02)
    return False


def test_keys_mode_needs_a_store() -> None:
    from edge.config import ConfigError, from_mapping

    with pytest.raises(ConfigError, match="key_store or auth.redis_url"):
        from_mapping({"auth": {"mode": "keys"}})
    with pytest.raises(ConfigError, match="auth.mode"):
        from_mapping({"auth": {"mode": "open"}})
    with pytest.raises(ConfigError, match="prices"):
        from_mapping({"auth": {"prices": {"m": [1]}}})
