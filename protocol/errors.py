"""The one error tree of inferq.

    InferqError                      code, message, retryable; `to_dict()` is what a client sees
    ├── ClientError                  the request is wrong: never retried, HTTP 4xx, job `failed`
    │   ├── UnknownModel             404 unknown_model
    │   ├── UnknownJob               404 unknown_job
    │   ├── InvalidRequest           422 invalid_request
    │   ├── InvalidTensor            422 invalid_tensor
    │   ├── PayloadTooLarge          413 payload_too_large
    │   ├── UnsupportedMedia         415 unsupported_media_type
    │   ├── InvalidImage             422 invalid_image
    │   │   ├── NoPixelData          422 no_pixel_data
    │   │   ├── ImageTooLarge        413 image_too_large
    │   │   ├── NotForPresentation   422 not_for_presentation
    │   │   └── UnsupportedView      422 unsupported_view
    │   ├── Unauthorized             401 unauthorized (no API key, or one that is unknown or revoked)
    │   ├── Forbidden                403 forbidden (the key's roles do not allow the call)
    │   ├── OptionsInQuery           400 options_in_query (job options belong in the body or headers)
    │   └── ClientDisconnected       499 client_disconnected (the client left mid-request; nobody reads it)
    ├── ConflictError                409: the job is in a state that forbids the action
    │   └── JobNotCancellable        409 job_not_cancellable
    ├── TransientError               the system had a bad moment: retried with backoff, HTTP 503
    │   ├── BackendUnavailable       503 backend_unavailable
    │   ├── BlobMissing              410 blob_missing (the upload expired before it was read)
    │   ├── WorkerLost               503 worker_lost (the worker running the job died; the job runs again)
    │   ├── QueueFull                429 queue_full (the model's queue is at max_queue_depth)
    │   ├── NoConsumer               503 no_consumer (no live worker consumes a served model's queue: /readyz)
    │   └── Overloaded               503 overloaded (out of memory or open files for this request now; send it
    │                                again later)
    ├── ModelError                   the model could not answer: job `failed`
    │   ├── ModelLoadError           500 model_load_error (also a worker that refuses to start)
    │   │   └── ChecksumMismatch     500 checksum_mismatch
    │   ├── TimeLimitExceeded        504 timeout (the soft or the hard time limit)
    │   ├── PoisonJob                500 poison (its attempts kept ending the worker process: dead-lettered)
    │   └── InferenceError           500 inference_error
    ├── RemoteError                  a client's view of an error the API answered with (its code kept)
    └── ConfigError                  500 config_error: the operator's settings, registry or Celery configuration
                                     are wrong; raised at start, never the client's fault

Third-party exceptions are wrapped where they enter (`raise InvalidImage(...) from e`). Messages never carry
a patient identifier or a stack trace.
"""

from __future__ import annotations

from typing import Any, ClassVar


class InferqError(Exception):
    """Root of every error inferq raises on purpose."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class ClientError(InferqError):
    """The request itself is wrong; sending it again cannot help."""

    code = "client_error"
    http_status = 400


class UnknownModel(ClientError):
    """No model of that name is in the registry."""

    code = "unknown_model"
    http_status = 404


class UnknownJob(ClientError):
    """No job of that id exists (never issued, or expired and removed)."""

    code = "unknown_job"
    http_status = 404


class InvalidRequest(ClientError):
    """The request is malformed: a missing field, a value out of range, a wrong content type."""

    code = "invalid_request"
    http_status = 422


class InvalidTensor(ClientError):
    """A tensor input does not match the model's declared shape or datatype."""

    code = "invalid_tensor"
    http_status = 422


class PayloadTooLarge(ClientError):
    """The upload exceeds `max_upload_bytes`."""

    code = "payload_too_large"
    http_status = 413


class UnsupportedMedia(ClientError):
    """The upload is none of the accepted kinds (DICOM Part 10, PNG, JPEG) or the wrong kind for the model."""

    code = "unsupported_media_type"
    http_status = 415


class InvalidImage(ClientError):
    """The upload claims to be an image but cannot be read as one."""

    code = "invalid_image"
    http_status = 422


class NoPixelData(InvalidImage):
    """A DICOM object without pixels: a structured report, an RT plan, a presentation state."""

    code = "no_pixel_data"


class ImageTooLarge(InvalidImage):
    """The image exceeds `max_image_pixels`; refused before decoding."""

    code = "image_too_large"
    http_status = 413


class NotForPresentation(InvalidImage):
    """Raw detector data (a "For Processing" object): no viewer shows it as it is, so no model may score it."""

    code = "not_for_presentation"


class UnsupportedView(InvalidImage):
    """The image's view or body part, where its header says, is not one the model was made for."""

    code = "unsupported_view"


class ConflictError(InferqError):
    """The job is in a state that forbids the action."""

    code = "conflict"
    http_status = 409


class JobNotCancellable(ConflictError):
    """Only a queued job can be cancelled."""

    code = "job_not_cancellable"


class TransientError(InferqError):
    """A passing fault of the system; the same request may succeed later."""

    code = "transient_error"
    http_status = 503
    retryable = True


class BackendUnavailable(TransientError):
    """Redis (broker, job store or blob store) did not answer."""

    code = "backend_unavailable"


class BlobMissing(TransientError):
    """The stored upload is gone (expired) before a worker read it."""

    code = "blob_missing"
    http_status = 410
    retryable = False


class WorkerLost(TransientError):
    """The worker running the job stopped renewing its lease (it died or lost its network); the job runs again."""

    code = "worker_lost"


class NoConsumer(TransientError):
    """No live worker consumes a served model's queue (readiness)."""

    code = "no_consumer"


class ModelError(InferqError):
    """The model could not produce an answer."""

    code = "model_error"


class ModelLoadError(ModelError):
    """The model's weights or archive could not be loaded."""

    code = "model_load_error"


class ChecksumMismatch(ModelLoadError):
    """The weights file's sha256 differs from the registry's: refuse to serve it."""

    code = "checksum_mismatch"


class TimeLimitExceeded(ModelError):
    """The job ran past its model's soft or hard time limit."""

    code = "timeout"
    http_status = 504


class PoisonJob(ModelError):
    """Every attempt of the job ended the worker process that ran it; it is kept in the dead-letter list."""

    code = "poison"


class InferenceError(ModelError):
    """The model raised while running, or returned outputs of the wrong shape."""

    code = "inference_error"


class RemoteError(InferqError):
    """An error the HTTP API answered with, as the Python client raises it; `code` is the server's."""

    def __init__(self, code: str, message: str, *, http_status: int, retryable: bool = False) -> None:
        super().__init__(message)
        self.remote_code = code
        self.remote_http_status = http_status
        self.remote_retryable = retryable

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.remote_code, "message": self.message, "retryable": self.remote_retryable}

    def __str__(self) -> str:
        return f"{self.remote_code} (HTTP {self.remote_http_status}): {self.message}"


class Unauthorized(ClientError):
    """No API key, or one that is unknown or revoked."""

    code = "unauthorized"
    http_status = 401


class Forbidden(ClientError):
    """The API key is valid but none of its roles allows the call."""

    code = "forbidden"
    http_status = 403


class OptionsInQuery(ClientError):
    """Job options may carry identifiers (an accession number as idempotency key), and query strings end up in
    proxies' and servers' access logs: they go in the body or in headers."""

    code = "options_in_query"
    http_status = 400


class ClientDisconnected(ClientError):
    """The client closed the connection before its request was read; not an error of the service."""

    code = "client_disconnected"
    http_status = 499


class Overloaded(TransientError):
    """The service ran out of memory or open files for this request (many large uploads, many connections at
    once); it may fit later."""

    code = "overloaded"


class ConfigError(InferqError):
    """The operator's configuration (settings, model registry, Celery configuration) is wrong."""

    code = "config_error"


def error_payload(exc: BaseException) -> dict[str, Any]:
    """What a client may see of any exception: our own as they are, anything else as a bare internal error."""
    if isinstance(exc, InferqError):
        return exc.to_dict()
    return {"code": InferqError.code, "message": "internal error while processing the job", "retryable": False}


class QueueFull(TransientError):
    """The model's queue holds `max_queue_depth` jobs already: nothing was enqueued; try again later."""

    code = "queue_full"
    http_status = 429
