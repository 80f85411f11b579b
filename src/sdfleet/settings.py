"""Settings: ``SDFLEET_*`` environment variables (nested with ``__``) plus one fleet YAML file.

Precedence: init arguments > environment > ``sdfleet.yaml`` (``fleet:`` is the file itself) > defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from sdfleet.errors import ConfigError, cannot_read, one_line, validation_errors, worded
from sdfleet.tasks import PRIORITY_MAX, TENANT_PATTERN, TTL_MAX_S, OutputFormat
from sdfleet.urls import file_url, sqlite_url

DEFAULT_CONFIG_FILE = "sdfleet.yaml"


class ScalingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default

    min: int = Field(0, ge=0)
    max: int = Field(10, ge=1)
    target_backlog: int = Field(10, ge=1)
    """Visible messages per replica that KEDA aims for (the seed's queueLength)."""


QUEUE_NAME_PATTERN = worded(
    r"^[a-z0-9][a-z0-9-]{0,62}$", "1 to 63 lower-case letters, digits or '-', starting with a letter or digit"
)
"""A queue's name: it names its SQS queue, Redis stream, chart objects and metric labels."""


class QueueConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default

    name: str = Field(pattern=QUEUE_NAME_PATTERN)
    filter: dict[str, Any] | None = None
    """SNS filter policy; None = every task."""
    filter_scope: Literal["MessageAttributes", "MessageBody"] = "MessageAttributes"
    runtime: str = "diffusers"
    model: str | None = None
    """Model to load at start (dedicated queues keep one model loaded)."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    notify_format: Literal["sdfleet", "seed", "sagemaker"] | None = None
    """Shape of the results-topic notifications of this queue's tasks (a task may choose its own):
    ``sdfleet`` (TaskEvent), ``seed`` (the seed's agent's), ``sagemaker`` (SageMaker async
    inference's); default by the API a task came in through."""
    output_format: OutputFormat | None = None
    """Format this queue's images are stored in when a task asks for none (``params.output_format``),
    the seed formats' tasks included; None: as the runtime made them (PNG)."""
    ttl_s: float | None = Field(None, gt=0, le=TTL_MAX_S)
    """Seconds from the submit within which a task of this queue must start when it names no
    ``ttl_s`` of its own (the seed formats' tasks included); None: no limit (``Task.ttl_s``)."""
    task_timeout_s: float = Field(600.0, gt=0, le=3600)
    """Longest a task of this queue may run, seconds: the API caps each task's ``timeout_s`` to it,
    the agent caps the tasks other producers publish (``execute.job_of``), and the chart gives the
    queue's workers this much drain on scale-in, so none is cut short."""

    @model_validator(mode="after")
    def _valid_policy(self) -> QueueConfig:
        if self.filter is not None:
            from sdfleet.policy import PolicyError, validate

            try:
                validate(self.filter, scope=self.filter_scope)
            except PolicyError as e:
                raise ValueError(f"queue {self.name}: invalid filter policy: {e}") from e
        return self


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default

    dir: Path = Path("models")
    s3: str | None = Field(
        None, pattern=worded(r"^s3://[^/?#]+(/[^?#]*)?(\?.*)?$", "an s3://bucket/prefix URL")
    )
    """``s3://bucket/prefix`` holding models: the default ``--s3`` of ``sdfleet models push/pull/sync/ls
    --remote``, and where agents fetch a model a task names that is not on disk yet."""
    default: str | None = None
    """Model used when a task names none."""
    cache_size: int = Field(2, ge=1)
    """Loaded pipelines kept in memory per agent (LRU)."""
    disk_budget_gb: float | None = Field(None, gt=0)
    """Most disk the models folder may take. When a fetch would pass it, models that ``s3`` also
    holds and no process is using are deleted, least recently used first. None: no budget."""
    transfer_jobs: int = Field(8, ge=1, le=64)
    """Parts moved at once by ``sdfleet models push/pull/sync`` and the agents' fetcher."""
    part_size_mb: int = Field(16, ge=5, le=5120)
    """Multipart part size in MiB (S3's least is 5); files up to it move in one request."""


class RetryConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default

    max_receives: int = Field(3, ge=1, le=1000)
    """Deliveries of a message before it moves to its queue's dead-letter queue (SQS's
    ``maxReceiveCount`` is at most 1000)."""
    lease_s: float = Field(60.0, gt=0, le=43200)
    """A delivery's lease (visibility timeout), seconds; at most SQS's 12 hours (43200), which the
    aws engine would otherwise cut it to without a word."""


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a default

    name: str = Field(pattern=TENANT_PATTERN)
    """Letters, digits, ``.``, ``_``, ``-`` (it is the first segment of the tenant's storage keys)."""
    tier: str = "standard"
    rate_limit: float | None = Field(None, gt=0)
    """Accepted submissions per second, shared by every API replica; None: unlimited."""
    burst: int | None = Field(None, ge=1)
    """Submissions accepted at once before ``rate_limit`` applies; default one second's worth."""
    max_in_flight: int | None = Field(None, ge=1)
    """Most queued plus running tasks at a time; None: unlimited."""
    max_priority: int = Field(PRIORITY_MAX, ge=0, le=PRIORITY_MAX)
    """Highest ``priority`` its tasks may ask for (403 above it): keeps priority lanes for
    those meant to use them."""


class FleetConfig(BaseModel):
    """The fleet file: drives bus topology, agents and deployment alike."""

    model_config = ConfigDict(extra="forbid")  # `quuues:` is an error, not a silent default fleet

    tasks_topic: str = "tasks"
    results_topic: str = "results"
    results_queue: str | None = "results"
    """Queue subscribed to the results topic (None: no queue, e.g. webhooks only)."""
    queues: list[QueueConfig] = Field(default_factory=lambda: [QueueConfig(name="default")])
    runtimes: dict[str, dict[str, Any]] = Field(default_factory=dict)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    """API key SHA-256 hex digest → tenant. Empty: no auth, every request is tenant ``default``."""
    retain_days: float | None = Field(None, gt=0)
    """How long a finished task is kept: its record (then ``GET /v1/tasks/{id}`` is 404 and the id
    free again), and on ``file://`` storage its images. None: for ever. On S3 the bucket's
    lifecycle rule expires images (the CDK app makes one from this)."""

    @property
    def retain_s(self) -> float | None:
        return None if self.retain_days is None else self.retain_days * 86400

    @model_validator(mode="after")
    def _unique_queues(self) -> FleetConfig:
        names = [q.name for q in self.queues]
        if len(set(names)) != len(names):
            raise ValueError(f"queue names must be unique: {names}")
        if not names:
            raise ValueError("at least one queue is needed")
        from sdfleet.disjoint import effective_filters

        effective_filters(self.queues)  # refuses overlaps SNS cannot route first-match
        return self

    def queue(self, name: str) -> QueueConfig | None:
        return next((q for q in self.queues if q.name == name), None)


class ApiSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    public_url: str | None = None
    """Base URL clients reach the API at (for file links); default http://host:port."""
    max_width: int = Field(2048, ge=8)
    max_height: int = Field(2048, ge=8)
    max_body_bytes: int = Field(1_048_576, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0)
    """A request body not received whole within this many seconds is a 408 (a client that sends
    a byte a minute does not hold a connection and its buffer forever)."""
    signing_key: str | None = None
    """HMAC key of the signed file links served by ``GET /v1/files/{key}``. Unset: a random key per
    process (links then work only on the replica that made them; set it when running several)."""
    link_ttl_s: int = Field(3600, ge=1)
    queue_stats_s: float = Field(15.0, ge=0)
    """Period of the background refresh of the queue-depth gauges on ``/metrics``, seconds; 0: off
    (then only ``GET /v1/queues`` refreshes them)."""
    ops_port: int | None = Field(None, ge=1, le=65535)
    """Serve ``/metrics`` (no key) and ``/queues/<name>/depth`` (KEDA's metrics-api scaler) on this
    port of ``host`` instead of the public one; unset: ``/metrics`` on the public port, no depth
    route. With ``workers`` > 1 the supervisor serves ``/metrics`` alone here (all workers')."""
    ready_check_s: float = Field(30.0, ge=0)
    """``/readyz`` checks the bus and the store at most once per this many seconds, and a failed
    check unreadies the replica only after none has passed for three periods (0: every probe)."""
    workers: int = Field(1, ge=1, le=64)
    """Processes of ``sdfleet api`` serving one port (uvicorn workers); ``sdfleet up`` runs one."""
    require_key: bool = False
    """Refuse requests without a valid API key even when no tenant or stored key exists yet.
    Otherwise keys are required as soon as ``fleet.tenants`` or the store holds one."""
    key_cache_s: float = Field(2.0, ge=0, le=60)
    """How long a replica trusts what it read about a key: a revoked key stops working on every
    replica within this many seconds."""
    metrics_key: SecretStr | None = None
    """Bearer token of ``GET /metrics`` while API keys are required (tenants' keys do not open it);
    unset: ``/metrics`` answers 401 then, so scrape the ops port (``ops_port``) instead."""
    max_input_pixels: int = Field(4096 * 4096, ge=64)
    """Largest input image (width × height) accepted in a body (``data:`` or base64 inputs)."""


class AgentSettings(BaseModel):
    queue: str | None = None
    prefetch: int | None = Field(None, ge=1)
    """Tasks received and prepared (inputs fetched) ahead of the runtime, waiting in the agent's
    ready pool; default twice what the runtime takes at once (``max_in_flight`` × batch size),
    at least 4 (receives then take several messages a call). More gives the model-aware order
    more to choose from, but hides those tasks from other agents for their lease; with long
    tasks ``prefetch_horizon_s`` holds it lower."""
    prefetch_horizon_s: float = Field(30.0, ge=0)
    """Hold no more tasks ahead than the runtime is expected to start within this many seconds
    (measured seconds per task; one call's worth at least, and until the first call ends), so
    long tasks are not hidden from other agents behind a busy one, nor handed back with one more
    receive counted at every SIGTERM drain; 0: always ``prefetch``."""
    finishers: int = Field(4, ge=1)
    """Tasks finishing at once (upload, record, notify, ack) while the runtime goes on; when all
    are busy the runtime waits, which bounds memory."""
    progress_every_s: float = Field(1.0, gt=0)
    """Least time between two progress writes of one running task (a record write each, and a
    ``progress`` event for subscribers that asked for it); a run shorter than this writes none."""
    cancel_check_s: float = Field(1.0, gt=0)
    """How often the records of tasks running for at least this long are read for a cancel: a
    cancelled task is interrupted within about twice this, whatever the lease. The same read
    interrupts a run another agent took over after this agent's lease on it lapsed."""
    dead_letter_check_s: float = Field(60.0, gt=0)
    """How often the queue's dead-letter queue is looked at (and once at start): a task whose
    message reached it with no outcome (its agents stopped on each try) fails ``dead_lettered``
    and its subscribers are told, instead of staying ``queued`` or ``running``."""
    affinity_max_wait_s: float = Field(30.0, ge=0)
    """Priority and model-aware order: the longest a received task may be passed over for tasks
    of a higher priority or of a model the runtime has loaded; 0 is plain arrival order."""
    wait_s: float = Field(5.0, ge=0)
    """Long-poll wait of one receive, seconds."""
    heartbeat_s: float | None = Field(None, gt=0)
    """Lease extension period; default a third of the lease (``fleet.retry.lease_s``), which it
    must be shorter than."""
    drain_s: float = Field(30.0, ge=0)
    """On SIGTERM, how long the running task may take to finish before it is released."""
    input_max_bytes: int = Field(20 * 1024 * 1024, ge=1)
    input_timeout_s: float = Field(20.0, gt=0)
    input_s3_buckets: list[str] = Field(default_factory=list)
    """Buckets (``name`` or ``name/prefix``) that ``s3://`` input URLs may name, read with the
    agent's AWS credentials, as the seed's agent does; empty: ``s3://`` inputs are refused."""
    input_max_pixels: int = Field(4096 * 4096, ge=64)
    """Largest decoded input image (width × height); a bigger one fails its task."""
    allow_private_inputs: bool = False
    """Allow input URLs on loopback/private networks (tests, demo); never in production."""
    retry_delay_s: float = Field(0.0, ge=0)
    """Delay before a failed attempt is visible again."""
    metrics_port: int | None = Field(None, ge=1, le=65535)
    """Serve Prometheus ``/metrics`` of agents run without the API (``sdfleet agent``) on this
    port; unset: no listener."""
    notify_running: bool = False
    """Also publish a notification when a task starts (the seed's ``EXP_CALLBACK_WHEN_RUNNING``:
    ``{"runtime", "id", "status": "running", "context"}`` for the seed's formats)."""
    metrics_host: str = "127.0.0.1"
    """Listen address of the agent's metrics port (``0.0.0.0`` to be scraped from other hosts)."""
    pod_deletion_cost: bool = False
    """On Kubernetes, keep the agent's own pod's ``controller.kubernetes.io/pod-deletion-cost`` at
    1000 while it holds tasks and 0 when idle, so scale-in deletes idle workers first (needs
    ``POD_NAME``/``POD_NAMESPACE`` and ``patch`` on pods: the chart's ``agent.podDeletionCost``)."""

    def heartbeat_period(self, lease_s: float) -> float:
        """How often a running task's lease is extended: ``heartbeat_s``, else a third of the
        lease. Raises ``ConfigError`` when it is not shorter than the lease (deliveries would come
        back while they run): checked when an agent's fleet starts, before any runtime loads."""
        if self.heartbeat_s is not None and self.heartbeat_s >= lease_s:
            raise ConfigError(
                f"agent.heartbeat_s ({self.heartbeat_s:g}) must be shorter than the lease "
                f"(fleet.retry.lease_s, {lease_s:g}), or deliveries come back while they run"
            )
        return self.heartbeat_s or lease_s / 3


class WebhookSettings(BaseModel):
    """Task webhooks (``Task.webhook``), delivered by the agents and checked by the API at submit."""

    secret: SecretStr | None = None
    """HMAC-SHA256 key of ``X-Sdfleet-Signature``. Unset: webhooks go out unsigned (warned once, when
    a task first asks for one); always set it in production."""
    timeout_s: float = Field(10.0, gt=0)
    """Timeout of one delivery attempt, seconds."""
    max_retry_s: float = Field(300.0, ge=0)
    """How long a terminal event is retried (connection errors, 429, 5xx), seconds."""
    retry_backoff_s: float = Field(1.0, gt=0)
    """First delay between two tries of a terminal event, doubled after each try (at most 60 s)."""
    throttle_s: float = Field(0.5, ge=0)
    """Least time between two non-terminal events (started, progress) of one task, seconds."""
    drain_s: float = Field(10.0, ge=0)
    """On shutdown, how long deliveries still in flight may take before they are given up, seconds."""
    allow_private: bool = False
    """Allow webhook URLs on loopback/private networks (tests, demo); never in production."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDFLEET_", env_nested_delimiter="__", extra="ignore")

    config_file: Path | None = None
    data_dir: Path = Path("sdfleet-data")
    bus_url: str | None = None
    """Default ``sqlite:///<data_dir>/sdfleet.db``."""
    store_url: str | None = None
    """Default: the bus URL (same SQLite file; DynamoDB with aws://; Redis with redis://)."""
    storage_url: str | None = None
    """Default ``file://<data_dir>/files``."""
    api: ApiSettings = Field(default_factory=ApiSettings)
    agent: AgentSettings = Field(default_factory=AgentSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    ensure_topology: bool = True
    """Create/update topics, queues and subscriptions at start. Turn off where the CDK app (or an
    operator) owns them, so API and agent roles need no create permissions."""
    log_json: bool = True
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(lambda v: str(v).upper())
    ] = "INFO"
    otlp_endpoint: str | None = None
    """OTLP/HTTP traces endpoint (e.g. an ADOT collector's ``http://localhost:4318/v1/traces``)."""

    @model_validator(mode="after")
    def _defaults(self) -> Settings:
        if self.bus_url is None:
            self.bus_url = sqlite_url(self.data_dir.resolve() / "sdfleet.db")
        if self.store_url is None:
            self.store_url = self.bus_url
        if self.storage_url is None:
            self.storage_url = file_url(self.data_dir.resolve() / "files")
        return self

    @property
    def bus(self) -> str:
        assert self.bus_url is not None
        return self.bus_url

    @property
    def store(self) -> str:
        assert self.store_url is not None
        return self.store_url

    @property
    def storage(self) -> str:
        assert self.storage_url is not None
        return self.storage_url


def load_fleet(path: Path) -> FleetConfig:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise cannot_read("fleet config", path, e) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {one_line(e)}") from e
    try:
        return FleetConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: {validation_errors(e)}") from e


def _settings_errors(e: ValidationError) -> str:
    """Each bad setting by its variable name."""
    return validation_errors(e, lambda loc: "SDFLEET_" + "__".join(map(str, loc)).upper())


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, with the fleet from ``config_file`` (or ``sdfleet.yaml`` if present)."""
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        raise ConfigError(f"invalid settings: {_settings_errors(e)}") from e
    path = config_file or settings.config_file
    if path is None and Path(DEFAULT_CONFIG_FILE).exists():
        path = Path(DEFAULT_CONFIG_FILE)
    if path is not None and "fleet" not in overrides:
        settings.fleet = load_fleet(Path(path))
        settings.config_file = Path(path)
    return settings
