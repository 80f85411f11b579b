"""Canonical task models: the wire schema between API, bus, agent and store (``schema: 1``).

A ``Task`` is what a client asked for and travels as the message body. A ``TaskRecord`` is the
task plus everything learned while running it; it lives in the task store and changes only by
compare-and-set on ``version`` (see ``store.base.transition``).
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from ulid import ULID

from sdfleet.errors import worded

SCHEMA_VERSION = 1

TASK_ID_PATTERN = worded(
    r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}$",
    "1 to 128 letters, digits, '.', '_', ':' or '-', not starting with '.', ':' or '-'",
)
"""A task id: 1-128 letters, digits, ``.``, ``_``, ``:`` or ``-``, not starting with ``.``, ``:`` or
``-`` (so never ``.`` or ``..``): it is a segment of storage keys and record keys."""
TENANT_PATTERN = worded(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
    "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
"""A tenant name: the first segment of its storage keys and of its record keys, so no ``/``."""
PRIORITY_MAX = 9
"""Task priorities are 0 (the default) to this; higher runs sooner (``Task.priority``)."""
BATCH_MAX = 64
"""Most images one task asks for (``batch_size``): SD WebUI takes AnimateDiff's frames as its batch
(the seed's own text-to-video example asks for 32). A runtime that makes the images itself may
take fewer (``runtimes.unsupported.IMAGES_MAX``)."""
N_ITER_MAX = 100
"""Most batches (``n_iter``, SD WebUI's "batch count") one task may ask for: SD WebUI's own bound."""
TTL_MAX_S = 86_400
"""The longest ``ttl_s`` the API and a queue take: a day."""


def integral(value: Any) -> Any:
    # JSON has one number type: 3.0 is the integer 3 (as JSON Schema says), also in strict mode.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(integral)]
"""An int that a JSON number with no fraction (``3.0``) also is; never a string or a bool."""


def new_task_id() -> str:
    return str(ULID()).lower()


class TaskType(StrEnum):
    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    EXTRA_SINGLE_IMAGE = "extra-single-image"
    EXTRA_BATCH_IMAGES = "extra-batch-images"
    PIPELINE = "pipeline"


GENERATE = (TaskType.TEXT_TO_IMAGE, TaskType.IMAGE_TO_IMAGE)
"""The task types that generate images (SD WebUI's txt2img and img2img)."""


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class Origin(StrEnum):
    """Which wire format a task came in through: decides the shape of its result notification."""

    V1 = "v1"
    V1ALPHA1 = "v1alpha1"
    V1ALPHA2 = "v1alpha2"


OutputFormat = Literal["png", "jpeg", "webp"]
"""Formats the agent stores still images in (``media.reencode``)."""


class TaskParams(BaseModel):
    """Generation parameters. Unknown keys are kept in ``extra`` and passed to runtimes that know them."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    steps: Integer = Field(20, ge=1, le=150)
    width: Integer = Field(512, ge=8)
    height: Integer = Field(512, ge=8)
    cfg_scale: float = Field(7.0, ge=0.0, le=30.0)
    sampler: str | None = None
    seed: Integer = Field(-1, ge=-1, lt=2**32)
    batch_size: Integer = Field(1, ge=1, le=BATCH_MAX)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    clip_skip: Integer = Field(1, ge=1, le=12)
    init_images: list[str] = Field(default_factory=list)
    """Input images as http(s) URLs, ``data:`` URLs or bare base64."""
    upscaler: str | None = None
    upscaling_resize: float = Field(2.0, gt=0, le=8)
    workflow: dict[str, Any] | None = None
    """A ComfyUI workflow for ``pipeline`` tasks."""
    output_format: OutputFormat | None = None
    """Store the images as ``png``, ``jpeg`` or ``webp`` (the agent re-encodes a runtime's still
    images, keeping their infotext as SD WebUI does); None: as the runtime made them."""
    output_quality: Integer = Field(90, ge=1, le=100)
    """JPEG and WebP quality."""
    extra: dict[str, Any] = Field(default_factory=dict)

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v


WebhookEventName = Literal["started", "progress", "succeeded", "failed", "cancelled"]


def _terminal_events() -> list[WebhookEventName]:
    return ["succeeded", "failed", "cancelled"]


class Webhook(BaseModel):
    url: str
    events: list[WebhookEventName] = Field(default_factory=_terminal_events)


class Task(BaseModel):
    """One generation request, as it travels on the bus."""

    model_config = ConfigDict(populate_by_name=True)

    schema_: int = Field(SCHEMA_VERSION, alias="schema")
    id: str = Field(default_factory=new_task_id, pattern=TASK_ID_PATTERN)
    tenant: str = Field("default", pattern=TENANT_PATTERN)
    type: TaskType = TaskType.TEXT_TO_IMAGE
    runtime: str | None = None
    model: str | None = None
    params: TaskParams = Field(default_factory=TaskParams)
    priority: int = 0
    """Higher runs sooner: routed as the ``priority`` message attribute (a number, for filter
    policies of priority lanes), and an agent runs the highest of the tasks it holds first. Read
    as given on the bus; the API takes 0 to ``PRIORITY_MAX``."""
    queue: str | None = None
    webhook: Webhook | None = None
    context: Any = None
    created_at: float = Field(default_factory=time.time)
    timeout_s: float | None = Field(None, gt=0)
    ttl_s: float | None = Field(None, gt=0)
    """Seconds from the submit within which a run must start: past them no run starts, and the
    task ends ``failed`` with code ``ttl_expired`` (an image nobody waits for any more costs GPU time
    all the same). None: the queue's ``ttl_s``, else no limit."""
    origin: Origin = Origin.V1
    notify_format: Literal["sdfleet", "seed", "sagemaker"] | None = None
    """Shape of this task's results-topic notifications (``notify.formats``); default: the
    queue's, else by the API it came in through."""
    output_prefix: str | None = None
    """Storage prefix for results (they go under ``<prefix>/<id>/``); default the tenant's name.
    The seed formats set their own (``save_dir``, ``metadata.prefix``)."""
    run: int = Field(1, ge=1)
    """Which run of this id: the seed runs every POST (every publish) anew, so a seed-format id
    sent again after its task finished runs again as run 2, 3... (``store.base.reopened``); a
    message of an earlier run than its record's is stale."""

    def ttl_or(self, queue_ttl_s: float | None) -> float | None:
        """Its own ``ttl_s``, else its queue's."""
        return self.ttl_s if self.ttl_s is not None else queue_ttl_s

    def start_by(self, queue_ttl_s: float | None, enqueued_at: float) -> float | None:
        """When its ``ttl_s`` (else the queue's) runs out, counted from this run's submit: for the
        first run the API's ``created_at``, or when its message was enqueued if that was earlier
        (a task another producer published is created by the agent that receives it); for a later
        run (a seed id sent again, a redrive), when that run's message was enqueued, since
        ``created_at`` stays the id's first. None: no limit."""
        ttl_s = self.ttl_or(queue_ttl_s)
        if ttl_s is None:
            return None
        return (min(self.created_at, enqueued_at) if self.run == 1 else enqueued_at) + ttl_s

    def storage_prefix(self) -> str:
        return self.output_prefix if self.output_prefix is not None else self.tenant

    def results_folder(self) -> str:
        """Where every run of this id stores its files, each named ``<id>-<tag>…`` (the seed's
        layout: ``<prefix>/<id>/``)."""
        return f"{self.storage_prefix()}/{self.id}"

    def to_message(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


class TaskError(BaseModel):
    code: str
    message: str


class TaskResult(BaseModel):
    images: list[str] = Field(default_factory=list)
    """Storage keys of the images, in order."""
    output: str | None = None
    """Storage key of the ``.out`` JSON (the runtime's info)."""
    seed: int | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds per stage: queue_wait, inputs_fetch, model_switch, runtime_run, encode (only with an
    ``output_format``), storage_put."""


EARLIER_PUBLISHES = 8
"""Publishes of earlier runs a record keeps (``TaskRecord.earlier_publishes``)."""


class TaskRecord(BaseModel):
    task: Task
    state: TaskState = TaskState.QUEUED
    version: int = 0
    """Bumped by every write; writes are compare-and-set on it."""
    attempts: int = 0
    progress: float = 0.0
    error: TaskError | None = None
    result: TaskResult | None = None
    worker: str | None = None
    runtime: str | None = None
    updated_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    published_at: float | None = None
    """When the API last published the task (a repeated submit re-publishes at most once per lease)."""
    message_id: str | None = None
    """The publish whose delivery started or reopened this run (``messages.Decoded.publish``).
    A seed message does not number its runs: one that comes again for a finished task is a
    redelivery of that run when it is this publish, else the id's next run."""
    earlier_publishes: list[str] = Field(default_factory=list)
    """The publishes of the id's earlier runs, oldest first, the last ``EARLIER_PUBLISHES``: a
    seed message from one of them (SNS's duplicate, late) is a copy of a run that ended, not the
    id's next run."""

    @property
    def id(self) -> str:
        return self.task.id

    @property
    def tenant(self) -> str:
        return self.task.tenant


class EventType(StrEnum):
    QUEUED = "queued"
    STARTED = "started"
    PROGRESS = "progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskEvent(BaseModel):
    """What the results topic and webhooks carry for a v1 task."""

    schema_: int = Field(SCHEMA_VERSION, alias="schema")
    type: EventType
    task_id: str
    tenant: str
    state: TaskState
    run: int = 1
    """The run of ``task_id`` the event is of (``Task.run``): a redriven task's next run
    (``sdfleet dlq redrive``) or a seed-format id sent again ends once more, with a later run."""
    progress: float = 0.0
    result: TaskResult | None = None
    image_urls: list[str] = Field(default_factory=list)
    error: TaskError | None = None
    context: Any = None
    at: float = Field(default_factory=time.time)

    model_config = ConfigDict(populate_by_name=True)

    @classmethod
    def of_record(cls, record: TaskRecord, kind: EventType, image_urls: list[str]) -> TaskEvent:
        """The event ``kind`` of a task as its record stands now. A finished task's is at its
        record's last write, so that it is the same event however often it is told (an agent
        tells it again when the task's delivery comes back after the notification went out)."""
        return cls(
            type=kind,
            task_id=record.id,
            tenant=record.tenant,
            state=record.state,
            run=record.task.run,
            progress=record.progress,
            result=record.result,
            image_urls=image_urls,
            error=record.error,
            context=record.task.context,
            at=record.updated_at if record.state.terminal else time.time(),
        )
