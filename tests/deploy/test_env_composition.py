"""Defect 7 of issue 14: the environment a container would see, resolved as the kubelet does
(``envFrom`` first, ``env`` entries override, ``$(VAR)`` expanded from entries above), reaches a
password-protected redis-server from every pod the chart renders: no plain value hides the password."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from k8s_checks import of_kind, pod_spec, render, value_sets
from local_services import LocalRedis

from sdfleet._redis import connect
from sdfleet.settings import Settings

PASSWORD = secrets.token_hex(16)
_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def resolve_env(
    container: dict[str, Any], data: dict[str, dict[str, str]], fields: dict[str, str] | None = None
) -> dict[str, str]:
    """The container's environment from Secrets ``data`` (name → key → value) and the pod's
    ``fields`` (downward API: ``metadata.name`` → value), as Kubernetes builds it."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(data[source["secretRef"]["name"]])
    for entry in container.get("env", []):
        if "valueFrom" in entry:
            source = entry["valueFrom"]
            if "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                env[entry["name"]] = (fields or {}).get(path, f"<{path} of the pod>")
                continue
            ref = source["secretKeyRef"]
            env[entry["name"]] = data[ref["name"]][ref["key"]]
            continue

        def expand(m: re.Match[str], known: dict[str, str] | None = None) -> str:
            if known is None:
                known = dict(env)
            if m.group(0) == "$$":
                return "$"
            return known.get(m.group(1), m.group(0))

        env[entry["name"]] = _REF.sub(expand, entry.get("value", ""))
    return env


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    server = LocalRedis(tmp_path_factory.mktemp("locked-redis"), "--requirepass", PASSWORD)
    yield server.port
    server.stop()


def _containers(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objs:
        if obj["kind"] in ("Deployment", "ScaledJob", "Job"):
            spec = pod_spec(obj) if obj["kind"] != "Job" else obj["spec"]["template"]["spec"]
            for c in spec["containers"]:
                yield f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", c


async def test_every_pod_reaches_the_locked_redis(locked_redis: int, monkeypatch: pytest.MonkeyPatch) -> None:
    values = value_sets()["redis"]
    values["redis"]["address"] = f"127.0.0.1:{locked_redis}"
    values["urls"]["bus"] = f"redis://127.0.0.1:{locked_redis}/0?prefix=envtest"
    # A stale URL without the password in the app Secret must not win either.
    data = {
        "redis-auth": {"password": PASSWORD},
        "sdfleet-env": {
            "SDFLEET_API__SIGNING_KEY": "k",
            "SDFLEET_BUS_URL": f"redis://127.0.0.1:{locked_redis}/0",
        },
    }
    objs = render(values)
    seen = list(_containers(objs))
    assert {name.split("/")[0] for name, _ in seen} == {"Deployment", "ScaledJob", "Job"}
    for name, container in seen:
        env = resolve_env(container, data)
        for key in [k for k in list(env) if k.startswith("SDFLEET_")]:
            monkeypatch.setenv(key, env[key])
        settings = Settings()
        for url in (settings.bus, settings.store):
            assert PASSWORD in url, name
            client, _ = connect(url)
            try:
                assert await client.ping(), name
            finally:
                await client.aclose()
    (auth,) = of_kind(objs, "TriggerAuthentication")
    ref = auth["spec"]["secretTargetRef"][0]
    assert data[ref["name"]][ref["key"]] == PASSWORD, "KEDA reads the same Secret"


def test_the_resolver_sees_what_the_old_chart_lost() -> None:
    """Control: a plain SDFLEET_BUS_URL entry overrides the Secret's (what `deploy values` used to
    write), and $(VAR) expands only from entries above it."""
    container = {
        "envFrom": [{"secretRef": {"name": "s"}}],
        "env": [
            {"name": "SDFLEET_BUS_URL", "value": "redis://r:6379/0"},
            {"name": "B", "value": "x$(A)y$$(A)"},
            {"name": "A", "value": "1"},
        ],
    }
    env = resolve_env(container, {"s": {"SDFLEET_BUS_URL": "redis://:pw@r:6379/0"}})
    assert env["SDFLEET_BUS_URL"] == "redis://r:6379/0"
    assert env["B"] == "x$(A)y$(A)"


def test_chart_values_from_the_cli_carry_the_password_secret(tmp_path: Path) -> None:
    import yaml
    from k8s_checks import CLUSTER, merge
    from typer.testing import CliRunner

    from sdfleet.cli import app

    fleet = tmp_path / "sdfleet.yaml"
    fleet.write_text("queues: [{name: q}]\n")
    args = ["deploy", "values", "-c", str(fleet), "--engine", "redis", "--redis-address", "r:6379"]
    args += ["--redis-password-secret", "redis-auth:pw", "--storage", "s3://b/out"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    values = yaml.safe_load(result.stdout)
    assert values["redis"]["passwordSecret"] == {"name": "redis-auth", "key": "pw"}
    assert values["ensureJob"] == {"enabled": True}
    objs = render(merge(values, CLUSTER))
    for _, container in _containers(objs):
        env = resolve_env(container, {"redis-auth": {"pw": "s3cret"}, "sdfleet-env": {}})
        assert env["SDFLEET_BUS_URL"] == "redis://:s3cret@r:6379/0?prefix=sdfleet"
