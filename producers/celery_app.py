"""A torch-free Celery app for tools that only watch the broker or deliver callbacks:
`celery -A producers.celery_app flower`, and the `inferq callbacks` worker."""

from config import Settings
from protocol.callbacks import register_callback_task
from protocol.celery_config import build_celery
from protocol.logs import connect_celery_logging
from protocol.registry import load_registry

_settings = Settings()
app = build_celery(_settings, load_registry(_settings.registry_path))
register_callback_task(app, _settings)
connect_celery_logging(_settings)
