"""docker-compose.yml as data: it parses, its settings are ones the code reads and accepts,
every service is waited on properly, ports stay on loopback, pulled images are pinned.

Parsed by `docker compose config` where Compose v2 is installed, else as YAML with the
`${VAR:-default}` defaults filled in as Compose would (no variables set). The stack itself
runs in `make compose-test`.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from pydantic_settings import BaseSettings

from ranker.serving.service import ServingSettings
from sandbox.settings import SandboxSettings
from streaming.settings import StreamSettings

ROOT = Path(__file__).resolve().parent.parent
MAIN = ROOT / "docker-compose.yml"
STANDIN = ROOT / "docker-compose.standin.yml"
ALL_PROFILES = "cpu,gpu"
OUR_IMAGE = "climber:local"


def _compose_binary_env() -> dict | None:
    """An environment in which `docker compose` runs, or None (then YAML is parsed directly)."""
    if shutil.which("docker") is None:
        return None
    env = {**os.environ, "COMPOSE_PROFILES": ALL_PROFILES}
    cached = Path.home() / ".cache" / "climber-compose" / "tools"
    plugin = next(cached.glob("lib/python3*/site-packages/compose/docker-compose"), None) if cached.exists() else None
    for config in ([None] + ([str(plugin)] if plugin else [])):
        trial = dict(env)
        if config:  # the compose test's cached plugin, linked into a throwaway config dir
            home = Path(tempfile.mkdtemp(prefix="climber-compose-unit-"))
            atexit.register(shutil.rmtree, home, True)
            (home / "cli-plugins").mkdir()
            (home / "cli-plugins" / "docker-compose").symlink_to(config)
            trial["DOCKER_CONFIG"] = str(home)
        probe = subprocess.run(["docker", "compose", "version"], env=trial, capture_output=True, text=True)
        if probe.returncode == 0:
            return trial
    return None


class _ResetLoader(yaml.SafeLoader):
    """SafeLoader that knows Compose's `!reset` tag (an override emptying a value)."""


_ResetLoader.add_constructor("!reset", lambda loader, node: None)
_DEFAULT = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


def _yaml_config(files: list[Path]) -> dict:
    """The files merged the way these two need (service keys replaced, not deep-merged
    except build/healthcheck mappings), defaults of ${VAR:-x} substituted."""
    merged: dict = {"services": {}}
    for path in files:
        text = _DEFAULT.sub(lambda m: m.group(2) or "", path.read_text())
        data = yaml.load(text, Loader=_ResetLoader)
        for name, service in data.get("services", {}).items():
            into = merged["services"].setdefault(name, {})
            for key, value in service.items():
                if isinstance(value, dict) and isinstance(into.get(key), dict):
                    into[key] = {**into[key], **value}
                else:
                    into[key] = value
    for service in merged["services"].values():  # Compose's long forms
        env = service.get("environment")
        if isinstance(env, list):
            service["environment"] = dict(item.split("=", 1) for item in env)
    return merged


def compose_config(files: list[Path]) -> dict:
    env = _compose_binary_env()
    if env is None:
        return _yaml_config(files)
    args = ["docker", "compose", "--project-directory", str(ROOT)]
    for path in files:
        args += ["-f", str(path)]
    done = subprocess.run(args + ["config", "--format", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"docker compose config failed:\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module", params=["main", "main+standin"])
def config(request) -> dict:
    return compose_config([MAIN] if request.param == "main" else [MAIN, STANDIN])


def _env_names(model: type[BaseSettings], prefix: str, nested: str | None = None) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(f"{prefix}{name}".upper())
        alias = field.validation_alias
        for choice in getattr(alias, "choices", []):
            names.add(str(choice).upper())
        if nested and hasattr(field.annotation, "model_fields"):  # nested models: PREFIX_FIELD__SUBFIELD
            names |= _env_names(field.annotation, f"{prefix}{name}{nested}", nested)
    return names


# Every variable our image reads: the three settings models, by their own prefixes.
READ_BY_CODE = (_env_names(SandboxSettings, "CLIMBER_", "__") | _env_names(StreamSettings, "CLIMBER_STREAM_")
                | _env_names(ServingSettings, "CLIMBER_SERVE_"))


def ours(config: dict) -> dict[str, dict]:
    return {name: s for name, s in config["services"].items() if s.get("image") == OUR_IMAGE}


def test_services_are_the_documented_topology(config):
    assert set(config["services"]) == {"kafka", "redis", "topics", "worker", "worker-tracks", "model", "ranker",
                                       "ranker-gpu", "sandbox"}


def test_every_variable_set_for_our_image_is_one_the_code_reads(config):
    unread = {f"{name}: {key}" for name, service in ours(config).items()
              for key in (service.get("environment") or {}) if key not in READ_BY_CODE}
    assert not unread, f"set but read by no settings model: {sorted(unread)}"


def test_the_settings_each_service_gets_are_accepted(config, monkeypatch):
    """The values validate: a typo'd literal or a bad number would fail here, not in a container."""
    for name, service in ours(config).items():
        env = {k: str(v) for k, v in (service.get("environment") or {}).items()}
        with monkeypatch.context() as patch:
            for key in [k for k in os.environ if k.startswith(("CLIMBER_", "KAFKA_"))]:
                patch.delenv(key)
            for key, value in env.items():
                patch.setenv(key, value)
            if any(k.startswith("CLIMBER_STREAM_") or k == "KAFKA_BOOTSTRAP" for k in env):
                StreamSettings()
            if any(k.startswith("CLIMBER_SERVE_") for k in env):
                ServingSettings()
            if name == "sandbox":
                settings = SandboxSettings()
                assert settings.transport == "kafka" and settings.workers == 0
                assert settings.experiment.rankers["treatment"].startswith("http://ranker:")


def test_workers_sandbox_and_ranker_share_topics_partitions_and_feast(config):
    services = config["services"]
    sandbox = services["sandbox"]["environment"]
    run_feast = f"/app/runs/{sandbox['CLIMBER_RUN_ID']}/feast"
    for name in ("topics", "worker", "worker-tracks"):
        env = services[name]["environment"]
        assert env["CLIMBER_STREAM_FEAST_DIR"] == run_feast, name
        assert str(env["CLIMBER_STREAM_PARTITIONS"]) == str(sandbox["CLIMBER_KAFKA_PARTITIONS"]), name
        assert env["KAFKA_BOOTSTRAP"] == sandbox["CLIMBER_KAFKA_BOOTSTRAP"], name
        # the workers' plausibility bounds are the sandbox's catalogue
        assert str(env["CLIMBER_STREAM_N_USERS"]) == str(sandbox["CLIMBER_SIM__N_USERS"]), name
        assert str(env["CLIMBER_STREAM_N_TRACKS"]) == str(sandbox["CLIMBER_SIM__N_TRACKS"]), name
    for name in ("ranker", "ranker-gpu"):
        command = services[name]["command"]
        assert command[command.index("--feast-dir") + 1] == run_feast
    assert services["worker"]["command"][-2:] == ["--role", "sequences"]
    assert services["worker-tracks"]["command"][-2:] == ["--role", "tracks"]


def test_every_service_is_healthchecked_or_a_one_shot_that_others_wait_for(config):
    services = config["services"]
    waited = {(dep, cond["condition"]) for s in services.values() for dep, cond in (s.get("depends_on") or {}).items()}
    for name, service in services.items():
        check = service.get("healthcheck") or {}
        if check.get("test") and not check.get("disable"):
            assert check["test"][0] in ("CMD", "CMD-SHELL"), name
            continue
        assert service.get("restart", "no") == "no", f"{name}: no healthcheck and restarts"
        # The sandbox ends the run: `docker compose wait sandbox` is what waits for it.
        assert name == "sandbox" or (name, "service_completed_successfully") in waited, \
            f"{name} has no healthcheck and nothing waits for it to complete"
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            want = "service_healthy" if services[dep].get("healthcheck", {}).get("test") else \
                "service_completed_successfully"
            assert cond["condition"] == want, f"{name} waits for {dep} with {cond['condition']}, not {want}"


def test_published_ports_bind_loopback_only(config):
    for name, service in config["services"].items():
        for port in service.get("ports") or []:
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).split(":")[0]
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"


def test_images_that_are_pulled_are_pinned_by_digest():
    services = compose_config([MAIN])["services"]
    pulled = {name: s["image"] for name, s in services.items() if "build" not in s}
    assert set(pulled) == {"kafka", "redis"}
    for name, image in pulled.items():
        assert re.search(r"@sha256:[0-9a-f]{64}$", image), f"{name}: {image} is not pinned by digest"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=\S+@sha256:[0-9a-f]{64}$", dockerfile, re.M)


def test_gpu_ranker_reserves_an_nvidia_device_and_answers_as_ranker():
    services = compose_config([MAIN])["services"]
    gpu = services["ranker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["environment"]["CLIMBER_SERVE_DEVICE"] == "cuda"
    assert "ranker" in (gpu["networks"]["default"] or {}).get("aliases", [])
    assert gpu["profiles"] == ["gpu"] and services["ranker"]["profiles"] == ["cpu"]


def test_standin_override_changes_images_not_the_topology():
    main, both = compose_config([MAIN])["services"], compose_config([MAIN, STANDIN])["services"]
    assert set(main) == set(both)
    for name in set(main) - {"kafka", "redis"}:
        assert both[name].get("environment") == main[name].get("environment"), name
        assert both[name].get("command") == main[name].get("command"), name
        assert both[name].get("depends_on") == main[name].get("depends_on"), name


def test_dockerignore_keeps_environments_runs_and_history_out():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)


def test_the_image_gets_every_package_the_project_installs():
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = set(re.findall(r"^COPY (\w+) \1$", (ROOT / "Dockerfile").read_text(), re.M))
    assert {pattern.rstrip("*") for pattern in include} <= copied
