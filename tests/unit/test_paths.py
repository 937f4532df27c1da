"""Path decoding and traversal rules (including a property test: nothing escapes the root)."""
from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hmacfs.errors import HTTPError
from hmacfs.policy import paths

P = "/upload/"


@pytest.mark.parametrize("raw, expected", [
    (b"/upload/abc/file%20x.txt", "abc/file x.txt"),
    (b"/upload/abc/%c3%a4%28x%29.png", "abc/\u00e4(x).png"),       # Prosody: lowercase hex, () escaped
    (b"/upload/abc/%C3%A4(x).png", "abc/\u00e4(x).png"),           # file_share/ejabberd: uppercase
    ("/upload/abc/\u00e4 b.png".encode(), "abc/\u00e4 b.png"),     # raw UTF-8 in the request line
    (b"/upload/-slot_id/a&b.txt", "-slot_id/a&b.txt"),
])
def test_decoding(raw: bytes, expected: str) -> None:
    assert paths.signed_path(raw, P) == expected


@pytest.mark.parametrize("raw", [
    b"/upload/../etc/passwd", b"/upload/a/../../x", b"/upload/a/./b", b"/upload/%2e%2e/x", b"/upload/%2E%2E/x",
    b"/upload/a//b", b"/upload/a/", b"/upload/a%2fb", b"/upload/a%2Fb", b"/upload/a%5cb", b"/upload/a\\b",
    b"/upload/a%00b", b"/upload/.hmacfs/meta.sqlite3", b"/upload/%2ehmacfs/x", b"/upload/a/.hidden",
    b"/upload/a%0ab", b"/upload/%ff%fe", b"/upload/" + b"x" * 256,
])
def test_refused_paths_are_400(raw: bytes) -> None:
    with pytest.raises(HTTPError) as e:
        paths.signed_path(raw, P)
    assert e.value.status == 400


@pytest.mark.parametrize("raw", [b"/", b"/upload", b"/upload/", b"/other/x", b"/uploadx/y"])
def test_outside_prefix_or_prefix_itself_is_404(raw: bytes) -> None:
    with pytest.raises(HTTPError) as e:
        paths.signed_path(raw, P)
    assert e.value.status == 404


def test_split_target_absolute_form_and_query() -> None:
    t = paths.split_target(b"http://example.org/upload/a.txt?v=AB&v=cd&x=%20y#frag")
    assert t.raw_path == b"/upload/a.txt" and t.query == {"v": "AB", "x": " y"}


def test_extension_policy() -> None:
    assert paths.extension_allowed("a/B.PNG", [".png"], [])
    assert not paths.extension_allowed("a/b.exe", [".png"], [])
    assert paths.extension_allowed("a/b.exe", [], [])
    assert paths.extension_allowed("a/x.tar.gz", [".tar.gz"], [])
    assert not paths.extension_allowed("a/x.sh", [], [".sh"])


@given(st.binary(max_size=80))
def test_no_request_path_escapes_the_root(tail: bytes) -> None:
    try:
        sp = paths.signed_path(b"/upload/" + tail, P)
    except HTTPError as e:
        assert e.status in (400, 404, 414)
        return
    root = "/srv/root"
    joined = os.path.normpath(os.path.join(root, sp))
    assert joined.startswith(root + "/")
    assert joined == os.path.join(root, sp)  # nothing for normpath to collapse
    assert not any(seg.startswith(".") for seg in sp.split("/"))
