"""A real S3-compatible server on 127.0.0.1 for the object-storage tests: moto in server mode.

`s3_server` (session) starts `moto_server` as a subprocess on a free port, creates an IAM user with
an access key allowed everything, then switches the server's authentication on, so a wrong secret
is refused as by AWS (moto accepts any key until then). The process is stopped by its pid at the
end of the session.

`s3_env` (module) points the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION) at the server for the tests of one module and restores them
afterwards. Start Ray inside its scope: Ray workers inherit the driver's environment at `ray.init`.
`s3_bucket` creates a fresh bucket and returns its name.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from cluster import free_port

REGION = "us-east-1"
ALLOW_ALL = json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]})


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    region: str = REGION

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name=self.region)


def _wait_until_up(endpoint: str, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with status {process.returncode}")
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"moto_server did not answer at {endpoint} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install -e '.[test]')")
    import boto3

    moto_server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    endpoint = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path_factory.mktemp("moto") / "moto_server.log").open("w")
    # Started in its own session so that stopping it never signals the test process's group.
    process = subprocess.Popen([moto_server, "-H", "127.0.0.1", "-p", endpoint.rsplit(":", 1)[1]],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(endpoint, process)
        iam = boto3.client("iam", endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup",
                           region_name=REGION)
        iam.create_user(UserName="limpq-test")
        iam.put_user_policy(UserName="limpq-test", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="limpq-test")["AccessKey"]
        # From now on every request must be signed with a known key (0 unauthenticated requests left).
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"})).close()
        yield S3Server(endpoint, key["AccessKeyId"], key["SecretAccessKey"])
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def s3_env(s3_server: S3Server) -> Iterator[S3Server]:
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
            patch.delenv(name, raising=False)
        for name, value in s3_server.env().items():
            patch.setenv(name, value)
        yield s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    name = f"limpq-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return name
