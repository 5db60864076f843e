"""Settings and the model registry file: the bottom layer, importing nothing of inferq."""

from inferq.config.settings import DEFAULT_REDIS_URL, DEFAULT_REGISTRY_PATH, Settings

__all__ = ["DEFAULT_REDIS_URL", "DEFAULT_REGISTRY_PATH", "Settings"]
