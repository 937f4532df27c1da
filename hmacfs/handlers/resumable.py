"""Which protocol a request speaks: plain PUT, tus 1.0.0 or the IETF resumable-upload draft.

The IETF draft is chosen by `Upload-Draft-Interop-Version` (a version we speak) and tus by
`Tus-Resumable`, on the signed URL (creation) and on the upload resource alike; a PUT with
neither, or with an interop version we do not speak, is an ordinary PUT. With
`resumableuploadsenabled = false` every request is served as before resumable uploads
existed (POST is a 405, the headers are ignored).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import HTTPError
from ..http.exchange import Exchange
from . import ietf, tus, upload

if TYPE_CHECKING:
    from ..app import App

BASE_METHODS = "OPTIONS, HEAD, GET, PUT, DELETE"
RESUMABLE_METHODS = "OPTIONS, HEAD, GET, PUT, POST, PATCH, DELETE"
OVERRIDABLE = ("PATCH", "DELETE", "HEAD")  # tus clients may tunnel these through POST


def handle_put(app: App, ex: Exchange, signed_path: str) -> None:
    version = ietf.interop_version(ex.req.headers) if app.resumable is not None else None
    if version is not None and ietf.wants_resumption(app, ex, version):
        ietf.handle_creation(app, ex, signed_path, version)
    else:
        upload.handle_put(app, ex, signed_path)


def handle_post(app: App, ex: Exchange, signed_path: str) -> None:
    """POST to a signed upload URL creates a resumable upload (tus, or the IETF draft)."""
    if app.resumable is None:
        raise HTTPError(405, "resumable uploads are turned off here", {"Allow": BASE_METHODS})
    version = ietf.interop_version(ex.req.headers)
    if version is not None:
        ietf.handle_creation(app, ex, signed_path, version)
    elif "tus-resumable" in ex.req.headers:
        tus.handle_creation(app, ex, signed_path)
    else:
        raise HTTPError(400, "POST creates a resumable upload: send Tus-Resumable: 1.0.0 (tus) or "
                             "Upload-Draft-Interop-Version (IETF draft)")


def handle_resource(app: App, ex: Exchange, upload_id: str) -> None:
    """An upload resource (`<prefix>.uploads/<id>`): its URL is the capability."""
    if app.resumable is None:
        raise HTTPError(404, "not found")
    method = ex.req.method
    override = ex.req.headers.get("x-http-method-override", "").strip().upper()
    if method == "POST" and override in OVERRIDABLE:
        method = override
    if method == "OPTIONS":
        handle_options(app, ex, upload_id)
        return
    version = ietf.interop_version(ex.req.headers)
    if version is not None:
        ietf.handle_resource(app, ex, upload_id, version, method)
    else:
        tus.handle_resource(app, ex, upload_id, method)


def handle_options(app: App, ex: Exchange, _path: str) -> None:
    """CORS preflight and protocol discovery: no authentication (browsers send none), never
    touches storage. With resumable uploads on, it also answers tus's and the draft's
    discovery (Tus-*, Upload-Limit, Accept-Patch)."""
    if app.resumable is None:
        ex.send(204, [("Allow", BASE_METHODS), *ex.cors.preflight(BASE_METHODS)])
        return
    headers = [("Allow", RESUMABLE_METHODS), *ex.cors.preflight(RESUMABLE_METHODS), *tus.discovery_headers(app),
               ("Accept-Patch", f"{ietf.PARTIAL_UPLOAD}, {tus.OCTET_STREAM}")]
    version = ietf.interop_version(ex.req.headers)
    if version is not None:
        headers += [("Upload-Draft-Interop-Version", str(version)), ("Upload-Limit", ietf.upload_limit(app, version))]
    ex.send(204, headers)
