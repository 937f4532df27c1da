"""The S3 client's pure parts: credentials, addressing, XML, errors, retries, the multipart writer.

XML shapes are those of the AWS S3 API Reference examples (ListObjectsV2 "Example 4: Using a
Continuation Token" and "Example 2", CreateMultipartUpload, CompleteMultipartUpload and its
200-with-Error case, ListMultipartUploads, "Error responses"), as reproduced in public test
suites (Amazon::S3::Thin t/ response parser tests, google-cloud-cpp xml_node tests).
"""
from __future__ import annotations

import threading
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hmacfs.storage import s3xml
from hmacfs.storage.s3client import S3Client, S3Error, S3Settings, choose_addressing, resolve_credentials
from hmacfs.storage.s3multipart import MultipartWriter

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


# --- credentials -----------------------------------------------------------------------------------
def _file(tmp_path, text):
    path = tmp_path / "credentials"
    path.write_text(text)
    return str(path)


def test_config_wins_over_environment_and_file(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret"}
    path = _file(tmp_path, "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n")
    assert resolve_credentials("CFGKEY", "cfgsecret", env, path) == ("CFGKEY", "cfgsecret", None)


def test_environment_with_session_token_before_the_file(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "ENVKEY", "AWS_SECRET_ACCESS_KEY": "envsecret", "AWS_SESSION_TOKEN": "tok"}
    path = _file(tmp_path, "[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = filesecret\n")
    assert resolve_credentials(None, None, env, path) == ("ENVKEY", "envsecret", "tok")
    assert resolve_credentials("ONLYKEY", "", env, path) == ("ENVKEY", "envsecret", "tok")  # half a config


def test_shared_credentials_file_profiles(tmp_path):
    path = _file(tmp_path, "[default]\naws_access_key_id = DEFKEY\naws_secret_access_key = defsecret\n\n"
                           "[ops]\naws_access_key_id = OPSKEY\naws_secret_access_key = ops%secret\n"
                           "aws_session_token = opstoken\n")
    assert resolve_credentials(None, None, {}, path) == ("DEFKEY", "defsecret", None)
    assert resolve_credentials(None, None, {"AWS_PROFILE": "ops"}, path) == ("OPSKEY", "ops%secret", "opstoken")
    assert resolve_credentials(None, None, {"AWS_SHARED_CREDENTIALS_FILE": path}, None, "ops")[0] == "OPSKEY"


def test_default_file_is_under_home(tmp_path):
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "credentials").write_text("[default]\naws_access_key_id=HOMEKEY\naws_secret_access_key=s\n")
    assert resolve_credentials(None, None, {"HOME": str(tmp_path)}) == ("HOMEKEY", "s", None)


def test_no_credentials_names_where_it_looked(tmp_path):
    path = _file(tmp_path, "[other]\naws_access_key_id = K\naws_secret_access_key = S\n")
    with pytest.raises(ValueError, match=r"AWS_ACCESS_KEY_ID.*\[default\].*credentials"):
        resolve_credentials(None, None, {}, path)
    with pytest.raises(ValueError, match="not readable INI"):
        resolve_credentials(None, None, {}, _file(tmp_path, "no section header\n"))


# --- settings and addressing --------------------------------------------------------------------------
@pytest.mark.parametrize(("endpoint", "bucket", "expected"), [
    ("http://127.0.0.1:9000", "b1b", "path"),
    ("http://[::1]:9000", "b1b", "path"),
    ("http://localhost:9000", "b1b", "path"),
    ("https://s3.eu-west-1.amazonaws.com", "my-bucket", "virtual"),
    ("https://s3.eu-west-1.amazonaws.com", "my.dotted.bucket", "path"),  # TLS wildcard would not match
    ("https://minio.example.net", "UpperCase", "path"),
])
def test_auto_addressing(endpoint, bucket, expected):
    client = S3Client(S3Settings(endpoint, bucket))
    assert client.addressing == expected


def test_addressing_shapes_host_and_path():
    virtual = S3Client(S3Settings("https://s3.eu-west-1.amazonaws.com", "bkt", addressing="virtual"))
    assert virtual.base_url == "https://bkt.s3.eu-west-1.amazonaws.com"
    target, headers = virtual.prepare("GET", "a b/c", [], {}, "UNSIGNED-PAYLOAD")
    assert target == "/a%20b/c" and headers["Host"] == "bkt.s3.eu-west-1.amazonaws.com"
    path = S3Client(S3Settings("http://10.0.0.5:9000", "bkt", addressing="path"))
    target, headers = path.prepare("GET", "k", [("uploads", "")], {}, "UNSIGNED-PAYLOAD")
    assert (target, headers["Host"]) == ("/bkt/k?uploads=", "10.0.0.5:9000")
    assert choose_addressing("s3.amazonaws.com", "bkt", "path") == "path"


@pytest.mark.parametrize("endpoint", ["127.0.0.1:9000", "ftp://host", "http://", "http://host/prefix"])
def test_settings_refuse_bad_endpoints(endpoint):
    with pytest.raises(ValueError):
        S3Settings(endpoint, "bucket")


def test_settings_repr_hides_the_secret():
    settings = S3Settings("http://127.0.0.1:1", "b", access_key="AK", secret_key=SECRET, session_token="tok")
    assert SECRET not in repr(settings) and "tok" not in repr(settings)
    with pytest.raises(ValueError):
        S3Settings("http://127.0.0.1:1", "b", addressing="dns")


# --- XML ---------------------------------------------------------------------------------------------------
LIST_TRUNCATED = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>bucket</Name>
  <Prefix></Prefix>
  <NextContinuationToken>1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM=</NextContinuationToken>
  <KeyCount>1000</KeyCount>
  <MaxKeys>1000</MaxKeys>
  <IsTruncated>true</IsTruncated>
  <Contents>
    <Key>happyface.jpg</Key>
    <LastModified>2014-11-21T19:40:05.000Z</LastModified>
    <ETag>&quot;70ee1738b6b21e2c8a43f3a5ab0eee71&quot;</ETag>
    <Size>11</Size>
    <StorageClass>STANDARD</StorageClass>
  </Contents>
</ListBucketResult>"""

LIST_LAST = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
    <Name>quotes</Name>
    <Prefix>E</Prefix>
    <StartAfter>ExampleGuide.pdf</StartAfter>
    <KeyCount>1</KeyCount>
    <MaxKeys>3</MaxKeys>
    <IsTruncated>false</IsTruncated>
    <Contents>
        <Key>ExampleObject.txt</Key>
        <LastModified>2013-09-17T18:07:53.000Z</LastModified>
        <ETag>&quot;599bab3ed2c697f1d26842727561fd94&quot;</ETag>
        <Size>857</Size>
        <StorageClass>REDUCED_REDUNDANCY</StorageClass>
    </Contents>
</ListBucketResult>"""


def test_list_objects_v2_pages():
    objects, token = s3xml.parse_list_objects(LIST_TRUNCATED)
    assert token == "1ueGcxLPRx1Tr/XYExHnhbYLgveDs2J/wm36Hy4vbOwM="
    assert objects == [s3xml.ObjectInfo("happyface.jpg", 11, '"70ee1738b6b21e2c8a43f3a5ab0eee71"', 1416598805.0)]
    objects, token = s3xml.parse_list_objects(LIST_LAST)
    assert token is None and [(o.key, o.size) for o in objects] == [("ExampleObject.txt", 857)]


def test_list_objects_url_encoded_keys_and_no_namespace():
    body = (b"<ListBucketResult><EncodingType>url</EncodingType><IsTruncated>false</IsTruncated>"
            b"<Contents><Key>a+b%2Bc/%E6%97%A5%01</Key><Size>1</Size><ETag>e</ETag>"
            b"<LastModified>2014-11-21T19:40:05.5Z</LastModified></Contents></ListBucketResult>")
    (info,), token = s3xml.parse_list_objects(body)
    assert info.key == "a b+c/\u65e5\x01" and info.last_modified == 1416598805.5 and token is None


def test_initiate_and_complete_results():
    initiate = b"""<?xml version="1.0" encoding="UTF-8"?>
<InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>travel-maps</Bucket>
  <Key>paris.jpg</Key>
  <UploadId>VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>
</InitiateMultipartUploadResult>"""
    assert s3xml.parse_upload_id(initiate) == "VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA"
    complete = b"""<?xml version="1.0" encoding="UTF-8"?>
<CompleteMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Location>http://Example-Bucket.s3.Region.amazonaws.com/Example-Object</Location>
  <Bucket>Example-Bucket</Bucket>
  <Key>Example-Object</Key>
  <ETag>"3858f62230ac3c915f300c664312c11f-9"</ETag>
</CompleteMultipartUploadResult>"""
    assert s3xml.parse_etag_result(complete) == '"3858f62230ac3c915f300c664312c11f-9"'
    assert s3xml.parse_error(complete) is None
    with pytest.raises(ValueError):
        s3xml.parse_upload_id(b"<InitiateMultipartUploadResult/>")


def test_list_multipart_uploads_page():
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Bucket>bucket</Bucket>
  <KeyMarker></KeyMarker>
  <UploadIdMarker></UploadIdMarker>
  <NextKeyMarker>my-movie.m2ts</NextKeyMarker>
  <NextUploadIdMarker>YW55IGlkZWEgd2h5IGVsdmluZydzIHVwbG9hZCBmYWlsZWQ</NextUploadIdMarker>
  <MaxUploads>3</MaxUploads>
  <IsTruncated>true</IsTruncated>
  <Upload>
    <Key>my-divisor</Key>
    <UploadId>XMgbGlrZSBlbHZpbmcncyBub3QgaGF2aW5nIG11Y2ggbHVjaw</UploadId>
    <StorageClass>STANDARD</StorageClass>
    <Initiated>2010-11-10T20:48:33.000Z</Initiated>
  </Upload>
  <Upload>
    <Key>my-movie.m2ts</Key>
    <UploadId>VXBsb2FkIElEIGZvciBlbHZpbmcncyBteS1tb3ZpZS5tMnRzIHVwbG9hZA</UploadId>
    <StorageClass>STANDARD</StorageClass>
    <Initiated>2010-11-10T20:48:33.000Z</Initiated>
  </Upload>
</ListMultipartUploadsResult>"""
    uploads, markers = s3xml.parse_list_uploads(body)
    assert uploads[0] == ("my-divisor", "XMgbGlrZSBlbHZpbmcncyBub3QgaGF2aW5nIG11Y2ggbHVjaw", 1289422113.0)
    assert len(uploads) == 2
    assert markers == ("my-movie.m2ts", "YW55IGlkZWEgd2h5IGVsdmluZydzIHVwbG9hZCBmYWlsZWQ")


def test_error_documents_and_complete_body():
    error = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error>
  <Code>NoSuchKey</Code>
  <Message>The resource you requested does not exist</Message>
  <Resource>/mybucket/myfoto.jpg</Resource>
  <RequestId>4442587FB7D0A2F9</RequestId>
</Error>"""
    assert s3xml.parse_error(error) == ("NoSuchKey", "The resource you requested does not exist")
    assert s3xml.parse_error(b"not xml") is None
    body = s3xml.complete_body([(2, '"b&"'), (1, '"a"')])
    assert body.index(b"<PartNumber>1</PartNumber>") < body.index(b"<PartNumber>2</PartNumber>")
    assert b'"b&amp;"' in body
    assert s3xml.http_time("Wed, 12 Oct 2009 17:50:00 GMT") == 1255369800.0


# --- errors and retries through a scripted connection ------------------------------------------------------
class Response:
    def __init__(self, status, body=b"", headers=None, reason="OK"):
        self.status, self.reason, self._body, self.will_close = status, reason, body, False
        self._headers = {"content-length": str(len(body)), **(headers or {})}

    def read(self, n=-1):
        data, self._body = (self._body, b"") if n is None or n < 0 else (self._body[:n], self._body[n:])
        return data

    def readinto(self, view):
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def getheaders(self):
        return list(self._headers.items())

    def getheader(self, name, default=None):
        return self._headers.get(name.lower(), default)


class Connection:
    """Plays `script` (Response objects, or exceptions to raise on send) and records requests."""

    def __init__(self, script, log):
        self.script, self.log = script, log

    def _next_send(self, method, target):
        self.log.append((method, target))
        step = self.script[0]
        if isinstance(step, BaseException):
            self.script.pop(0)
            raise step

    def request(self, method, target, body=None, headers=None):
        self._next_send(method, target)

    def putrequest(self, method, target, **kwargs):
        self._next_send(method, target)

    def putheader(self, *args):
        pass

    def endheaders(self):
        pass

    def send(self, data):
        pass

    def getresponse(self):
        return self.script.pop(0)

    def close(self):
        pass


def scripted(script, **settings):
    client = S3Client(S3Settings("http://127.0.0.1:9", "bkt", access_key="AKIAIOSFODNN7EXAMPLE", secret_key=SECRET,
                                 **settings))
    log: list = []
    client._connect = lambda: Connection(script, log)
    return client, log


SIGNATURE_MISMATCH = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match the signature
 you provided. Check your key and signing method.</Message><AWSAccessKeyId>AKIAIOSFODNN7EXAMPLE</AWSAccessKeyId>
<StringToSign>AWS4-HMAC-SHA256
20130524T000000Z
20130524/us-east-1/s3/aws4_request
7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972</StringToSign>
<SignatureProvided>f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41</SignatureProvided>
<RequestId>4442587FB7D0A2F9</RequestId></Error>"""


def test_bad_credentials_error_is_clear_and_leaks_nothing():
    client, _ = scripted([Response(403, SIGNATURE_MISMATCH, reason="Forbidden")])
    with pytest.raises(S3Error) as caught:
        client.put_object("k", b"x", 1)
    error = caught.value
    assert (error.status, error.code, error.operation, error.key) == (403, "SignatureDoesNotMatch", "PutObject", "k")
    text = str(error)
    assert "http://127.0.0.1:9" in text and "bkt/k" in text and "SignatureDoesNotMatch" in text
    assert "credentials" in text
    assert SECRET not in text and "f0e8bdb87c96" not in text and "7344ae5b7ee6" not in text


def test_message_echoing_the_secret_or_a_signature_is_scrubbed():
    body = (f"<Error><Code>InvalidAccessKeyId</Code><Message>key {SECRET} sig "
            f"{'ab' * 32}</Message></Error>").encode()
    client, _ = scripted([Response(403, body)])
    with pytest.raises(S3Error) as caught:
        client.delete_object("k")
    assert SECRET not in str(caught.value) and "ab" * 32 not in str(caught.value)
    assert caught.value.code == "InvalidAccessKeyId"


def test_head_errors_have_codes_from_the_status():
    client, _ = scripted([Response(404), Response(403, reason="Forbidden")])
    assert client.head_object("missing") is None
    with pytest.raises(S3Error) as caught:
        client.head_object("k")
    assert caught.value.code == "Forbidden"


def test_a_bucket_in_another_region_says_which():
    client, _ = scripted([Response(301, headers={"x-amz-bucket-region": "eu-west-1"}, reason="Moved Permanently")])
    with pytest.raises(S3Error, match="the bucket is in region eu-west-1, not us-east-1"):
        client.check_bucket()


def test_complete_with_200_and_an_error_body_raises():
    body = b"<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"
    client, _ = scripted([Response(200, body)])
    with pytest.raises(S3Error, match="InternalError"):
        client.complete_multipart("k", "u", [(1, '"e"')])


def test_idempotent_request_is_retried_once_on_a_broken_connection():
    client, log = scripted([ConnectionResetError("reset"), Response(204)])
    client.delete_object("k")
    assert [m for m, _ in log] == ["DELETE", "DELETE"]
    client, log = scripted([ConnectionResetError("reset"), BrokenPipeError("pipe"), Response(204)])
    with pytest.raises(S3Error) as caught:
        client.delete_object("k")
    assert caught.value.status == 0 and caught.value.code == "BrokenPipeError" and len(log) == 2


def test_streamed_put_and_post_are_not_retried():
    import io

    client, log = scripted([ConnectionResetError("reset"), Response(200)])
    with pytest.raises(S3Error):
        client.put_object("k", io.BytesIO(b"abc"), 3)
    assert len(log) == 1
    client, log = scripted([ConnectionResetError("reset"), Response(200)])
    with pytest.raises(S3Error):
        client.create_multipart("k")
    assert len(log) == 1


def test_an_upload_refused_mid_body_reports_the_servers_answer():
    import io

    class RefusingConnection(Connection):
        def _next_send(self, method, target):
            self.log.append((method, target))

        def send(self, data):
            raise BrokenPipeError("the server stopped reading")

        def getresponse(self):
            step = self.script.pop(0)
            if isinstance(step, BaseException):
                raise step
            return step

    client, _ = scripted([])
    log: list = []
    client._connect = lambda: RefusingConnection([Response(403, SIGNATURE_MISMATCH, reason="Forbidden")], log)
    with pytest.raises(S3Error) as caught:
        client.put_object("k", io.BytesIO(b"x" * 100), 100)
    assert (caught.value.status, caught.value.code) == (403, "SignatureDoesNotMatch")
    client._connect = lambda: RefusingConnection([ConnectionResetError("no answer either")], log)
    with pytest.raises(S3Error) as caught:
        client.put_object("k", io.BytesIO(b"x" * 100), 100)
    assert (caught.value.status, caught.value.code) == (0, "BrokenPipeError")


def test_get_range_reads_size_from_content_range_and_streams():
    client, _ = scripted([Response(206, b"llo ", {"content-range": "bytes 2-5/11"})])
    with client.get_object("k", 2, 5) as obj:
        assert (obj.status, obj.size, obj.content_length) == (206, 11, 4)
        buffer = bytearray(2)
        assert obj.readinto(memoryview(buffer)) == 2 and bytes(buffer) == b"ll"
        assert obj.read(10) == b"o " and obj.read(10) == b""


# --- the multipart writer on a fake client -------------------------------------------------------------------
class FakeClient:
    def __init__(self, fail_part=None, delay=0.0):
        self.fail_part, self.delay = fail_part, delay
        self.parts, self.puts, self.aborted, self.completed = {}, [], [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def create_multipart(self, key, content_type=None):
        return "upload-1"

    def upload_part(self, key, upload_id, number, data):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if number == self.fail_part:
                raise S3Error(500, "InternalError", "boom", operation="UploadPart", key=key)
            self.parts[number] = bytes(data)
            return f'"etag-{number}"'
        finally:
            with self.lock:
                self.in_flight -= 1

    def complete_multipart(self, key, upload_id, parts):
        self.completed.append(parts)
        return '"final"'

    def abort_multipart(self, key, upload_id):
        self.aborted.append(upload_id)

    def put_object(self, key, body, length, content_type=None):
        self.puts.append(bytes(body))
        return '"single"'


MIB = 1 << 20


def test_part_size_below_5_mib_is_refused():
    with pytest.raises(ValueError, match="5 MiB"):
        MultipartWriter(FakeClient(), "k", 5 * MIB - 1, 2)


def test_small_object_is_one_put():
    client = FakeClient()
    writer = MultipartWriter(client, "k", 5 * MIB, 2)
    writer.write(b"abc")
    writer.write(memoryview(b"def"))
    assert writer.finish() == '"single"'
    assert client.puts == [b"abcdef"] and not client.parts and not client.completed


def test_parts_in_order_bounded_concurrency():
    client = FakeClient(delay=0.05)
    writer = MultipartWriter(client, "k", 5 * MIB, 2)
    data = bytes(range(256)) * (24 * MIB // 256)
    data = data[: 23 * MIB + 7]
    for offset in range(0, len(data), 3 * MIB + 1):
        writer.write(data[offset:offset + 3 * MIB + 1])
    assert writer.finish() == '"final"'
    assert client.max_in_flight <= 2
    assert client.completed == [[(n, f'"etag-{n}"') for n in range(1, 6)]]
    assert b"".join(client.parts[n] for n in sorted(client.parts)) == data


def test_part_failure_surfaces_and_abort_cleans_up():
    client = FakeClient(fail_part=1)
    writer = MultipartWriter(client, "k", 5 * MIB, 1)
    writer.write(b"x" * (5 * MIB))
    time.sleep(0.2)
    with pytest.raises(S3Error, match="InternalError"):
        writer.write(b"x" * (5 * MIB))
        writer.finish()
    writer.abort()
    writer.abort()  # safe twice
    assert client.aborted == ["upload-1"] and not client.completed


@settings(max_examples=20, deadline=None)
@example([5 * MIB], 1)
@example([4 * MIB, MIB, 4 * MIB, MIB], 2)
@example([], 1)
@given(st.lists(st.integers(min_value=0, max_value=4 * MIB), max_size=6), st.integers(min_value=1, max_value=3))
def test_writer_reassembles_any_write_pattern(sizes, concurrency):
    data = (bytes(range(251)) * (sum(sizes) // 251 + 1))[: sum(sizes)]
    client = FakeClient()
    writer = MultipartWriter(client, "k", 5 * MIB, concurrency)
    offset = 0
    for size in sizes:
        writer.write(data[offset:offset + size])
        offset += size
    writer.finish()
    if len(data) < 5 * MIB:
        assert client.puts == [data] and not client.parts
    else:
        assert not client.puts
        assert b"".join(client.parts[n] for n in sorted(client.parts)) == data
        assert all(len(client.parts[n]) == 5 * MIB for n in sorted(client.parts)[:-1])
        assert [n for n, _ in client.completed[0]] == sorted(client.parts)


@given(st.binary(max_size=300) | st.sampled_from([
    b"<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents></ListBucketResult>",
    b"<ListBucketResult><Contents><Key>k</Key><Size>1e9</Size><LastModified>yesterday</LastModified>"
    b"</Contents></ListBucketResult>",
    b"<ListMultipartUploadsResult><Upload><Key>k</Key><UploadId>u</UploadId><Initiated>soon</Initiated>"
    b"</Upload></ListMultipartUploadsResult>",
    b"<InitiateMultipartUploadResult></InitiateMultipartUploadResult>", b"<a>", b"\x00"]))
def test_any_answer_parses_or_is_a_malformed_reply(body: bytes) -> None:
    """What the S3 server sends is read or refused as MalformedReply: never another exception."""
    for parse in (s3xml.parse_list_objects, s3xml.parse_list_uploads, s3xml.parse_upload_id,
                  s3xml.parse_etag_result, s3xml.parse_error):
        try:
            parse(body)
        except s3xml.MalformedReply:
            pass


@pytest.mark.parametrize(("answer", "call"), [
    (Response(200, b"<ListBucketResult><Contents><Key>k</Key><Size>x</Size>"), lambda c: list(c.list_objects())),
    (Response(200, b"not xml at all"), lambda c: c.create_multipart("k")),
    (Response(200, headers={"content-length": "lots"}), lambda c: c.head_object("k")),
    (Response(200, b"", headers={"content-length": "-5"}), lambda c: c.get_object("k")),
])
def test_a_malformed_answer_is_a_502_s3_error_naming_the_operation(answer, call) -> None:
    client, _ = scripted([answer])
    with pytest.raises(S3Error) as caught:
        call(client)
    assert caught.value.status == 502 and caught.value.code == "MalformedReply", caught.value
