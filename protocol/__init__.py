"""The torch-free core shared by producers and workers: job schema, codec, registry declaration, errors, keys.

Only the error tree is re-exported here: importing this package must not pull in Redis or pydantic models, so the
client (`from inferq import InferqClient`) installs and imports with nothing but its HTTP and CLI dependencies.
"""

from inferq.protocol.errors import InferqError, RemoteError

__all__ = ["InferqError", "RemoteError"]
