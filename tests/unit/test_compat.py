"""The seed's wire formats: its example payloads in, its answers and notifications out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdfleet.compat import sns, v1alpha1, v1alpha2
from sdfleet.errors import ValidationFailed
from sdfleet.tasks import Origin, Task, TaskRecord, TaskResult, TaskState, TaskType
from seed_payloads import (
    IMAGE_LINK_PLACEHOLDER,
    SEED_IMAGE_LINK,
    V1ALPHA1_I2I,
    V1ALPHA1_I2I_DOCS,
    V1ALPHA1_T2I,
    V1ALPHA2_EXTRA_SINGLE_IMAGE,
    V1ALPHA2_I2I,
    V1ALPHA2_I2I_IMAGE_LINK,
    V1ALPHA2_PIPELINE,
    V1ALPHA2_T2I,
    copy_of,
    lambda_message,
    sns_envelope,
    with_image_link,
)


def test_v1alpha1_text_to_image() -> None:
    task = v1alpha1.to_task(copy_of(V1ALPHA1_T2I), tenant="acme")
    assert (task.id, task.tenant, task.type, task.origin) == (
        "test-t2i",
        "acme",
        TaskType.TEXT_TO_IMAGE,
        Origin.V1ALPHA1,
    )
    assert task.model == "v1-5-pruned-emaonly.safetensors"
    p = task.params
    assert (p.prompt, p.steps, p.width, p.height, p.init_images, p.extra) == ("A dog", 16, 512, 512, [], {})
    assert task.output_prefix == "outputs"
    assert task.context == {}


def test_v1alpha1_image_to_image() -> None:
    task = v1alpha1.to_task(copy_of(V1ALPHA1_I2I), tenant="acme")
    p = task.params
    assert task.type is TaskType.IMAGE_TO_IMAGE and task.id == "17836"
    assert p.prompt == "A fantasy landscape, trending on artstation, mystical sky"
    assert (p.steps, p.width, p.height, p.cfg_scale, p.denoising_strength) == (16, 512, 512, 7.0, 0.75)
    assert (p.seed, p.sampler, p.negative_prompt) == (-1, "Euler", "nude, disfigured, blurry")
    assert p.init_images == [IMAGE_LINK_PLACEHOLDER]
    # uid and sd_vae are the seed's bookkeeping: dropped like its agent does since 1.0
    assert p.extra == {}


def test_v1alpha1_without_save_dir_uses_default_prefix_then_tenant() -> None:
    assert v1alpha1.to_task(copy_of(V1ALPHA1_I2I_DOCS), tenant="acme").output_prefix == "acme"
    task = v1alpha1.to_task(copy_of(V1ALPHA1_I2I_DOCS), tenant="acme", default_bucket_prefix="/outputs/")
    assert task.output_prefix == "outputs"
    assert task.model == "revAnimated_v122.safetensors"


def test_v1alpha1_keeps_unknown_a1111_keys_and_scripts() -> None:
    body = copy_of(V1ALPHA1_T2I)
    body["alwayson_scripts"]["controlnet"] = {"args": [{"module": "openpose", "enabled": True}]}
    body["alwayson_scripts"]["override_settings"] = {"CLIP_stop_at_last_layers": 2}
    body["override_settings"] = {"sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors"}
    body["n_iter"] = 3
    task = v1alpha1.to_task(body, tenant="t")
    assert task.params.extra == {
        "alwayson_scripts": {"controlnet": {"args": [{"module": "openpose", "enabled": True}]}},
        "override_settings": {
            "sd_vae": "vae-ft-mse-840000-ema-pruned.safetensors",
            "CLIP_stop_at_last_layers": 2,
        },
        "n_iter": 3,
    }
    assert task.params.clip_skip == 2


def test_an_a1111_body_without_a_sampler_runs_sd_webuis_default() -> None:
    """SD WebUI's API runs Euler when a request names no sampler (its ``sampler_index`` default);
    the diffusers runtime ran the model's own scheduler (the real SD WebUI's infotexts said
    Euler where sdfleet's said the model's, ``test_styles_interop``)."""
    from sdfleet.compat._common import params_from_a1111

    for kind in (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE):
        assert params_from_a1111(kind, {"prompt": "a"}).sampler == "Euler"
        assert params_from_a1111(kind, {"prompt": "a", "sampler_name": ""}).sampler == "Euler"
        assert params_from_a1111(kind, {"prompt": "a", "sampler_index": "DDIM"}).sampler == "DDIM"
        assert params_from_a1111(kind, {"sampler_name": "Heun", "sampler_index": "DDIM"}).sampler == "Heun"
    assert params_from_a1111(TaskType.EXTRA_SINGLE_IMAGE, {"image": "aGk="}).sampler is None


def test_v1alpha1_answer_and_attributes() -> None:
    task = v1alpha1.to_task(copy_of(V1ALPHA1_T2I), tenant="t")
    assert v1alpha1.answer(task, "s3://outputbucket/outputs/test-t2i") == {
        "id_task": "test-t2i",
        "sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors",
        "output_location": "s3://outputbucket/outputs/test-t2i",
    }
    assert v1alpha1.attributes(task) == {"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors"}


def test_v1alpha2_text_to_image() -> None:
    task = v1alpha2.to_task(copy_of(V1ALPHA2_T2I), tenant="acme")
    assert (task.id, task.type, task.runtime, task.origin) == (
        "test-t2i",
        TaskType.TEXT_TO_IMAGE,
        "sdruntime",
        Origin.V1ALPHA2,
    )
    assert task.model is None
    assert (task.params.prompt, task.params.steps, task.params.width) == ("A dog", 16, 512)
    assert task.output_prefix == "output"
    assert task.context == ""
    assert v1alpha2.answer(task, "s3://b/output/test-t2i") == {
        "id": "test-t2i",
        "runtime": "sdruntime",
        "output_location": "s3://b/output/test-t2i",
    }
    assert v1alpha2.attributes(task) == {"runtime": "sdruntime"}


@pytest.mark.parametrize(
    "payload", [V1ALPHA2_I2I, V1ALPHA2_I2I_IMAGE_LINK], ids=["init_images", "image_link"]
)
def test_v1alpha2_image_to_image(payload: dict[str, Any]) -> None:
    task = v1alpha2.to_task(with_image_link(payload, "http://127.0.0.1:9/cat.png"), tenant="t")
    assert task.type is TaskType.IMAGE_TO_IMAGE
    assert task.params.init_images == ["http://127.0.0.1:9/cat.png"]
    assert task.params.extra == {}


def test_v1alpha2_model_switch_and_context() -> None:
    body = copy_of(V1ALPHA2_T2I)
    body["task"]["content"]["alwayson_scripts"] = {"sd_model_checkpoint": "sd_xl_turbo_1.0.safetensors"}
    body["task"]["metadata"]["context"] = {"abc": 123}
    task = v1alpha2.to_task(body, tenant="t")
    assert task.model == "sd_xl_turbo_1.0.safetensors"
    assert task.context == {"abc": 123}
    del body["task"]["metadata"]["context"]
    assert v1alpha2.to_task(body, tenant="t").context == {}


def test_v1alpha2_extra_single_image_and_pipeline() -> None:
    extra = v1alpha2.to_task(copy_of(V1ALPHA2_EXTRA_SINGLE_IMAGE), tenant="t")
    assert extra.type is TaskType.EXTRA_SINGLE_IMAGE
    assert (extra.params.init_images, extra.params.upscaler, extra.params.upscaling_resize) == (
        [SEED_IMAGE_LINK],
        "R-ESRGAN 4x+",
        4.0,
    )
    assert extra.params.extra["upscaler_2"] == "None"
    pipe = v1alpha2.to_task(copy_of(V1ALPHA2_PIPELINE), tenant="t")
    assert pipe.type is TaskType.PIPELINE and pipe.model is None
    assert pipe.params.workflow == V1ALPHA2_PIPELINE["task"]["content"]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("alwayson_scripts"), "alwayson_scripts is missing"),
        (lambda b: b["alwayson_scripts"].pop("task"), "task is missing"),
        (lambda b: b["alwayson_scripts"].pop("sd_model_checkpoint"), "sd_model_checkpoint is missing"),
        (lambda b: b["alwayson_scripts"].pop("id_task"), "id_task is missing"),
        (lambda b: b["alwayson_scripts"].update(task="text-to-video"), "unknown task type 'text-to-video'"),
        (lambda b: b["alwayson_scripts"].update(task="pipeline"), "not accepted by this API version"),
        (lambda b: b.pop("prompt"), "needs a non-empty prompt"),
        (lambda b: b["alwayson_scripts"].update(id_task="a b"), "invalid id_task"),
        (lambda b: b["alwayson_scripts"].update(save_dir="../etc"), "invalid prefix"),
        (lambda b: b.update(width=500), "^invalid width: must be a multiple of 8, got 500$"),
        (
            lambda b: b.update(steps="many"),
            "^invalid steps: Input should be a valid integer.* [(]got 'many'[)]$",
        ),
    ],
)
def test_v1alpha1_invalid(mutate: Any, reason: str) -> None:
    body = copy_of(V1ALPHA1_T2I)
    mutate(body)
    with pytest.raises(ValidationFailed, match=reason):
        v1alpha1.to_task(body, tenant="t")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("task"), "task is missing"),
        (lambda b: b["task"].pop("metadata"), "metadata is missing"),
        (lambda b: b["task"].pop("content"), "content is missing"),
        (lambda b: b["task"]["metadata"].pop("runtime"), "runtime is missing"),
        (lambda b: b["task"]["metadata"].update(tasktype="txt2img"), "unknown task type"),
        (lambda b: b["task"]["content"].pop("init_images"), "needs an input image"),
        (lambda b: b["task"]["content"].update(init_images="x"), "init_images must be a list"),
        (lambda b: b["task"].update(content=[]), "content"),
        (
            lambda b: b["task"]["metadata"].update(runtime=5),
            "^Incorrect payload structure, metadata.runtime: Input should be a valid string [(]got 5[)]$",
        ),
    ],
)
def test_v1alpha2_invalid(mutate: Any, reason: str) -> None:
    body = copy_of(V1ALPHA2_I2I)
    mutate(body)
    with pytest.raises(ValidationFailed, match=reason):
        v1alpha2.to_task(body, tenant="t")


def _record(task: Task, state: TaskState) -> TaskRecord:
    return TaskRecord(task=task, state=state, runtime="diffusers", result=TaskResult())


def test_notification_shapes() -> None:
    body = copy_of(V1ALPHA2_T2I)
    body["task"]["metadata"]["context"] = {"abc": 123}
    task = v1alpha2.to_task(body, tenant="t")
    urls = ["s3://outputbucket/output/test-t2i/test-t2i-1.png"]
    out = "s3://outputbucket/output/test-t2i/test-t2i.out"
    assert v1alpha2.notification(_record(task, TaskState.SUCCEEDED), urls, out) == {
        "runtime": "sdruntime",
        "id": "test-t2i",
        "result": True,
        "status": "completed",
        "image_url": urls,
        "output_url": out,
        "context": {"abc": 123},
    }
    failed = v1alpha2.notification(_record(task, TaskState.FAILED), urls, out)
    assert (failed["result"], failed["status"], failed["image_url"]) == (False, "failed", [])
    v1 = v1alpha1.to_task(copy_of(V1ALPHA1_T2I), tenant="t").model_copy(update={"queue": "sd15"})
    note = v1alpha1.notification(_record(v1, TaskState.SUCCEEDED), urls, None)
    assert (note["runtime"], note["id"], note["context"], note["output_url"]) == (
        "sd15",
        "test-t2i",
        {},
        None,
    )
    assert json.loads(json.dumps(note)) == note


def test_unwrap_envelope_and_passthrough() -> None:
    message, attrs = lambda_message("v1alpha2", V1ALPHA2_T2I)
    inner, got = sns.unwrap(sns_envelope(message, attrs), {"outer": "1"})
    assert inner == message.encode()
    assert got == {"outer": "1", "runtime": "sdruntime"}
    raw = b'{"Type": "Notification", "Message": "no topic"}'
    assert sns.unwrap(raw, {"a": "b"}) == (raw, {"a": "b"})
    assert sns.unwrap(b"\x00binary", {}) == (b"\x00binary", {})


@pytest.mark.parametrize("enveloped", [True, False], ids=["envelope", "raw"])
def test_a_delivery_is_read_once_with_its_publish(enveloped: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent reads a delivery's message, its publish and its attributes in one go: the body
    is parsed once, and an envelope's message once more (seed messages can carry inline images)."""
    from sdfleet import jsonsafe
    from sdfleet.bus.base import Delivery
    from sdfleet.messages import decode_delivery

    parsed: list[int] = []
    loads = jsonsafe.loads

    def counting(data: bytes | str, *args: object, **kwargs: object) -> object:
        parsed.append(len(data))
        return loads(data, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jsonsafe, "loads", counting)
    message, attrs = lambda_message("v1alpha2", V1ALPHA2_T2I)
    body = sns_envelope(message, attrs, message_id="sns-1") if enveloped else message.encode()
    m = decode_delivery(Delivery("q", "bus-1", body, {} if enveloped else attrs, 1, "r", 0.0))
    assert (m.task.id, m.ours, m.attributes) == ("test-t2i", False, attrs)
    assert m.publish == ("sns-1" if enveloped else "bus-1")
    assert len(parsed) == (2 if enveloped else 1)


@pytest.mark.parametrize("enveloped", [True, False], ids=["envelope", "raw"])
def test_seed_messages_to_task(enveloped: bool) -> None:
    for version, payload in (
        ("v1alpha1", V1ALPHA1_T2I),
        ("v1alpha2", V1ALPHA2_I2I),
        ("v1alpha1", V1ALPHA1_I2I),
    ):
        message, attrs = lambda_message(version, payload)
        body = sns_envelope(message, attrs) if enveloped else message.encode()
        task = sns.seed_message_to_task(body, {} if enveloped else attrs, tenant="seed")
        direct = (v1alpha1 if version == "v1alpha1" else v1alpha2).to_task(copy_of(payload), tenant="seed")
        assert task.model_dump(exclude={"created_at"}) == direct.model_dump(exclude={"created_at"})


def test_seed_message_before_1_0() -> None:
    """Before 1.0 the Lambda published the request itself (SNS MessageStructure=json, "default")."""
    legacy = copy_of(V1ALPHA1_T2I)
    legacy["s3_output_path"] = "outputbucket/test-t2i"
    attrs = {"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors"}
    task = sns.seed_message_to_task(sns_envelope(json.dumps(legacy), attrs), {})
    assert (task.id, task.origin, task.output_prefix) == ("test-t2i", Origin.V1ALPHA1, "outputs")
    assert "s3_output_path" not in task.params.extra


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema": 1, "params": {}}', "not a seed message"),
        (sns_envelope("{", {}), "not JSON"),
    ],
)
def test_seed_message_invalid(body: bytes, reason: str) -> None:
    with pytest.raises(ValidationFailed, match=reason):
        sns.seed_message_to_task(body, {})


async def test_seed_notification_uses_storage_locations(tmp_path: Any) -> None:
    from sdfleet.compat.notify import seed_notification
    from sdfleet.storage import open_storage
    from sdfleet.tasks import EventType, TaskEvent

    storage = open_storage(f"file://{tmp_path}")
    task = v1alpha2.to_task(copy_of(V1ALPHA2_T2I), tenant="t")
    keys = ["output/test-t2i/test-t2i-1.png"]
    record = TaskRecord(
        task=task,
        state=TaskState.SUCCEEDED,
        result=TaskResult(images=keys, output="output/test-t2i/test-t2i.out"),
    )
    event = TaskEvent(type=EventType.SUCCEEDED, task_id=task.id, tenant="t", state=TaskState.SUCCEEDED)
    note = seed_notification(storage)(record, event)
    assert note["image_url"] == [storage.location(keys[0])]
    assert note["output_url"] == storage.location("output/test-t2i/test-t2i.out")
    assert (note["runtime"], note["status"], note["result"]) == ("sdruntime", "completed", True)
    await storage.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "https://my-bucket.s3.us-west-2.amazonaws.com/in.png",  # virtual-hosted S3: five labels
        "https://b.s3.amazonaws.com/in.png?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261202"
        "%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=ab12",  # a presigned URL
        "https://cdn.example.com/cats/my%20cat.png",
        "s3://my-bucket/cats/my%20cat.png",
        "http://127.0.0.1:8080/a.png",
    ],
)
def test_input_urls_users_send_pass_the_door(url: str) -> None:
    """The seed fetches any http(s) or s3:// string; the form check must not refuse common ones
    (it refused five-label hosts and every %-encoded path or query)."""
    import re

    from sdfleet.api.seed_schemas import INPUT_URL_PATTERN

    assert re.fullmatch(INPUT_URL_PATTERN, url)


@pytest.mark.parametrize(
    "url", ["https://x.example.com/a b.png", "https://x.example.com/%zz", "ftp://a/b", "https://a..b/x"]
)
def test_input_urls_that_are_not_urls_are_refused(url: str) -> None:
    import re

    from sdfleet.api.seed_schemas import INPUT_URL_PATTERN

    assert not re.fullmatch(INPUT_URL_PATTERN, url)
