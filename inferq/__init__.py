"""inferq: asynchronous inference jobs on Celery and Redis. `from inferq import InferqClient` is the client.

The repository keeps its folders (config, protocol, producers, workers) at the top; installed, they are
`inferq.config`, `inferq.protocol`, `inferq.producers` and `inferq.workers`, so none can collide with a module of
the application that installs inferq (a Django project's own `config`, say).
"""

from inferq.producers.client import InferqClient

__all__ = ["InferqClient"]
