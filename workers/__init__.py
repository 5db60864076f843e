"""The worker side: Celery tasks that run torch models. Only this package imports torch."""
