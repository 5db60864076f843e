"""The client side: the submission path, the HTTP API, the Python client and the `inferq` command. No torch."""

from producers.client import InferqClient

__all__ = ["InferqClient"]
