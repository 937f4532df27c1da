"""Every vector of shared/spec/protocol.md, and the decision rules around them."""
from __future__ import annotations

import pytest

from hmacfs import auth
from hmacfs.errors import HTTPError

SECRET = [b"secret"]
PROSODY_JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZUBleGFtcGxlLm9yZyIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjox"
    "NzAwMDAwMzAwLCJzbG90IjoiZDZmMmM0YTAtMWIyYy00ZDNlLTlmMDAtMDEyMzQ1Njc4OWFiIiwiZXhwaXJlcyI6MTcwMDA4NjQwMCwiZm"
    "lsZW5hbWUiOiJmaWxlLnR4dCIsImZpbGVzaXplIjo1LCJmaWxldHlwZSI6InRleHQvcGxhaW4ifQ.iCZwxzRyc63gyZ4gWDetyJ8L4QHIW"
    "fRrRZoZTuDJelM")
SLOT = "d6f2c4a0-1b2c-4d3e-9f00-0123456789ab"


@pytest.mark.parametrize("message, expected", [
    (auth.message_v("abc/file.txt", 5), "3c428543422e1df7c167ebb9f55ea60bd1506491baec382880dd84ce13fc7f77"),
    (auth.message_v2("abc/file.txt", 5, "text/plain"),
     "99573aaa3c89e2a2be492bca77d9a5088fe4e9a9f2b7b54d44154ea4a071bf2f"),
    (auth.message_v2("abc/file.txt", 5, "application/octet-stream"),
     "745375a99469faa7adbb22d7e74cf9a1bfa56a427446d030cbcfa6c145f98cfd"),
    (auth.message_v3("PUT", 1700000000, "/upload/abc/file.txt"),
     "da739ae98a62cc0fc16a1f0141a327e84eaef8874dba7678ea5b50e1eae576e9"),
    (auth.message_v("3f1c9a1e-9c7b-4a52-8d3c-2f0e5b6a7c8d/Bildschirmfoto 2026-11-21 um 10.00.00 (ä).png", 1234),
     "e114b020e14a647e2342c582bbef60c685b7d229c05a718d7570ff6f3470435a"),
])
def test_spec_vectors(message: bytes, expected: str) -> None:
    assert auth.mac_hex(b"secret", message) == expected


def test_prosody_filer_vectors() -> None:
    key = b"mysecret"
    assert auth.mac_hex(key, auth.message_v("thomas/abc/catmetal.jpg", 23026)) == \
        "7b8879e2d1c733b423a70cde30cecc3a3c64a03f790d1b5bcbb2a6aca52b477e"
    assert auth.mac_hex(key, auth.message_v2("thomas/abc/catmetal.jpg", 23026, "image/jpeg")) == \
        "7318cd44d4c40731e3b2ff869f553ab2326eae631868e7b8054db20d4aee1c06"


def facts(query, path="abc/file.txt", method="PUT", length=5, ctype=None, authorization=""):
    return auth.RequestFacts(method=method, signed_path=path, full_path="/upload/" + path, query=query,
                             authorization=authorization, content_type=ctype, content_length=length)


def test_v_accepts_uppercase_hex_and_rejects_wrong_size() -> None:
    mac = "3C428543422E1DF7C167EBB9F55EA60BD1506491BAEC382880DD84CE13FC7F77"
    assert auth.authorize_upload(SECRET, SECRET, facts({"v": mac}), 0).protocol == "v"
    with pytest.raises(HTTPError) as e:
        auth.authorize_upload(SECRET, SECRET, facts({"v": mac}, length=6), 0)
    assert e.value.status == 403


def test_v2_binds_content_type_with_default() -> None:
    mac = "745375a99469faa7adbb22d7e74cf9a1bfa56a427446d030cbcfa6c145f98cfd"
    assert auth.authorize_upload(SECRET, SECRET, facts({"v2": mac}), 0).content_type == "application/octet-stream"
    with pytest.raises(HTTPError) as e:
        auth.authorize_upload(SECRET, SECRET, facts({"v2": mac}, ctype="image/png"), 0)
    assert e.value.status == 403
    tok = "99573aaa3c89e2a2be492bca77d9a5088fe4e9a9f2b7b54d44154ea4a071bf2f"
    assert auth.authorize_upload(SECRET, SECRET, facts({"token": tok}, ctype="text/plain"), 0).protocol == "token"


def test_highest_protocol_wins() -> None:
    good_v = "3c428543422e1df7c167ebb9f55ea60bd1506491baec382880dd84ce13fc7f77"
    with pytest.raises(HTTPError) as e:  # a bad v2 is not rescued by a good v
        auth.authorize_upload(SECRET, SECRET, facts({"v": good_v, "v2": "00"}), 0)
    assert e.value.status == 403


def test_v3_expiry_and_method_binding() -> None:
    q = {"v3": "da739ae98a62cc0fc16a1f0141a327e84eaef8874dba7678ea5b50e1eae576e9", "expires": "1700000000"}
    assert auth.authorize_upload(SECRET, SECRET, facts(q), 1699999999).protocol == "v3"
    with pytest.raises(HTTPError) as e:
        auth.authorize_upload(SECRET, SECRET, facts(q), 1700000001)
    assert e.value.status == 410
    with pytest.raises(HTTPError) as e:  # signed for PUT, used for DELETE
        auth.authorize_delete(SECRET, "", facts(q, method="DELETE"), 0)
    assert e.value.status == 403
    with pytest.raises(HTTPError) as e:  # no fallback: missing expires never verifies
        auth.authorize_upload(SECRET, SECRET, facts({"v3": q["v3"]}), 0)
    assert e.value.status == 403


def test_bad_mac_on_expired_v3_is_403_not_410() -> None:
    with pytest.raises(HTTPError) as e:
        auth.authorize_upload(SECRET, SECRET, facts({"v3": "ab" * 32, "expires": "1"}), 1700000000)
    assert e.value.status == 403


def test_no_signature_is_403() -> None:
    with pytest.raises(HTTPError) as e:
        auth.authorize_upload(SECRET, SECRET, facts({}), 0)
    assert e.value.status == 403


def test_rotation_previous_secret_verifies() -> None:
    mac = auth.mac_hex(b"old", auth.message_v("abc/file.txt", 5))
    assert auth.authorize_upload([b"new", b"old"], [], facts({"v": mac}), 0).protocol == "v"
    with pytest.raises(HTTPError):
        auth.authorize_upload([b"new"], [], facts({"v": mac}), 0)


def test_prosody_jwt_vector() -> None:
    claims = auth.jwt_decode(SECRET, PROSODY_JWT)
    assert claims["slot"] == SLOT and claims["filesize"] == 5 and claims["sub"] == "alice@example.org"
    grant = auth.authorize_upload(SECRET, SECRET, facts({}, path=f"{SLOT}/file.txt",
                                                        authorization="Bearer " + PROSODY_JWT), 1700000100)
    assert (grant.protocol, grant.size, grant.content_type, grant.file_expires, grant.uploader) == \
        ("jwt", 5, "text/plain", 1700086400, "alice@example.org")


def test_jwt_encode_roundtrip_matches_prosody_format() -> None:
    claims = auth.jwt_decode(SECRET, PROSODY_JWT)
    assert auth.jwt_encode(b"secret", claims) == PROSODY_JWT


@pytest.mark.parametrize("now, path, length, status", [
    (1700000301, f"{SLOT}/file.txt", 5, 410),         # exp passed
    (1700000100, "otherslot/file.txt", 5, 400),       # slot mismatch
    (1700000100, f"{SLOT}/other.txt", 5, 400),        # filename mismatch
    (1700000100, f"{SLOT}/file.txt", 6, 413),         # size mismatch
])
def test_jwt_refusals(now, path, length, status) -> None:
    with pytest.raises(HTTPError) as e:
        auth.authorize_upload(SECRET, SECRET, facts({}, path=path, length=length,
                                                    authorization="Bearer " + PROSODY_JWT), now)
    assert e.value.status == status


def test_jwt_wrong_key_alg_none_and_garbage_are_401_with_challenge() -> None:
    header, payload, _sig = PROSODY_JWT.split(".")
    none_header = auth._b64url(b'{"alg":"none","typ":"JWT"}')
    for token, keys in [(PROSODY_JWT, [b"wrong"]), (f"{none_header}.{payload}.", SECRET),
                        ("not-a-jwt", SECRET), (f"{header}.{payload}.!!!", SECRET)]:
        with pytest.raises(HTTPError) as e:
            auth.jwt_decode(keys, token)
        assert e.value.status == 401
        assert e.value.headers.get("WWW-Authenticate") == "Bearer"


@pytest.mark.parametrize("protocol", ["v", "v2", "token"])
def test_chunked_body_refused_before_the_mac_for_length_signing_protocols(protocol: str) -> None:
    # Their MAC binds the length: a chunked body could only be checked after it was written.
    for given in ("3c428543422e1df7c167ebb9f55ea60bd1506491baec382880dd84ce13fc7f77", "00"):
        with pytest.raises(HTTPError) as e:
            auth.authorize_upload(SECRET, SECRET, facts({protocol: given}, length=None), 0)
        assert e.value.status == 411


def test_jwt_grant_checks_the_final_size() -> None:
    grant = auth.UploadGrant("jwt", size=5)
    grant.check_final_size(5)
    with pytest.raises(HTTPError) as e:
        grant.check_final_size(4)
    assert e.value.status == 413


def test_delete_token_and_download_signature() -> None:
    token = auth.mac_hex(b"secret", auth.message_delete_token("abc/file.txt", "del"))
    assert auth.authorize_delete(SECRET, "del", facts({"token": token}, method="DELETE"), 0) == "token"
    with pytest.raises(HTTPError):
        auth.authorize_delete(SECRET, "", facts({"token": token}, method="DELETE"), 0)  # no deletesecret
    q = auth.sign_query("v3", b"secret", method="GET", signed_path="abc/file.txt",
                        full_path="/upload/abc/file.txt", expires=2000000000)
    auth.authorize_download(SECRET, facts(q, method="HEAD"), 0)  # HEAD accepts a GET signature
    with pytest.raises(HTTPError):
        auth.authorize_download(SECRET, facts({}, method="GET"), 0)


def test_verify_mac_uses_constant_time_compare(monkeypatch) -> None:
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    auth.verify_mac([b"a", b"b"], b"m", "00")
    assert len(calls) == 2  # every key compared, no early exit


def test_jwt_signature_has_one_spelling() -> None:
    """base64url leaves two bits of the last character unused; a token with them set is refused
    (otherwise one signature would verify under several token strings)."""
    header, payload, sig = PROSODY_JWT.split(".")
    assert auth.jwt_decode(SECRET, PROSODY_JWT)["slot"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = sig[:-1] + alphabet[alphabet.index(sig[-1]) ^ 1]
    with pytest.raises(HTTPError) as e:
        auth.jwt_decode(SECRET, f"{header}.{payload}.{twin}")
    assert e.value.status == 401
