"""A torch-free Celery app for tools that only watch the broker: `celery -A producers.celery_app flower`."""

from config import Settings
from protocol.celery_config import build_celery
from protocol.registry import load_registry

_settings = Settings()
app = build_celery(_settings, load_registry(_settings.registry_path))
