"""The client side: the submission path, the HTTP API, the Python client and the `inferq` command. No torch."""

from inferq.producers.client import InferqClient

__all__ = ["InferqClient"]
