"""``sdfleet deploy values``: from sdfleet.yaml to chart values that render."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from k8s_checks import CLUSTER, merge, of_kind, render
from typer.testing import CliRunner

from sdfleet.cli import app
from sdfleet.deploy import chart_values, sqs_queue_url
from sdfleet.errors import ConfigError
from sdfleet.settings import FleetConfig

FLEET = """
queues:
  - name: sd15
    filter: {sd_model_checkpoint: ["v1-5-pruned-emaonly.safetensors"]}
    scaling: {min: 0, max: 6, target_backlog: 4}
  - name: webui
    runtime: a1111
models: {dir: ./models}
"""


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    path = tmp_path / "sdfleet.yaml"
    path.write_text(FLEET)
    return path


def test_cli_output_renders_with_one_worker_and_scaler_per_queue(fleet_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "not-yet" / "values.yaml"  # its folder is made
    args = [
        "deploy",
        "values",
        "-c",
        str(fleet_file),
        "--region",
        "eu-central-1",
        "--account",
        "210987654321",
    ]
    result = CliRunner().invoke(app, [*args, "--prefix", "prod-", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 2 queues" in " ".join(result.output.split())
    values = yaml.safe_load(out.read_text())
    assert values["fleet"]["models"]["dir"] == "/models"
    objs = render(merge(values, CLUSTER))
    urls = {
        s["metadata"]["labels"]["sdfleet.io/queue"]: s["spec"]["triggers"][0]["metadata"]["queueURL"]
        for s in of_kind(objs, "ScaledObject")
    }
    assert urls == {
        "sd15": "https://sqs.eu-central-1.amazonaws.com/210987654321/prod-sd15",
        "webui": "https://sqs.eu-central-1.amazonaws.com/210987654321/prod-webui",
    }
    (cm,) = of_kind(objs, "ConfigMap")
    mounted = FleetConfig.model_validate(yaml.safe_load(cm["data"]["sdfleet.yaml"]))
    assert [q.name for q in mounted.queues] == ["sd15", "webui"]
    assert mounted.runtimes["a1111"]["url"] == "http://127.0.0.1:7860"


def test_cli_redis_to_stdout(fleet_file: Path) -> None:
    args = ["deploy", "values", "-c", str(fleet_file), "--engine", "redis", "--redis-address", "r:6379"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    values = yaml.safe_load(result.stdout)
    assert values["queues"][0]["trigger"] == {"stream": "sdfleet:queue:sd15", "consumerGroup": "sdfleet"}
    assert values["urls"]["bus"] == "redis://r:6379/0?prefix=sdfleet"
    objs = render(merge(values, CLUSTER))
    assert len(of_kind(objs, "ScaledObject")) == 2


def test_cli_aws_without_account_fails_cleanly(fleet_file: Path) -> None:
    result = CliRunner().invoke(app, ["deploy", "values", "-c", str(fleet_file), "--region", "eu-west-1"])
    assert result.exit_code == 2
    assert "--account" in result.output


@pytest.mark.parametrize(
    "kwargs",
    [
        {"engine": "aws", "region": "eu-west-1", "account": "12345"},
        {"engine": "aws", "region": "Europe", "account": "123456789012"},
        {"engine": "aws", "region": "eu-west-1", "account": "123456789012", "prefix": "bad prefix "},
        {"engine": "kafka"},
        {"engine": "redis", "redis_address": "redis-master.redis"},  # KEDA dials it as given: no port
        {"engine": "redis", "redis_address": "redis://r:6379"},
    ],
)
def test_bad_inputs_are_config_errors(kwargs: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        chart_values(FleetConfig(), **kwargs)  # type: ignore[arg-type]


def test_queue_url_shape() -> None:
    assert (
        sqs_queue_url("us-east-1", "123456789012", "q")
        == "https://sqs.us-east-1.amazonaws.com/123456789012/q"
    )
