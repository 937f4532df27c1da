"""hmacfs's S3 client against a real moto server with request authentication on.

Every request below is checked by moto's SigV4 verifier with an IAM key made for the test
(tests/support/s3server.py), so a wrong signature fails the test with a 403. Keys avoid what
moto 5.2 refuses even when correctly signed (`+ % = &`, non-ASCII, list prefixes with `/`):
botocore's signer covers those in tests/unit/test_sigv4.py. moto with auth on cannot serve or
refuse presigned URLs (it answers 500 to every one, boto3's too), so the presigned GET is
fetched from a second moto without auth and its signature compared with botocore's live values.
"""
from __future__ import annotations

import datetime
import hashlib
import http.server
import io
import os
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import pytest

from hmacfs.storage import sigv4
from hmacfs.storage.s3client import S3Client, S3Error, S3Settings
from hmacfs.storage.s3multipart import MultipartWriter
from tests.support.s3server import MotoS3

MIB = 1 << 20


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def moto_noauth(tmp_path_factory):
    server = MotoS3(tmp_path_factory.mktemp("moto-noauth"), auth=False).start()
    yield server
    server.stop()


def client_for(server: MotoS3, **overrides) -> S3Client:
    values = {"endpoint": server.endpoint, "bucket": server.bucket, "region": server.region,
              "access_key": server.access_key, "secret_key": server.secret_key, "timeout": 30.0}
    values.update(overrides)
    return S3Client(S3Settings(**values))


@pytest.fixture
def s3(moto):
    client = client_for(moto)
    yield client
    client.close()


def read_all(obj) -> bytes:
    buffer = bytearray(MIB)
    view = memoryview(buffer)
    chunks = []
    while True:
        n = obj.readinto(view)
        if not n:
            return b"".join(chunks)
        chunks.append(bytes(view[:n]))


def test_put_get_head_delete_round_trip(s3):
    key = "round trip/file~1.txt"
    etag = s3.put_object(key, b"hello world", 11, "text/plain")
    assert etag == '"' + hashlib.md5(b"hello world").hexdigest() + '"'
    info = s3.head_object(key)
    assert (info.size, info.etag, info.content_type) == (11, etag, "text/plain")
    assert abs(info.last_modified - datetime.datetime.now(datetime.timezone.utc).timestamp()) < 300
    with s3.get_object(key) as obj:
        assert (obj.status, obj.size, obj.content_length) == (200, 11, 11)
        assert read_all(obj) == b"hello world"
    s3.delete_object(key)
    assert s3.head_object(key) is None
    with pytest.raises(S3Error) as caught:
        s3.get_object(key)
    assert (caught.value.status, caught.value.code) == (404, "NoSuchKey")
    s3.delete_object(key)  # deleting what is gone is not an error


def test_range_get_passthrough(s3):
    data = os.urandom(100_000)
    s3.put_object("ranged.bin", data, len(data))
    with s3.get_object("ranged.bin", 1000, 1999) as obj:
        assert (obj.status, obj.size, obj.content_length) == (206, 100_000, 1000)
        assert obj.headers["content-range"] == "bytes 1000-1999/100000"
        assert read_all(obj) == data[1000:2000]
    with s3.get_object("ranged.bin", 99_990) as obj:
        assert obj.status == 206 and read_all(obj) == data[99_990:]
    with pytest.raises(S3Error) as caught:
        s3.get_object("ranged.bin", 200_000, 200_010)
    assert caught.value.status == 416


def test_multipart_12_mib_in_5_mib_parts_with_two_workers(s3):
    data = os.urandom(12 * MIB)
    writer = MultipartWriter(s3, "multi part.bin", 5 * MIB, 2, "application/octet-stream")
    for offset in range(0, len(data), MIB):
        writer.write(memoryview(data)[offset:offset + MIB])
    # Two parts are (being) uploaded: nothing under the key yet, an upload in progress instead.
    assert s3.head_object("multi part.bin") is None
    assert "multi part.bin" not in [o.key for o in s3.list_objects("multi")]
    assert ("multi part.bin", writer.upload_id) in [(k, u) for k, u, _ in s3.list_multipart_uploads("multi")]
    etag = writer.finish()
    assert etag.strip('"').endswith("-3")
    assert s3.list_multipart_uploads("multi") == []
    with s3.get_object("multi part.bin") as obj:
        assert obj.size == len(data)
        assert hashlib.sha256(read_all(obj)).digest() == hashlib.sha256(data).digest()


def test_abort_leaves_no_object_and_no_upload(s3):
    writer = MultipartWriter(s3, "aborted.bin", 5 * MIB, 2)
    writer.write(os.urandom(11 * MIB))
    assert writer.upload_id is not None
    writer.abort()
    writer.abort()
    assert s3.head_object("aborted.bin") is None
    assert s3.list_multipart_uploads("aborted") == []
    with pytest.raises(ValueError):
        writer.write(b"more")


def test_writer_below_part_size_is_one_put(s3):
    writer = MultipartWriter(s3, "small.bin", 5 * MIB, 2)
    writer.write(b"a" * 1000)
    writer.write(b"b" * 1000)
    etag = writer.finish()
    assert writer.upload_id is None
    assert etag == '"' + hashlib.md5(b"a" * 1000 + b"b" * 1000).hexdigest() + '"'  # no "-N": not multipart
    assert s3.head_object("small.bin").size == 2000


def test_list_objects_pages(s3):
    keys = [f"listing{n:02d}" for n in range(7)]
    for key in keys:
        s3.put_object(key, key.encode(), len(key))
    with mock.patch.object(s3, "_request", wraps=s3._request) as spy:
        listed = list(s3.list_objects("listing", page_size=3))
    assert [o.key for o in listed] == keys and [o.size for o in listed] == [9] * 7
    assert sum(1 for c in spy.call_args_list if c.args[2] == "ListObjectsV2") == 3  # 3 + 3 + 1
    assert [o.key for o in s3.list_objects("listing", start_after="listing04", page_size=2)] == keys[5:]


def test_streamed_put_from_a_file_object(s3, tmp_path):
    data = os.urandom(3 * MIB + 5)
    path = tmp_path / "upload.bin"
    path.write_bytes(data)
    with open(path, "rb") as body:
        s3.put_object("streamed.bin", body, len(data), "application/x-test")
    assert s3.head_object("streamed.bin").content_type == "application/x-test"
    with s3.get_object("streamed.bin") as obj:
        assert read_all(obj) == data
    with pytest.raises(S3Error) as caught:  # a body shorter than announced never becomes an object
        s3.put_object("short.bin", io.BytesIO(b"abc"), 10)
    assert caught.value.code == "IncompleteBody"
    assert s3.head_object("short.bin") is None


def test_copy_object_single_and_multipart(s3):
    data = os.urandom(12 * MIB)
    s3.put_object("copy source.bin", data, len(data))
    s3.copy_object("copy source.bin", "copy single.bin")
    s3.copy_object("copy source.bin", "copy parts.bin", max_single=MIB, part_size=5 * MIB)  # UploadPartCopy
    for key in ("copy single.bin", "copy parts.bin"):
        with s3.get_object(key) as obj:
            assert read_all(obj) == data, key
    assert s3.head_object("copy parts.bin").etag.strip('"').endswith("-3")
    with pytest.raises(S3Error) as caught:
        s3.copy_object("no such source", "x")
    assert caught.value.code == "NoSuchKey"


def test_wrong_secret_and_unknown_key_are_refused_clearly(moto):
    wrong = client_for(moto, secret_key="not-the-secret-" + "x" * 25)
    with pytest.raises(S3Error) as caught:
        wrong.put_object("refused.txt", b"x", 1)
    error = caught.value
    assert (error.status, error.code) == (403, "SignatureDoesNotMatch")
    text = str(error)
    assert moto.endpoint in text and moto.bucket in text and "refused the credentials" in text
    assert "not-the-secret" not in text and moto.secret_key not in text
    unknown = client_for(moto, access_key="AKIAUNKNOWNKEY000000")
    with pytest.raises(S3Error) as caught:
        unknown.get_object("anything")
    assert (caught.value.status, caught.value.code) == (403, "InvalidAccessKeyId")
    with pytest.raises(S3Error) as caught:
        wrong.check_bucket()
    assert caught.value.code == "SignatureDoesNotMatch"
    assert client_for(moto).head_object("refused.txt") is None


def test_check_bucket(moto, s3):
    s3.check_bucket()
    missing = client_for(moto, bucket="no-such-bucket")
    with pytest.raises(S3Error) as caught:
        missing.check_bucket()
    assert (caught.value.status, caught.value.code) == (404, "NoSuchBucket")
    assert "no-such-bucket" in str(caught.value) and "does not exist" in str(caught.value)


class KeepAliveHandler(http.server.BaseHTTPRequestHandler):
    """moto's server speaks HTTP/1.0 and closes every connection, so connection reuse is shown
    against this HTTP/1.1 stand-in (no signature checks): 200 "ok" to everything."""

    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        self.server.connections += 1

    def _answer(self, body: bool):
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.send_header("ETag", '"e"')
        self.end_headers()
        if body:
            self.wfile.write(b"ok")
        if self.server.drop_idle:  # close without saying so, as a server timing out an idle connection
            self.close_connection = True

    def do_GET(self):
        self._answer(True)

    def do_PUT(self):
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)

    def log_message(self, *args):
        pass


@pytest.fixture
def keepalive():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    server.connections, server.drop_idle = 0, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = S3Client(S3Settings(f"http://127.0.0.1:{server.server_address[1]}", "bkt", access_key="AK",
                                 secret_key="SK", timeout=10))
    yield server, client
    client.close()
    server.shutdown()
    server.server_close()


@pytest.fixture
def tls_server(tmp_path):
    """The HTTP/1.1 stand-in behind TLS with a throwaway self-signed certificate for 127.0.0.1."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
                   check=True, capture_output=True, timeout=60)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), KeepAliveHandler)
    server.connections, server.drop_idle = 0, False
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", str(cert)
    server.shutdown()
    server.server_close()


def test_tls_checks_the_certificate(tls_server):
    endpoint, cert = tls_server
    untrusted = S3Client(S3Settings(endpoint, "bkt", access_key="AK", secret_key="SK", timeout=10))
    with pytest.raises(S3Error) as caught:
        untrusted.head_object("k")
    assert caught.value.status == 0 and "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    trusted = S3Client(S3Settings(endpoint, "bkt", access_key="AK", secret_key="SK", ca_file=cert, timeout=10))
    assert trusted.head_object("k").size == 2
    wrong_name = S3Client(S3Settings(endpoint.replace("127.0.0.1", "localhost"), "bkt", access_key="AK",
                                     secret_key="SK", ca_file=cert, timeout=10))
    with pytest.raises(S3Error) as caught:  # the certificate names 127.0.0.1 only
        wrong_name.head_object("k")
    assert caught.value.status == 0 and "match" in str(caught.value)


def test_connections_are_reused(keepalive):
    server, client = keepalive
    client.put_object("reuse.txt", b"x" * 4096, 4096)
    for _ in range(5):
        assert client.head_object("reuse.txt").size == 2
        with client.get_object("reuse.txt") as obj:
            assert read_all(obj) == b"ok"
    assert server.connections == 1  # one connection served all eleven requests


def test_a_connection_closed_by_the_server_is_replaced(keepalive):
    server, client = keepalive
    server.drop_idle = True
    for _ in range(3):
        assert client.head_object("k").size == 2  # the pooled connection is dead: retried on a new one
    assert server.connections == 3
    # A streamed body cannot be sent twice, so it never starts on a pooled connection.
    client.put_object("k", io.BytesIO(b"abc"), 3)
    assert server.connections == 4


def test_an_unread_get_does_not_return_its_connection(keepalive):
    server, client = keepalive
    with client.get_object("k") as obj:
        assert obj.read(1) == b"o"
    assert client._pool == []
    with client.get_object("k") as obj:
        assert read_all(obj) == b"ok"
    assert len(client._pool) == 1 and server.connections == 2


def test_authorization_header_equals_botocores_live(moto, s3):
    """The same GET from boto3 and hmacfs at the same instant: identical Authorization; then
    hmacfs's request is accepted by moto's verifier."""
    s3.put_object("compare me.txt", b"compare", 7)
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    boto = moto.s3()
    captured = {}

    def capture(request, **kwargs):
        captured["request"] = request

    boto.meta.events.register("before-send", capture)
    with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
        boto.get_object(Bucket=moto.bucket, Key="compare me.txt", Range="bytes=0-3")["Body"].read()
    theirs = captured["request"]
    target, ours = s3.prepare("GET", "compare me.txt", [], {"Range": "bytes=0-3"}, sigv4.EMPTY_SHA256, now=now)
    assert ours["Authorization"] == theirs.headers["Authorization"].decode()
    assert s3.base_url + target == theirs.url
    with mock.patch.object(sigv4, "_utcnow", return_value=now), s3.get_object("compare me.txt", 0, 3) as obj:
        assert read_all(obj) == b"comp"


def test_presigned_get_is_fetched_with_urllib(moto_noauth):
    client = client_for(moto_noauth)
    data = os.urandom(5000)
    client.put_object("presigned dir/file~name.bin", data, len(data))
    url = client.presign_get("presigned dir/file~name.bin", 300, "image/png", 'attachment; filename="a b.png"')
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == data
        assert response.headers["Content-Type"] == "image/png"
        assert response.headers["Content-Disposition"] == 'attachment; filename="a b.png"'


def test_presigned_url_matches_botocore_for_the_live_server_and_key(moto, s3):
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    ours = s3.presign_get("presign check.txt", 600, now=now)
    import boto3
    from botocore.config import Config

    boto = boto3.client("s3", endpoint_url=moto.endpoint, region_name=moto.region,
                        aws_access_key_id=moto.access_key, aws_secret_access_key=moto.secret_key,
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    with mock.patch("botocore.auth.get_current_datetime", return_value=now.replace(tzinfo=None)):
        theirs = boto.generate_presigned_url("get_object", ExpiresIn=600,
                                             Params={"Bucket": moto.bucket, "Key": "presign check.txt"})
    assert urlsplit(ours).path == urlsplit(theirs).path
    assert dict(parse_qsl(urlsplit(ours).query)) == dict(parse_qsl(urlsplit(theirs).query))


def test_tampered_presigned_url_is_not_served(moto, s3):
    """moto with auth on answers no presigned URL with the object (see the module docstring):
    this only proves a tampered URL does not leak the object there."""
    s3.put_object("tamper.txt", b"secret bytes", 12)
    url = s3.presign_get("tamper.txt", 300)
    tampered = url[:-1] + ("0" if url[-1] != "0" else "1")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(tampered, timeout=10).read()
    assert caught.value.code >= 400
