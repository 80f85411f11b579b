"""``models.fill``: the chart's Job that fills the models volume from S3 with ``sdfleet models``.
Rendered offline (Helm's own engine), validated against Kubernetes schemas, and its command run
for real against moto with the rendered fleet file."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import helm_python as helm
import kubernetes_validate
import pytest
from k8s_checks import CHART, K8S_VERSIONS, merge, render, value_sets

SETS = value_sets()
BUCKET_URL = "s3://models-bucket/sd"


def with_fill(name: str = "aws-diffusers", **fill: Any) -> dict[str, Any]:
    values = merge(SETS[name], {"models": {"fill": {"enabled": True, **fill}}})
    values["fleet"] = merge(values.get("fleet", {}), {"models": {"s3": BUCKET_URL}})
    return values


def jobs(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "Job" and o["metadata"]["name"].endswith("models-fill")]


def test_off_by_default() -> None:
    for values in SETS.values():
        assert jobs(render(values)) == []


def test_the_job_syncs_every_model_down_into_the_volume() -> None:
    (job,) = jobs(render(with_fill()))
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == [
        "models",
        "sync",
        "--direction",
        "down",
        "--remote",
        BUCKET_URL,
        "--dir",
        "/models",
        "--jobs",
        "8",
    ]
    assert container["image"].startswith("ghcr.io/example/sdfleet-agent:")  # no torch needed
    models = next(v for v in spec["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "fleet-sdfleet-models"}  # writable
    assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
    assert spec["serviceAccountName"] == "fleet-sdfleet-worker"  # the role that reads models.s3
    assert spec["restartPolicy"] == "OnFailure"  # a retry resumes from the partial files
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(job, version, strict=True)
    report = helm.lint(CHART, with_fill(), strict=True, kube_version="v1.33.0")
    assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


def test_listed_models_are_pulled_by_name_with_the_worker_image() -> None:
    values = with_fill(
        models=["v1-5-pruned-emaonly.safetensors", "hf:stabilityai/sd-turbo"],
        image="worker",
        hook=False,
        s3="s3://other/models",
    )
    (job,) = jobs(render(values))
    assert "annotations" not in job["metadata"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["args"][:5] == [
        "models",
        "pull",
        "v1-5-pruned-emaonly.safetensors",
        "hf:stabilityai/sd-turbo",
        "--from",
    ]
    assert container["args"][5] == "s3://other/models"
    assert container["image"].startswith("ghcr.io/example/sdfleet-worker:")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"models": {"volume": {"type": "none"}}}, "needs a models volume"),
        ({"models": {"volume": {"type": "s3", "s3": {"bucket": "b"}}}}, "is the bucket itself"),
        ({"fleet": {"models": {"s3": ""}}}, "needs models.fill.s3 or fleet.models.s3"),
    ],
)
def test_a_fill_that_cannot_work_fails_the_render(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(Exception, match=message):
        render(merge(with_fill(), extra))


def test_the_rendered_command_fills_a_folder(tmp_path: Path, moto_url: str) -> None:
    bucket = f"fill-{uuid.uuid4().hex[:8]}"
    s3 = boto3.client("s3", endpoint_url=moto_url)
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="sd/a.safetensors", Body=b"weights" * 1000)
    values = with_fill()
    values["fleet"]["models"]["s3"] = f"s3://{bucket}/sd"
    objs = render(values)
    (job,) = jobs(objs)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    fleet_map = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-fleet"))
    (tmp_path / "sdfleet.yaml").write_text(fleet_map["data"]["sdfleet.yaml"])
    args = [str(tmp_path / "models") if a == "/models" else a for a in container["args"]]
    env = {**os.environ, "SDFLEET_CONFIG_FILE": str(tmp_path / "sdfleet.yaml"), "COLUMNS": "200"}
    run = subprocess.run(
        [sys.executable, "-c", "from sdfleet.cli import main; main()", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "models" / "a.safetensors").read_bytes() == b"weights" * 1000
    assert "synced: 1 file(s)" in run.stdout
