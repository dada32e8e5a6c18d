"""The deploy files, checked without a container engine: every file parses, and what they say
agrees with the CLI (flags exist), the config schema (the TOML they ship loads), and each other
(ports, probes, drain timeouts, secrets, selectors, files that mounts and COPY name)."""

from __future__ import annotations

import argparse
import configparser
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from edge import cli
from edge.config import Config, from_mapping, load

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """The edge's own argparse over `argv`; a flag it does not know fails the test."""
    try:
        return cli._parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`edge {' '.join(argv)}` is not a valid command line")


def serve_config(args: argparse.Namespace, toml_text: str) -> Config:
    """The Config `edge serve` would run with: the file, then the flags over it."""
    return from_mapping(
        tomllib.loads(toml_text),
        server__host=args.host,
        server__port=args.port,
        server__workers=args.workers,
        discovery__sources=args.models,
    )


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def one(steps: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in steps if w == word]
    assert len(found) == 1, f"expected one {word}, found {found}"
    return found[0]


def test_dockerfile_runs_edge_serve_as_a_non_root_user() -> None:
    steps = final_stage()
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    assert json.loads(one(steps, "ENTRYPOINT")) == ["edge", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["edge"] == "edge.cli:main"
    assert one(steps, "STOPSIGNAL") == "SIGTERM"


def test_dockerfile_cmd_config_and_healthcheck_agree() -> None:
    steps = final_stage()
    args = parse_cli(["serve", *json.loads(one(steps, "CMD"))])
    copied = {rest.split()[-1]: rest.split()[-2] for word, rest in steps if word == "COPY"}
    config = serve_config(args, (ROOT / copied[args.config]).read_text())
    assert config.server.host == "0.0.0.0", "a container must listen on every interface"
    assert one(steps, "EXPOSE") == str(config.server.port)
    health = one(steps, "HEALTHCHECK")
    assert f"http://127.0.0.1:{config.server.port}/health" in health
    assert re.search(r"--timeout=\d+s", health) and "CMD" in health


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for word, rest in dockerfile():
        if word != "COPY" or "--from" in rest:
            continue
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            top = source.split("/")[0]
            assert f"!{top}" in ignore or f"!{top}/" in ignore, f"{source} is .dockerignored"


# --- docker compose -------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())[
        "services"
    ]
    return services


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of each bind mount (host paths relative to deploy/)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = (DEPLOY / source).resolve()
    return out


def compose_edge() -> tuple[argparse.Namespace, Config, dict[str, Any]]:
    edge = compose()["edge"]
    args = parse_cli(["serve", *edge["command"]])
    config = serve_config(args, mounts(edge)[args.config].read_text())
    return args, config, edge


def test_compose_builds_and_mounts_files_that_exist() -> None:
    for name, service in compose().items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for target, source in mounts(service).items():
            assert source.exists(), f"{name}: {source} (for {target}) does not exist"


def test_compose_edge_serves_its_config_on_the_published_port() -> None:
    _, config, edge = compose_edge()
    assert config.server.host == "0.0.0.0"
    assert f"8080:{config.server.port}" in edge["ports"]
    grace = float(edge["stop_grace_period"].removesuffix("s"))
    assert edge["stop_signal"] == "SIGTERM" and grace > config.server.drain_timeout_s
    assert config.static, "the compose edge names the mock servers"


def test_compose_mocks_serve_what_the_edge_expects() -> None:
    _, config, _ = compose_edge()
    services = compose()
    for model, urls in config.static.items():
        for url in urls:
            parts = urlsplit(url)
            mock = services[str(parts.hostname)]
            assert mock["entrypoint"] == ["edge", "mock"]
            args = parse_cli(["mock", *mock["command"]])
            assert args.host == "0.0.0.0" and args.port == parts.port
            assert model in args.model, f"{parts.hostname} does not serve {model}"
            assert f"127.0.0.1:{args.port}/health" in " ".join(mock["healthcheck"]["test"])


def test_compose_edge_sends_traces_to_jaeger() -> None:
    _, config, edge = compose_edge()
    services = compose()
    assert config.tracing.enabled and not config.tracing.endpoint  # the variable's, below
    endpoint = urlsplit(edge["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"])
    jaeger = services[str(endpoint.hostname)]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert endpoint.port == 4318 and "4318:4318" in jaeger["ports"]  # OTLP over HTTP
    assert "jaeger" in edge["depends_on"]


def test_compose_prometheus_scrapes_the_edge() -> None:
    prometheus = compose()["prometheus"]
    flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    path = Path(flag.partition("=")[2])
    host_dir = mounts(prometheus)[str(path.parent)]
    scrape = yaml.safe_load((host_dir / path.name).read_text())
    _, config, _ = compose_edge()
    targets = [
        t
        for job in scrape["scrape_configs"]
        for group in job.get("static_configs", [])
        for t in group["targets"]
    ]
    assert f"edge:{config.server.port}" in targets


def test_compose_grafana_provisioning_matches_its_mounts() -> None:
    grafana = compose()["grafana"]
    volumes = mounts(grafana)
    provisioning = volumes["/etc/grafana/provisioning"]
    for provider_file in sorted((provisioning / "dashboards").glob("*.y*ml")):
        for provider in yaml.safe_load(provider_file.read_text()).get("providers", []):
            path = provider["options"]["path"]
            assert any(path.startswith(target) for target in volumes), path
    assert any((volumes["/var/lib/grafana/dashboards"]).glob("*.json")), "no dashboard"
    sources = [
        s
        for f in sorted((provisioning / "datasources").glob("*.y*ml"))
        for s in yaml.safe_load(f.read_text()).get("datasources", [])
    ]
    assert any("prometheus:9090" in s.get("url", "") for s in sources)


# --- systemd --------------------------------------------------------------------------------


def test_systemd_unit_reloads_with_hup_and_drains_within_its_stop_timeout() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((DEPLOY / "edge.service").read_text())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].endswith("/edge")
    args = parse_cli(argv[1:])
    assert args.command == "serve" and args.config
    assert shlex.split(service["ExecReload"])[-2:] == ["-HUP", "$MAINPID"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["User"] not in ("root", "0")
    drain = load(ROOT / "config" / "edge.toml").server.drain_timeout_s
    assert float(service["TimeoutStopSec"]) > drain
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# --- Kubernetes -----------------------------------------------------------------------------


def manifests() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files, "kustomization lists every manifest"
    docs = [d for name in files for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


def pod_of(k8s: dict[str, dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = k8s["Deployment"]["spec"]["template"]
    return pod, pod["spec"]["containers"][0]


def k8s_config(k8s: dict[str, dict[str, Any]]) -> tuple[argparse.Namespace, Config]:
    pod, container = pod_of(k8s)
    assert container.get("command") in (None, ["edge", "serve"]), "the image runs `edge serve`"
    args = parse_cli(["serve", *container["args"]])
    config_path = Path(args.config)
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(config_path.parent))
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    configmap = k8s["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    return args, serve_config(args, configmap["data"][config_path.name])


def test_k8s_has_every_object_and_the_config_loads() -> None:
    k8s = manifests()
    assert set(k8s) == {
        "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap",
        "Secret",
    }  # fmt: skip
    _, config = k8s_config(k8s)
    assert config.server.host == "0.0.0.0"
    assert config.static or config.discovery.sources, "the edge is given some servers"


def test_k8s_probes_ports_and_drain_agree() -> None:
    k8s = manifests()
    pod, container = pod_of(k8s)
    _, config = k8s_config(k8s)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.server.port in ports.values()
    for probe, path in (("readinessProbe", "/ready"), ("livenessProbe", "/health")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == config.server.port
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert int(pre_stop[1]) + config.server.drain_timeout_s < grace


def test_k8s_runs_as_the_image_user_with_resources_and_secrets() -> None:
    k8s = manifests()
    pod, container = pod_of(k8s)
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    image_user = [rest for word, rest in final_stage() if word == "USER"][-1]
    assert str(security["runAsUser"]) == image_user.split(":")[0]
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"], "the HPA needs a CPU request"
    secret = k8s["Secret"]
    names = [e["secretRef"]["name"] for e in container["envFrom"]]
    assert names == [secret["metadata"]["name"]]
    assert {"EDGE_AFFINITY_SECRET", "EDGE_REDIS_URL"} <= set(secret["stringData"])


def test_k8s_service_hpa_and_pdb_select_the_deployment() -> None:
    k8s = manifests()
    pod, container = pod_of(k8s)
    labels = pod["metadata"]["labels"]
    deployment = k8s["Deployment"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    port_names = {p["name"] for p in container["ports"]}
    assert all(p["targetPort"] in port_names for p in service["ports"])
    hpa = k8s["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"], "a PDB needs two pods to evict one"
    pdb = k8s["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_k8s_affinity_secret_reaches_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    k8s = manifests()
    shared = k8s["Secret"]["stringData"]["EDGE_AFFINITY_SECRET"]
    monkeypatch.setenv("EDGE_AFFINITY_SECRET", shared)
    _, config = k8s_config(k8s)
    assert config.routing.cookie_secret == shared, "replicas must sign cookies alike"
