"""The one settings object of inferq.

Every process (API, worker, Flower, client, demo) builds one `Settings` and passes it down; nothing else reads the
environment. Values come, highest first, from keyword arguments, `INFERQ_*` environment variables, then the TOML
settings file named by `INFERQ_SETTINGS_FILE` (or `./inferq.toml` when it exists), then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_REGISTRY_PATH = CONFIG_DIR / "models.toml"
DEFAULT_MODELS_DIR = CONFIG_DIR.parent / "models"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SETTINGS_FILE_ENV = "INFERQ_SETTINGS_FILE"
_DEFAULT_SETTINGS_FILE = Path("inferq.toml")


def _settings_file() -> Path | None:
    named = os.environ.get(SETTINGS_FILE_ENV)
    if named:
        return Path(named)
    return _DEFAULT_SETTINGS_FILE if _DEFAULT_SETTINGS_FILE.is_file() else None


class Settings(BaseSettings):
    """Settings with their units in their names; every default is the one a single-host install wants."""

    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore", frozen=True)

    # --- connections
    redis_url: SecretStr | None = Field(
        default=None,
        description="Broker, job store and blob store. Unset: commands use redis://127.0.0.1:6379/0 and the "
        "demo starts a private Redis.",
    )
    api_url: str = Field(default="http://127.0.0.1:8000", description="Where clients find the HTTP API.")
    broker_url: SecretStr | None = Field(
        default=None,
        description="Where Celery's messages go: redis://, rediss:// or amqp:// (RabbitMQ). Unset: the "
        "Redis URL. Job records and blobs always stay in Redis.",
    )
    broker_delivery_limit: int = Field(
        default=5,
        gt=0,
        description="RabbitMQ only: deliveries of one message before it is dead-lettered to the model's `.dead` "
        "queue, so a job that kills its worker every time cannot loop forever.",
    )

    # --- models
    registry_path: Path = Field(default=DEFAULT_REGISTRY_PATH, description="The model registry (TOML).")
    models_dir: Path = Field(
        default=DEFAULT_MODELS_DIR, description="Where relative weight paths of the registry are looked up."
    )

    # --- retention, in seconds
    result_ttl_s: int = Field(default=24 * 3600, gt=0, description="How long a finished job and its blob stay.")
    queued_ttl_s: int = Field(default=24 * 3600, gt=0, description="A job not started within this time ends `expired`.")
    broker_visibility_timeout_s: int = Field(
        default=2 * 3600,
        gt=0,
        description="Redis redelivers an unacknowledged message after this; must exceed every model's time limit.",
    )

    # --- intake limits
    max_upload_bytes: int = Field(default=64 * 1024 * 1024, gt=0, description="Largest accepted upload.")
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Largest accepted image (rows x columns x frames), checked before decode."
    )

    # --- HTTP API and Flower
    api_host: str = Field(default="127.0.0.1", description="Loopback unless told otherwise.")
    api_port: int = Field(default=8000, ge=0, le=65535)
    flower_host: str = Field(default="127.0.0.1", description="Loopback unless told otherwise.")
    flower_port: int = Field(default=5555, ge=0, le=65535)
    flower_journal_events: int = Field(
        default=200_000,
        ge=1000,
        description="Celery events kept in Redis for Flower to replay after a restart (about 3 per task).",
    )

    # --- workers
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Where a worker runs its models.")
    worker_processes: int = Field(
        default=0, ge=0, description="Worker processes per `inferq worker`; 0: one per usable CPU (or per GPU)."
    )
    torch_threads: int = Field(
        default=0, ge=0, description="Intra-op threads per worker process; 0: usable CPUs / worker processes."
    )
    lend_idle_cores: bool = Field(
        default=True,
        description="CPU nodes of one `inferq worker` lend their cores to a neighbour's long forward pass while they "
        "hold no job, so a lone job computes on every core.",
    )
    core_share_dir: str = Field(
        default="", description="Set by `inferq worker` for its nodes: the folder through which they lend cores."
    )
    node_index: int = Field(default=0, ge=0, description="Set by `inferq worker`: this node's place in the share.")
    worker_slots: int = Field(
        default=0,
        ge=0,
        description="Jobs one worker process holds at once (decoding, waiting for or in a batch); 0: the "
        "largest max_batch_size of its models, at most 64.",
    )

    worker_metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="Where `inferq worker` serves its nodes' Prometheus metrics (/metrics, no auth); 0: not served.",
    )
    worker_metrics_host: str = Field(default="127.0.0.1", description="Loopback unless told otherwise.")

    served_models: str = Field(
        default="",
        description="Comma-separated models that must have a live worker for /readyz; empty: every registry model.",
    )

    # --- delivery guarantees, in seconds
    lease_s: float = Field(default=20.0, ge=1, description="A running attempt's lease; renewed every quarter of it.")
    reconcile_interval_s: float = Field(default=2.0, gt=0, description="How often the reconciler looks for work.")
    lost_message_check_s: float = Field(
        default=30.0, gt=0, description="A queued job whose message is in no broker list this long is published again."
    )
    retry_backoff_s: float = Field(default=1.0, gt=0, description="First retry delay; doubles per attempt, jittered.")
    retry_backoff_max_s: float = Field(default=60.0, gt=0, description="Longest retry delay.")

    # --- scheduling between tenants
    tenant_buckets: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Sub-queues per model queue (`<model>`, `<model>.t1`, ...); a tenant's jobs go to its own by "
        "hash, and workers take from the non-empty ones in turn, so one tenant's flood cannot starve another. "
        "Tenants whose hashes meet share a bucket; 1 turns fairness off. Producers and workers must agree.",
    )
    tenant_weights: dict[str, int] = Field(
        default_factory=dict,
        description='Share of the workers per tenant, as buckets of its own (JSON, e.g. {"north": 2}); a tenant '
        "not named has weight 1. A weight counts up to tenant_buckets.",
    )

    # --- callbacks
    callback_secret: SecretStr | None = Field(
        default=None, description="Standard Webhooks signing secret (`whsec_...`); unset: callbacks are refused."
    )
    callback_allow: str = Field(
        default="",
        description="Comma-separated hosts, host:port or CIDRs that callbacks may reach although they are loopback, "
        "link-local or private addresses.",
    )
    callback_retry_period_s: float = Field(default=24 * 3600, gt=0, description="How long a callback is retried.")
    callback_timeout_s: float = Field(default=10.0, gt=0, description="One delivery attempt's HTTP timeout.")
    callback_backoff_s: float = Field(
        default=5.0, gt=0, description="Delay before a failed callback's second attempt; doubles, at most 10 min."
    )

    # --- security
    api_key: SecretStr | None = Field(
        default=None, description="The API key clients (`inferq submit`, InferqClient) send as a Bearer token."
    )
    api_docs_enabled: bool = Field(
        default=True, description="Serve /docs, /redoc and /openapi.json (they describe the API, never data)."
    )
    access_log_path: Path | None = Field(
        default=None, description="Append the API's JSON-lines access log here; unset: standard error."
    )
    flower_basic_auth: SecretStr | None = Field(
        default=None, description="'user:password' for Flower; `inferq flower` refuses to start without it."
    )
    redis_tls_ca_file: Path | None = Field(
        default=None,
        description="CA bundle that signs the Redis server's certificate (rediss:// URLs); unset: the system's. "
        "The certificate is always verified.",
    )
    max_concurrent_probes: int = Field(
        default=4, gt=0, description="Uploads whose headers the API probes at once; bounds the memory of inflating."
    )

    # --- demo
    data_dir: Path = Field(default=Path(".inferq"), description="Private Redis data (AOF) and demo samples.")

    # --- waiting, bulk submission and refusing load
    max_wait_s: float = Field(
        default=60.0, ge=0, description="Longest an HTTP request may wait for jobs (`wait_s`, `Prefer: wait`)."
    )
    max_bulk_jobs: int = Field(default=1000, gt=0, description="Most jobs in one bulk submission or status query.")
    max_bulk_upload_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="Largest multipart bulk upload, all its files together."
    )
    unavailable_retry_after_s: int = Field(
        default=2, gt=0, description="`Retry-After` of a 503 answered while Redis or the broker is down."
    )
    queue_full_retry_after_s: int = Field(
        default=5, gt=0, description="`Retry-After` of a 429 answered while a model's queue is at its maximum depth."
    )

    # --- observability
    log_format: Literal["json", "text"] = Field(
        default="json", description="One JSON object per log line (job_id, model, tenant where known), or text."
    )
    log_level: str = Field(default="INFO", description="Level of inferq's own processes' logs.")

    @field_validator("registry_path", "models_dir", "data_dir")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @property
    def redis_url_or_default(self) -> str:
        return self.redis_url.get_secret_value() if self.redis_url else DEFAULT_REDIS_URL

    @property
    def broker_url_or_default(self) -> str:
        return self.broker_url.get_secret_value() if self.broker_url else self.redis_url_or_default

    def resolve_weights(self, relative: str) -> Path:
        path = Path(relative).expanduser()
        return path if path.is_absolute() else self.models_dir / path

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        settings_file = _settings_file()
        if settings_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=settings_file))
        return tuple(sources)
