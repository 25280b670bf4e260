"""docker-compose.yml, config/nginx.conf and config/prometheus.yml agree with the repo.

No Docker engine is needed: the compose file is parsed, every path it names is checked, and
nginx (when installed) checks the nginx config rendered for loopback replicas.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from embedserve.settings import Settings
from tests import nginxutil

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
SCALED = "embedserve"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose["services"]
    assert isinstance(found, dict)
    return found


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of every short-syntax bind mount (a source starting with . or /)."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts.append((source, target))
    return mounts


def seconds(duration: str) -> float:
    """A compose duration such as ``40s``, ``1m30s`` or ``500ms``, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_build_contexts_and_dockerfiles_exist(compose: dict[str, Any]) -> None:
    built = {name: svc["build"] for name, svc in services(compose).items() if "build" in svc}
    assert SCALED in built
    for name, build in built.items():
        context = ROOT / build["context"]
        assert context.is_dir(), f"{name}: build context {context} missing"
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_build_args_come_from_the_environment_with_the_dockerfiles_defaults(
    compose: dict[str, Any],
) -> None:
    """`TORCH_INDEX_URL=... docker compose build` reaches the Dockerfile; unset, its default."""
    declared = dict(
        line.removeprefix("ARG ").partition("=")[::2]
        for line in (ROOT / "Dockerfile").read_text().splitlines()
        if line.startswith("ARG ")
    )
    for name, service in services(compose).items():
        if "build" not in service:
            continue
        args = service["build"]["args"]
        assert "TORCH_INDEX_URL" in args, name
        for arg, value in args.items():
            assert arg in declared, f"{name}: build arg {arg} is not an ARG of the Dockerfile"
            default = declared[arg].strip('"')
            assert value == f"${{{arg}:-{default}}}", f"{name}: {arg}: {value}"


def test_every_bind_mount_source_exists(compose: dict[str, Any]) -> None:
    mounts = [(n, s, t) for n, svc in services(compose).items() for s, t in bind_mounts(svc)]
    assert mounts
    for name, source, _ in mounts:
        assert not source.startswith("/"), f"{name}: {source} is a host path outside the repo"
        assert (ROOT / source).exists(), f"{name}: bind source {source} missing"


def test_scaled_service_has_no_fixed_name_or_host_port(compose: dict[str, Any]) -> None:
    service = services(compose)[SCALED]
    assert "container_name" not in service
    assert "ports" not in service
    assert [str(port) for port in service["expose"]] == ["8000"]


def test_stop_grace_period_exceeds_shutdown_grace(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        env = service.get("environment", {})
        if "SHUTDOWN_GRACE_S" not in env:
            continue
        grace = float(env["SHUTDOWN_GRACE_S"])
        Settings.build(shutdown_grace_s=grace)  # a valid value
        assert seconds(service["stop_grace_period"]) > grace, name


def test_environment_names_are_settings(compose: dict[str, Any]) -> None:
    names = {
        choice
        for field in Settings.model_fields.values()
        for choice in getattr(field.validation_alias, "choices", [])
    }
    for name, service in services(compose).items():
        if name.startswith(SCALED):
            unknown = set(service["environment"]) - names - {"PYTHONPATH"}
            assert not unknown, f"{name}: {unknown} are not embedserve settings"


def test_healthcheck_probes_health(compose: dict[str, Any]) -> None:
    test = services(compose)[SCALED]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert "/health" in " ".join(test)


def test_nginx_fronts_the_service_with_the_repo_config(compose: dict[str, Any]) -> None:
    nginx = services(compose)["nginx"]
    assert ("./config/nginx.conf", "/etc/nginx/nginx.conf") in bind_mounts(nginx)
    assert any(str(port).endswith(":8000") for port in nginx["ports"])
    assert SCALED in nginx["depends_on"]
    conf = nginxutil.NGINX_CONF.read_text()
    assert f"server {SCALED}:8000 " in conf


def test_profiles(compose: dict[str, Any]) -> None:
    all_services = services(compose)
    assert all_services["prometheus"]["profiles"] == ["monitoring"]
    assert ("./config/prometheus.yml", "/etc/prometheus/prometheus.yml") in bind_mounts(
        all_services["prometheus"]
    )
    dev = [svc for svc in all_services.values() if "dev" in svc.get("profiles", [])]
    assert len(dev) == 1
    assert "watchfiles" in dev[0]["entrypoint"]
    assert "profiles" not in all_services[SCALED]
    assert "profiles" not in all_services["nginx"]


def test_prometheus_scrapes_every_replica() -> None:
    config = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == SCALED]
    [dns] = job["dns_sd_configs"]
    assert dns["names"] == [SCALED]
    assert dns["port"] == 8000


def test_nginx_limits_match_settings() -> None:
    conf = re.sub(r"#.*", "", nginxutil.NGINX_CONF.read_text())  # directives only
    defaults = Settings.build()
    body = re.search(r"client_max_body_size (\d+)m;", conf)
    assert body and int(body[1]) * 1024 * 1024 == defaults.max_request_bytes
    read = re.search(r"proxy_read_timeout (\d+)s;", conf)
    assert read and int(read[1]) > defaults.request_timeout_s
    assert "proxy_next_upstream_tries 2;" in conf
    assert 'proxy_set_header Connection "";' in conf
    assert "return" not in conf  # CORS preflights (OPTIONS) reach embedserve


def test_render_rejects_a_template_without_markers(tmp_path: Path) -> None:
    template = tmp_path / "nginx.conf"
    template.write_text(nginxutil.NGINX_CONF.read_text().replace("# BEGIN SERVERS", "#"))
    with pytest.raises(ValueError, match="SERVERS"):
        nginxutil.render(["127.0.0.1:1"], 8080, tmp_path, template)


def test_render_keeps_passive_health_per_server(tmp_path: Path) -> None:
    text = nginxutil.render(["127.0.0.1:1", "127.0.0.1:2"], 18080, tmp_path)
    servers = re.findall(r"^\s*server (\S+) (.*);$", text, re.MULTILINE)
    assert [address for address, _ in servers] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert all("max_fails=" in params and "fail_timeout=" in params for _, params in servers)
    assert "listen 127.0.0.1:18080;" in text
    assert "/var/" not in text


def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    binary = nginxutil.nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (`make test` installs Debian's nginx)")
    conf = nginxutil.write_config(["127.0.0.1:1", "127.0.0.1:2"], 18080, tmp_path)
    output = nginxutil.check_config(binary, tmp_path, conf)
    assert "test is successful" in output
