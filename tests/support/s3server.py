"""moto's S3 server on loopback with request authentication on, for the S3 client tests.

Strategy: moto's server mode checks no signatures unless `INITIAL_NO_AUTH_ACTION_COUNT` is set;
then the first N actions are free and every later one must be signed by a known IAM access
key. The free actions are spent on IAM CreateUser, PutUserPolicy (`s3:*`) and CreateAccessKey
(boto3, test-only), then `POST /moto-api/reset-auth` with body `0` makes every further request
need a valid signature. The bucket is created with that key through boto3, so the signer under
test is not trusted to set up its own test. moto runs in its own process group in a temp dir,
bound to 127.0.0.1 on a free port; start and stop have bounded waits. `auth=False` starts one
that checks nothing, for what moto cannot do with auth on (below).

moto 5.2 quirks (../shared/docs/testing-notes.md): keys with `+ % = &` or non-ASCII and list
prefixes with `/` are refused even when correctly signed, so tests against moto avoid them
(botocore comparisons in tests/unit/test_sigv4.py cover those keys). With auth on, moto 5.2
answers 500 to every presigned URL, boto3's included (it reads the Authorization header that a
query-signed request does not have: KeyError 'HTTP_AUTHORIZATION'); it never checks query
signatures at all, so presigned URLs are fetched from an `auth=False` server and their
signatures compared with botocore's.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

FREE_ACTIONS = 3
USER = "hmacfs-test"
POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _moto_command(port: int) -> list[str]:
    program = Path(sys.executable).with_name("moto_server")
    if program.exists():
        return [str(program), "-H", "127.0.0.1", "-p", str(port)]
    return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]


class MotoS3:
    """A running moto server: `endpoint`, `bucket`, `access_key`, `secret_key`, `region`."""

    region = "us-east-1"

    def __init__(self, workdir: Path, bucket: str = "hmacfs-test", auth: bool = True) -> None:
        self.workdir = Path(workdir)
        self.auth = auth
        self.bucket = bucket
        self.port = 0
        self.endpoint = ""
        self.access_key = ""
        self.secret_key = ""
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 20.0) -> MotoS3:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HOME": str(self.workdir),
               "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "none"), "AWS_CONFIG_FILE": str(self.workdir / "none")}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            env.pop(name, None)
        if self.auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(FREE_ACTIONS)
        log = open(self.workdir / "moto.log", "wb")  # noqa: SIM115 - owned by the child process
        self.proc = subprocess.Popen(_moto_command(self.port), cwd=self.workdir, env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {(self.workdir / 'moto.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("moto_server did not listen within the start timeout") from None
                time.sleep(0.1)
        try:
            self._set_up_auth()
        except BaseException:
            self.stop()
            raise
        return self

    def boto3_client(self, service: str, access_key: str = "", secret_key: str = ""):
        import boto3  # test-only dependency
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.region,
                            aws_access_key_id=access_key or "AKIAFREEACTIONS00000",
                            aws_secret_access_key=secret_key or "free-actions-secret",
                            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                          request_checksum_calculation="when_required",
                                          response_checksum_validation="when_required"))

    def _set_up_auth(self) -> None:
        if not self.auth:  # moto checks nothing: any key will do
            self.access_key, self.secret_key = "AKIAUNCHECKED0000000", "unchecked-secret"
            self.s3().create_bucket(Bucket=self.bucket)
            return
        iam = self.boto3_client("iam")
        iam.create_user(UserName=USER)
        iam.put_user_policy(UserName=USER, PolicyName="s3-all", PolicyDocument=json.dumps(POLICY))
        key = iam.create_access_key(UserName=USER)["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        request = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        self.s3().create_bucket(Bucket=self.bucket)

    def s3(self):
        """A boto3 S3 client signed with the test user's key (path-style)."""
        return self.boto3_client("s3", self.access_key, self.secret_key)

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=timeout)

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
