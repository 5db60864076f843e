"""A torch-free Celery app for tools that only watch the broker or deliver callbacks:
`celery -A inferq.producers.celery_app flower`, and the `inferq callbacks` worker."""

from inferq.config import Settings
from inferq.protocol.callbacks import register_callback_task
from inferq.protocol.celery_config import build_celery
from inferq.protocol.logs import connect_celery_logging
from inferq.protocol.registry import load_registry

_settings = Settings()
app = build_celery(_settings, load_registry(_settings.registry_path))
register_callback_task(app, _settings)
connect_celery_logging(_settings)
