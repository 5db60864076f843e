"""What a job's input must be before it is accepted, shared by the submission path and `inferq predict`, so that a
served job and an in-process prediction read exactly the same bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

from inferq.config import Settings
from inferq.protocol.codec import TensorPayload, decode_tensor, select_input, tensor_to_bytes
from inferq.protocol.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia
from inferq.protocol.media import check_fits, probe
from inferq.protocol.registry import ModelSpec


@dataclass(frozen=True)
class FileUpload:
    """An uploaded image file (DICOM, PNG or JPEG)."""

    data: bytes
    filename: str = ""


@dataclass(frozen=True)
class TensorUpload:
    """Tensors in the Open Inference Protocol form."""

    inputs: list[TensorPayload] = field(default_factory=list)


@dataclass(frozen=True)
class ValidatedInput:
    """The blob to store (the original upload, or the canonical tensor JSON) and what the record says of it."""

    blob: bytes
    input_kind: str
    media_type: str


def validate_input(spec: ModelSpec, upload: FileUpload | TensorUpload, settings: Settings) -> ValidatedInput:
    """Check the input against the model cheaply (headers, shapes), refusing with a client error."""
    if isinstance(upload, FileUpload):
        return _validate_image(spec, upload, settings)
    return _validate_tensor(spec, upload, settings)


def _validate_image(spec: ModelSpec, upload: FileUpload, settings: Settings) -> ValidatedInput:
    if spec.input.kind != "image":
        raise UnsupportedMedia(f"model {spec.name!r} takes tensors as JSON, not a file upload")
    if len(upload.data) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the upload exceeds {settings.max_upload_bytes} bytes")
    info = probe(upload.data, max_image_pixels=settings.max_image_pixels)
    # A view or body part the model was not made for is refused here, at once, rather than as a failed job.
    check_fits(info, spec.input)
    return ValidatedInput(blob=upload.data, input_kind="image", media_type=info.format)


def _validate_tensor(spec: ModelSpec, upload: TensorUpload, settings: Settings) -> ValidatedInput:
    if spec.input.kind != "tensor":
        raise UnsupportedMedia(f"model {spec.name!r} takes an image file upload (multipart field 'file')")
    if not upload.inputs:
        raise InvalidRequest("'inputs' must hold one tensor")
    array = decode_tensor(select_input(upload.inputs, spec.input), spec.input)
    blob = tensor_to_bytes(array, spec.input.name)
    if len(blob) > settings.max_upload_bytes:
        raise PayloadTooLarge(f"the tensor exceeds {settings.max_upload_bytes} bytes")
    return ValidatedInput(blob=blob, input_kind="tensor", media_type="application/json")
