"""An image upload as a bare body: which kind its magic bytes name, the media type that says so, and the headers
its options travel in. Shared by `media.sniff`, the HTTP API and the Python client (which has neither Pillow nor
pydicom), so that the signatures and the header names are written once."""

from __future__ import annotations

__all__ = [
    "DICOM_PREFIX",
    "DICOM_PREFIX_OFFSET_BYTES",
    "JPEG_SIGNATURE",
    "MEDIA_TYPES",
    "OPTION_HEADERS",
    "PNG_SIGNATURE",
    "kind_of",
]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_PREFIX = b"DICM"
DICOM_PREFIX_OFFSET_BYTES = 128  # DICOM Part 10: 'DICM' after a 128-byte preamble
# Each kind (`media.MediaKind`'s values) with the media type of a bare body of that kind.
MEDIA_TYPES = {"dicom": "application/dicom", "png": "image/png", "jpeg": "image/jpeg"}
# Options of a bare image body travel in headers: a query string lands in access logs and proxies' logs, and
# an idempotency key or callback URL may carry an identifier (an accession number).
OPTION_HEADERS = {
    "priority": "inferq-priority",
    "callback_url": "inferq-callback-url",
    "deadline_s": "inferq-deadline-s",
}


def kind_of(data: bytes) -> str | None:
    """'dicom', 'png' or 'jpeg' from the magic bytes, else None; DICOM wins when 'DICM' sits at offset 128 (a
    preamble may be another format's header, PS3.10 7.1, and is ignored)."""
    if data[DICOM_PREFIX_OFFSET_BYTES : DICOM_PREFIX_OFFSET_BYTES + len(DICOM_PREFIX)] == DICOM_PREFIX:
        return "dicom"
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    return None
