"""Writing one object of unknown size to S3 in parts, with bounded memory and concurrency.

Strategy: `write` fills one part-sized buffer; a full buffer goes to a pool of `concurrency`
threads (each PUTs one part) and a fresh buffer is filled meanwhile. A semaphore with
`concurrency` slots makes `write` wait while that many parts are in flight, so at most
(concurrency + 1) * part_size bytes are held, whatever the object's size. The multipart upload
is created lazily with the first full part: an object smaller than a part is one PutObject,
never an upload that must be completed or aborted. A failed part is remembered and raised from
the next `write` or `finish`; `abort` stops the workers and aborts the upload, and is safe to
call at any time and more than once, so a caller's `except: writer.abort()` always cleans up.
Nothing is visible under the key until CompleteMultipartUpload (or the single PUT) succeeds.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Union

from .s3client import S3Client

MIN_PART = 5 << 20  # S3's minimum part size (all parts but the last)
MAX_PARTS = 10000


class MultipartWriter:
    """Stream bytes into `key` (see the module docstring)."""

    def __init__(self, client: S3Client, key: str, part_size: int, concurrency: int,
                 content_type: Optional[str] = None) -> None:
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be at least 5 MiB ({MIN_PART} bytes), S3's minimum part size")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.client, self.key, self.part_size, self.content_type = client, key, part_size, content_type
        self.upload_id: Optional[str] = None
        self.total = 0
        self._buffer = bytearray(part_size)
        self._filled = 0
        self._number = 0
        self._slots = threading.Semaphore(concurrency)
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="s3-part")
        self._futures: list[Future] = []
        self._etags: dict[int, str] = {}
        self._failure: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._closed = False
        self._done = False

    def write(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Append `data`; blocks while `concurrency` parts are being uploaded."""
        self._check()
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), self.part_size - self._filled)
            self._buffer[self._filled:self._filled + n] = view[:n]
            self._filled += n
            self.total += n
            view = view[n:]
            if self._filled == self.part_size:
                self._submit()

    def _check(self) -> None:
        if self._closed:
            raise ValueError("the multipart writer is finished or aborted")
        with self._lock:
            failure = self._failure
        if failure is not None:
            raise failure

    def _submit(self) -> None:
        if self.upload_id is None:
            self.upload_id = self.client.create_multipart(self.key, self.content_type)
        self._number += 1
        if self._number > MAX_PARTS:
            raise ValueError(f"more than {MAX_PARTS} parts: raise part_size")
        number, buffer, filled = self._number, self._buffer, self._filled
        self._slots.acquire()
        try:
            self._check()
        except BaseException:
            self._slots.release()
            raise
        self._futures.append(self._pool.submit(self._upload, number, buffer, filled))
        self._buffer = bytearray(self.part_size) if filled == self.part_size else bytearray()
        self._filled = 0

    def _upload(self, number: int, buffer: bytearray, filled: int) -> None:
        try:
            if self._failure is None and not self._closed:
                etag = self.client.upload_part(self.key, self.upload_id, number, memoryview(buffer)[:filled])
                with self._lock:
                    self._etags[number] = etag
        except BaseException as exc:
            with self._lock:
                if self._failure is None:
                    self._failure = exc
        finally:
            self._slots.release()

    def finish(self) -> str:
        """Upload what is left and complete; returns the object's ETag."""
        self._check()
        try:
            if self.upload_id is None:
                etag = self.client.put_object(self.key, memoryview(self._buffer)[: self._filled], self._filled,
                                              self.content_type)
            else:
                if self._filled or self._number == 0:
                    self._submit()
                for future in self._futures:
                    future.result()
                self._check()
                parts = sorted(self._etags.items())
                etag = self.client.complete_multipart(self.key, self.upload_id, parts)
        finally:
            self._pool.shutdown(wait=True)
        self._closed = self._done = True
        self._buffer = bytearray()
        return etag

    def abort(self) -> None:
        """Stop the workers and abort the multipart upload (if one was started and not finished)."""
        if self._done:
            return
        with self._lock:
            if self._failure is None:
                self._failure = RuntimeError("multipart upload aborted")
        self._closed = True
        for future in self._futures:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._buffer = bytearray()
        if self.upload_id is not None:
            upload_id, self.upload_id = self.upload_id, None
            self.client.abort_multipart(self.key, upload_id)
