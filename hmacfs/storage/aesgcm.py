"""AES-256-GCM through the system libcrypto (OpenSSL's EVP interface), reached with ctypes.

Strategy: hmacfs ships no runtime dependency and writes no cryptography by hand, yet the
interpreter that runs it has already loaded a vetted AES-GCM: the libcrypto behind `ssl` and
`hashlib`. This module binds the dozen EVP functions an AEAD needs and nothing more, so the
hard parts (constant-time AES with AES-NI, GHASH, tag comparison) stay in OpenSSL. ctypes'
`CDLL` releases the GIL around every call, so request threads encrypt in parallel; a small
per-key pool of cipher contexts (each keyed once, then re-armed with a fresh nonce) avoids
both a lock held across the work and OpenSSL 3's costly per-call cipher fetch. Buffers are
handed to C in place: writable ones through `from_buffer`, `bytes` by pointer, so a
multi-MiB segment is never copied on its way in or out. Every return value is checked.

The nonce is fixed at 96 bits (the GCM fast path, and the only length the file format uses);
the caller supplies it and must never repeat one under a key (random 12-byte nonces are safe
for up to 2**32 messages per key, NIST SP 800-38D 8.3).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import weakref
from typing import Any, Dict, List, Optional, Tuple, Union

from ..errors import StartupError

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
MAX_DATA = 1 << 30  # EVP lengths are C ints; a segment is a few MiB at most

EVP_CTRL_GCM_SET_IVLEN = 0x9
EVP_CTRL_GCM_GET_TAG = 0x10
EVP_CTRL_GCM_SET_TAG = 0x11

_POOL_MAX = 8  # idle contexts kept per key and direction; more are freed after use

Buffer = Union[bytes, bytearray, memoryview]


class CryptoUnavailable(StartupError):
    """The system libcrypto (or one of the EVP functions used here) cannot be loaded.

    A `StartupError`: a server configured for encryption without a usable libcrypto must not start."""


class CryptoError(Exception):
    """A libcrypto call failed where it should not (not a failed authentication)."""


class InvalidTag(Exception):
    """Decryption failed: the ciphertext, tag, nonce, associated data or key is not the one used."""


_c = ctypes
_vp = _c.c_void_p
_PROTOTYPES: Dict[str, Tuple[Any, List[Any]]] = {
    "EVP_CIPHER_CTX_new": (_vp, []),
    "EVP_CIPHER_CTX_free": (None, [_vp]),
    "EVP_CIPHER_CTX_reset": (_c.c_int, [_vp]),  # not called: its presence means OpenSSL >= 1.1
    "EVP_aes_256_gcm": (_vp, []),
    "EVP_EncryptInit_ex": (_c.c_int, [_vp, _vp, _vp, _vp, _vp]),
    "EVP_DecryptInit_ex": (_c.c_int, [_vp, _vp, _vp, _vp, _vp]),
    "EVP_EncryptUpdate": (_c.c_int, [_vp, _vp, _c.POINTER(_c.c_int), _vp, _c.c_int]),
    "EVP_DecryptUpdate": (_c.c_int, [_vp, _vp, _c.POINTER(_c.c_int), _vp, _c.c_int]),
    "EVP_EncryptFinal_ex": (_c.c_int, [_vp, _vp, _c.POINTER(_c.c_int)]),
    "EVP_DecryptFinal_ex": (_c.c_int, [_vp, _vp, _c.POINTER(_c.c_int)]),
    "EVP_CIPHER_CTX_ctrl": (_c.c_int, [_vp, _c.c_int, _c.c_int, _vp]),
}

_lib_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


def library_candidates(found: Optional[str], platform: str = sys.platform) -> List[str]:
    """Names to try, in order: what `find_library` found, then the usual Linux sonames.

    macOS's unversioned /usr/lib/libcrypto.dylib aborts the process when loaded (instead of
    failing), so it is never tried."""
    names = [n for n in (found, "libcrypto.so.3", "libcrypto.so") if n]
    if platform == "darwin":
        names = [n for n in names if n not in ("/usr/lib/libcrypto.dylib", "libcrypto.dylib")]
    return list(dict.fromkeys(names))


def load_libcrypto() -> ctypes.CDLL:
    """The system libcrypto with the EVP AES-GCM prototypes set; loaded once, then cached.

    Raises `CryptoUnavailable` naming what was tried when no candidate loads or one lacks a
    function."""
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load(library_candidates(ctypes.util.find_library("crypto")))
        return _lib


def _load(names: List[str]) -> ctypes.CDLL:
    problems = []
    for name in names:
        try:
            lib = ctypes.CDLL(name)  # CDLL, not PyDLL: calls release the GIL
        except OSError as e:
            problems.append(f"{name}: {e}")
            continue
        missing = [f for f in _PROTOTYPES if not hasattr(lib, f)]
        if missing:
            problems.append(f"{name}: lacks {', '.join(missing)}")
            continue
        for fname, (restype, argtypes) in _PROTOTYPES.items():
            func = getattr(lib, fname)
            func.restype = restype
            func.argtypes = argtypes
        return lib
    tried = "; ".join(problems) or "find_library('crypto') found nothing and no soname given"
    raise CryptoUnavailable(
        f"AES-256-GCM needs the system libcrypto (OpenSSL 1.1 or 3) for [encryption]; tried: {tried}")


def _check(rc: int, what: str) -> None:
    if rc != 1:
        raise CryptoError(f"{what} failed (returned {rc})")


def _bytes_view(data: Buffer) -> memoryview:
    view = memoryview(data)
    if not view.c_contiguous:
        raise ValueError("buffers handed to AES-GCM must be contiguous")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _input(data: Buffer) -> Tuple[Any, int]:
    """(something ctypes passes as a pointer, length) for read access, without copying large data.

    `bytes` goes by pointer; writable buffers through `from_buffer`. Only a read-only buffer that
    is not `bytes` (a view of bytes, mmap) is copied, which no caller in hmacfs passes for bulk
    data."""
    if isinstance(data, bytes):
        return data, len(data)
    view = _bytes_view(data)
    n = len(view)
    if view.readonly:
        return view.tobytes(), n
    return (ctypes.c_char * n).from_buffer(view), n


def _output(out: Buffer, need: int) -> Any:
    """The first `need` bytes of the writable buffer `out`, as a ctypes array over the same memory."""
    view = _bytes_view(out)
    if view.readonly:
        raise TypeError("the output buffer must be writable (bytearray or a view of one)")
    if len(view) < need:
        raise ValueError(f"output buffer holds {len(view)} bytes, {need} needed")
    return (ctypes.c_char * need).from_buffer(view)


def _free_pool(lib: ctypes.CDLL, lock: threading.Lock, idle: Dict[bool, List[int]]) -> None:
    with lock:
        ctxs = idle[True] + idle[False]
        idle[True].clear()
        idle[False].clear()
    for ctx in ctxs:
        lib.EVP_CIPHER_CTX_free(ctx)


def _nonce(nonce: Buffer) -> bytes:
    value = memoryview(nonce).tobytes()  # not bytes(): bytes(12) would be a zero nonce
    if len(value) != NONCE_SIZE:
        raise ValueError(f"the nonce must be {NONCE_SIZE} bytes, not {len(value)}")
    return value


class AesGcm:
    """AES-256-GCM with one key: 96-bit nonces, 128-bit tags, thread-safe."""

    def __init__(self, key: bytes) -> None:
        key = memoryview(key).tobytes()  # not bytes(): bytes(32) would be a zero key
        if len(key) != KEY_SIZE:
            raise ValueError(f"AES-256-GCM needs a {KEY_SIZE}-byte key, not {len(key)} bytes")
        self._lib = load_libcrypto()
        self._cipher = self._lib.EVP_aes_256_gcm()
        if not self._cipher:
            raise CryptoUnavailable("EVP_aes_256_gcm returned NULL: libcrypto has no AES-256-GCM")
        self._key = key
        self._lock = threading.Lock()
        self._idle: Dict[bool, List[int]] = {True: [], False: []}
        weakref.finalize(self, _free_pool, self._lib, self._lock, self._idle)

    def __repr__(self) -> str:
        return "AesGcm(<key hidden>)"

    # -- contexts: keyed once, re-armed with a nonce per message, pooled per direction --

    def _new_ctx(self, encrypt: bool) -> int:
        lib = self._lib
        init = lib.EVP_EncryptInit_ex if encrypt else lib.EVP_DecryptInit_ex
        ctx = lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise CryptoError("EVP_CIPHER_CTX_new failed (out of memory)")
        try:
            _check(init(ctx, self._cipher, None, None, None), "EVP_CipherInit_ex (cipher)")
            _check(lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_SIZE, None), "EVP_CTRL_GCM_SET_IVLEN")
            _check(init(ctx, None, None, self._key, None), "EVP_CipherInit_ex (key)")
        except BaseException:
            lib.EVP_CIPHER_CTX_free(ctx)
            raise
        return ctx

    def _take(self, encrypt: bool) -> int:
        with self._lock:
            idle = self._idle[encrypt]
            if idle:
                return idle.pop()
        return self._new_ctx(encrypt)

    def _give(self, ctx: int, encrypt: bool, clean: bool) -> None:
        if clean:
            with self._lock:
                idle = self._idle[encrypt]
                if len(idle) < _POOL_MAX:
                    idle.append(ctx)
                    return
        self._lib.EVP_CIPHER_CTX_free(ctx)  # after a failure the state is unknown: never reuse

    def close(self) -> None:
        """Free the pooled contexts (OpenSSL wipes their key schedules). Later calls still work."""
        _free_pool(self._lib, self._lock, self._idle)

    # -- the AEAD --

    def encrypt_into(self, out: Buffer, nonce: Buffer, data: Buffer, aad: Buffer = b"") -> None:
        """Write len(data) + 16 bytes into `out`: the ciphertext, then the tag.

        `out` may be exactly the memory of `data` (in-place encryption), never a partial overlap."""
        src, n = _input(data)
        if n > MAX_DATA:
            raise ValueError(f"at most {MAX_DATA} bytes per message")
        dst = _output(out, n + TAG_SIZE)
        iv = _nonce(nonce)
        aad_ptr, aad_len = _input(aad)
        lib = self._lib
        outl = ctypes.c_int(0)
        ctx = self._take(True)
        ok = False
        try:
            _check(lib.EVP_EncryptInit_ex(ctx, None, None, None, iv), "EVP_EncryptInit_ex (nonce)")
            if aad_len:
                _check(lib.EVP_EncryptUpdate(ctx, None, ctypes.byref(outl), aad_ptr, aad_len), "EVP_EncryptUpdate(aad)")
            if n:
                _check(lib.EVP_EncryptUpdate(ctx, dst, ctypes.byref(outl), src, n), "EVP_EncryptUpdate")
                if outl.value != n:
                    raise CryptoError(f"EVP_EncryptUpdate wrote {outl.value} of {n} bytes")
            tag_ptr = ctypes.addressof(dst) + n
            _check(lib.EVP_EncryptFinal_ex(ctx, tag_ptr, ctypes.byref(outl)), "EVP_EncryptFinal_ex")
            if outl.value != 0:
                raise CryptoError(f"EVP_EncryptFinal_ex wrote {outl.value} bytes (GCM writes none)")
            _check(lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_SIZE, tag_ptr), "EVP_CTRL_GCM_GET_TAG")
            ok = True
        finally:
            self._give(ctx, True, ok)

    def decrypt_into(self, out: Buffer, nonce: Buffer, ciphertext_and_tag: Buffer, aad: Buffer = b"") -> int:
        """Authenticate and decrypt into `out`; return the plaintext length (input length - 16).

        Raises `InvalidTag` if anything was altered; `out` is then zeroed, so no unauthenticated
        plaintext is left behind. `out` may be exactly the memory of the ciphertext (in place)."""
        src, total = _input(ciphertext_and_tag)
        n = total - TAG_SIZE
        if n < 0:
            raise InvalidTag(f"{total} bytes is shorter than a tag")
        if n > MAX_DATA:
            raise ValueError(f"at most {MAX_DATA} bytes per message")
        tag = bytes(_bytes_view(ciphertext_and_tag)[n:])  # 16 bytes; OpenSSL copies it in
        dst = _output(out, n)
        iv = _nonce(nonce)
        aad_ptr, aad_len = _input(aad)
        lib = self._lib
        outl = ctypes.c_int(0)
        ctx = self._take(False)
        authentic = False
        try:
            _check(lib.EVP_DecryptInit_ex(ctx, None, None, None, iv), "EVP_DecryptInit_ex (nonce)")
            if aad_len:
                _check(lib.EVP_DecryptUpdate(ctx, None, ctypes.byref(outl), aad_ptr, aad_len), "EVP_DecryptUpdate(aad)")
            if n:
                _check(lib.EVP_DecryptUpdate(ctx, dst, ctypes.byref(outl), src, n), "EVP_DecryptUpdate")
                if outl.value != n:
                    raise CryptoError(f"EVP_DecryptUpdate wrote {outl.value} of {n} bytes")
            _check(lib.EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_SIZE, tag), "EVP_CTRL_GCM_SET_TAG")
            final = lib.EVP_DecryptFinal_ex(ctx, ctypes.addressof(dst) + n, ctypes.byref(outl))
            if final != 1:
                raise InvalidTag("authentication failed")
            if outl.value != 0:
                raise CryptoError(f"EVP_DecryptFinal_ex wrote {outl.value} bytes (GCM writes none)")
            authentic = True
        finally:
            if not authentic:
                ctypes.memset(dst, 0, n)
            self._give(ctx, False, authentic)
        return n

    def encrypt(self, nonce: Buffer, data: Buffer, aad: Buffer = b"") -> bytes:
        """Ciphertext followed by the 16-byte tag (convenience; copies the result once)."""
        out = bytearray(len(_bytes_view(data)) + TAG_SIZE)
        self.encrypt_into(out, nonce, data, aad)
        return bytes(out)

    def decrypt(self, nonce: Buffer, ciphertext_and_tag: Buffer, aad: Buffer = b"") -> bytes:
        """The plaintext of ciphertext-then-tag, or `InvalidTag` (convenience; copies once)."""
        out = bytearray(max(0, len(_bytes_view(ciphertext_and_tag)) - TAG_SIZE))
        n = self.decrypt_into(out, nonce, ciphertext_and_tag, aad)
        return bytes(out[:n])
