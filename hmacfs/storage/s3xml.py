"""The XML of the S3 REST API, read and written with `xml.etree.ElementTree`.

Strategy: S3 answers in the `http://s3.amazonaws.com/doc/2006-03-01/` namespace, error bodies
in none, and S3-compatible servers differ in which they use, so elements are matched by local
name whatever their namespace. Each function takes the response body and returns plain values
(no sockets here), so the shapes copied from the AWS API Reference are unit-tested as they are.
Bodies come from the server we were configured to trust; ElementTree expands no external
entities.
"""
from __future__ import annotations

import calendar
import datetime
import email.utils
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import unquote_plus
from xml.sax.saxutils import escape

NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass(frozen=True)
class ObjectInfo:
    """What HEAD or a listing says about an object; `last_modified` is Unix time (UTC)."""

    key: str
    size: int
    etag: str
    last_modified: float
    content_type: Optional[str] = None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element, name: str) -> Optional[ET.Element]:
    for child in element:
        if _local(child.tag) == name:
            return child
    return None


def _text(element: ET.Element, name: str, default: str = "") -> str:
    child = _child(element, name)
    return child.text or "" if child is not None else default


def _children(element: ET.Element, name: str) -> Iterable[ET.Element]:
    return (child for child in element if _local(child.tag) == name)


class MalformedReply(ValueError):
    """An answer no S3 server should give: not XML, or a field that is not a number or a date.
    The client turns it into an S3Error (502) naming the operation."""


def _root(body: bytes) -> ET.Element:
    try:
        return ET.fromstring(body)  # noqa: S314 - see the module docstring
    except ET.ParseError as e:
        raise MalformedReply(f"the answer is not XML ({e})") from None


def length(text: str) -> int:
    """A byte count from a header or an XML field: ASCII digits only, bounded."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise MalformedReply(f"{text[:40]!r} is not a byte count")
    return int(text)


def iso_time(text: str) -> float:
    """`2009-10-12T17:50:30.000Z` (listings) -> Unix time."""
    raw, text = text, text.strip().rstrip("Z")
    try:
        when = datetime.datetime.strptime(text.split(".")[0], "%Y-%m-%dT%H:%M:%S")
        fraction = float("0." + text.split(".")[1]) if "." in text else 0.0
    except ValueError:
        raise MalformedReply(f"{raw[:40]!r} is not a date") from None
    return calendar.timegm(when.timetuple()) + fraction


def http_time(text: str) -> float:
    """`Wed, 12 Oct 2009 17:50:00 GMT` (Last-Modified) -> Unix time; 0.0 when unreadable."""
    try:
        return email.utils.parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError):
        return 0.0


def parse_error(body: bytes) -> Optional[tuple[str, str]]:
    """(Code, Message) of an `<Error>` document, or None if the body is not one. Only those two
    fields are kept: a SignatureDoesNotMatch body also echoes the signature and the string to
    sign, which must not travel into logs."""
    try:
        root = _root(body)
    except MalformedReply:
        return None
    if _local(root.tag) != "Error":
        return None
    return _text(root, "Code"), _text(root, "Message")


def parse_upload_id(body: bytes) -> str:
    """`InitiateMultipartUploadResult` -> UploadId."""
    upload_id = _text(_root(body), "UploadId")
    if not upload_id:
        raise MalformedReply("InitiateMultipartUploadResult without an UploadId")
    return upload_id


def parse_etag_result(body: bytes) -> str:
    """ETag of `CompleteMultipartUploadResult`, `CopyObjectResult` or `CopyPartResult`."""
    return _text(_root(body), "ETag")


def parse_list_objects(body: bytes) -> tuple[list[ObjectInfo], Optional[str]]:
    """A `ListBucketResult` page of ListObjectsV2 -> (objects, NextContinuationToken or None).
    Keys are decoded when the page says `EncodingType` url (asked for so that keys with
    characters XML 1.0 cannot carry still list)."""
    root = _root(body)
    decode = unquote_plus if _text(root, "EncodingType").strip().lower() == "url" else str
    objects = [
        ObjectInfo(
            key=decode(_text(item, "Key")),
            size=length(_text(item, "Size", "0") or "0"),
            etag=_text(item, "ETag"),
            last_modified=iso_time(_text(item, "LastModified")) if _child(item, "LastModified") is not None else 0.0,
        )
        for item in _children(root, "Contents")
    ]
    truncated = _text(root, "IsTruncated").strip().lower() == "true"
    token = _text(root, "NextContinuationToken") or None
    return objects, token if truncated else None


def parse_list_uploads(body: bytes) -> tuple[list[tuple[str, str, float]], Optional[tuple[str, str]]]:
    """A `ListMultipartUploadsResult` page -> ([(key, upload id, initiated)], next markers or None)."""
    root = _root(body)
    uploads = [
        (_text(item, "Key"), _text(item, "UploadId"), iso_time(_text(item, "Initiated", "1970-01-01T00:00:00Z")))
        for item in _children(root, "Upload")
    ]
    if _text(root, "IsTruncated").strip().lower() != "true":
        return uploads, None
    return uploads, (_text(root, "NextKeyMarker"), _text(root, "NextUploadIdMarker"))


def complete_body(parts: Iterable[tuple[int, str]]) -> bytes:
    """The `CompleteMultipartUpload` request body for (part number, ETag) pairs, in order."""
    items = "".join(
        f"<Part><PartNumber>{number}</PartNumber><ETag>{escape(etag)}</ETag></Part>"
        for number, etag in sorted(parts)
    )
    return f'<CompleteMultipartUpload xmlns="{NAMESPACE}">{items}</CompleteMultipartUpload>'.encode()
