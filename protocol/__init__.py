"""The torch-free core shared by producers and workers: job schema, codec, registry declaration, errors, keys."""

from protocol.errors import InferqError, RemoteError
from protocol.jobs import JobStatus
from protocol.registry import ModelSpec, Registry, load_registry

__all__ = ["InferqError", "JobStatus", "ModelSpec", "Registry", "RemoteError", "load_registry"]
