"""A real S3 API server for tests: ``moto_server`` with signature checking on.

moto checks SigV4 signatures against IAM users it knows. The server is started with
``INITIAL_NO_AUTH_ACTION_COUNT`` equal to the number of setup calls (create a user, give it an
s3:* policy, create its access key); every request after those must be correctly signed with that
key. ``put_object`` uploads test objects with botocore's own client.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import botocore.session
from botocore.config import Config

from tests.harness.servers.base import ProcessServer, free_port, port_open, wait_until

REGION = "us-east-1"
SETUP_CALLS = 3


class MotoS3Server:
    """moto S3 on 127.0.0.1; ``access_key_id``/``secret`` are the only keys it accepts."""

    def __init__(self, root: Path) -> None:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_CALLS),
                   AWS_ACCESS_KEY_ID="setup", AWS_SECRET_ACCESS_KEY="setup")
        self.process = ProcessServer([exe, "-H", "127.0.0.1", "-p", str(self.port)], root / "moto.log",
                                     env=env)
        try:
            wait_until(lambda: port_open(self.port), timeout=30, what="moto_server")
            self.access_key_id, self.secret = self._make_user()
        except Exception:
            self.stop()
            raise
        self._s3 = self._client("s3", self.access_key_id, self.secret)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _client(self, service: str, key: str, secret: str) -> Any:
        session = botocore.session.get_session()
        return session.create_client(
            service, region_name=REGION, endpoint_url=f"http://{self.endpoint}",
            aws_access_key_id=key, aws_secret_access_key=secret,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))

    def _make_user(self) -> tuple[str, str]:
        iam = self._client("iam", "setup", "setup")
        iam.create_user(UserName="nydus")
        policy = {"Version": "2012-10-17",
                  "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        iam.put_user_policy(UserName="nydus", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="nydus")["AccessKey"]
        iam.close()
        return key["AccessKeyId"], key["SecretAccessKey"]

    def create_bucket(self, bucket: str) -> None:
        self._s3.create_bucket(Bucket=bucket)

    def put_object(self, bucket: str, key: str, data: bytes) -> None:
        self._s3.put_object(Bucket=bucket, Key=key, Body=data)

    def backend_config(self, bucket: str, prefix: str = "", **overrides: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {"scheme": "http", "endpoint": self.endpoint, "region": REGION,
                               "bucket_name": bucket, "object_prefix": prefix,
                               "access_key_id": self.access_key_id, "access_key_secret": self.secret,
                               "retry_limit": 2}
        cfg.update(overrides)
        return cfg

    def stop(self) -> None:
        client = getattr(self, "_s3", None)
        if client is not None:
            client.close()
        self.process.stop()
