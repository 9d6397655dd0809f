"""A real S3-compatible server for tests: moto in server mode on 127.0.0.1 (no traffic leaves the host).

``s3_server()`` is a context manager that starts it, points the AWS environment (read by pyarrow, Ray
and boto3) at it with dummy credentials, creates a bucket and yields ``s3://<bucket>``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from tests.optional import require

BUCKET = "tally-test"
ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
       "AWS_EC2_METADATA_DISABLED")


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    server_mod = require("moto.server", "moto[server] (the dev extra) is not installed")
    boto3 = require("boto3", "boto3 (the dev extra) is not installed")
    from tally.results import storage

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    old = {k: os.environ.get(k) for k in ENV}
    try:
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                          AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                          AWS_EC2_METADATA_DISABLED="true")  # never ask a cloud metadata endpoint
        storage._filesystem_of.cache_clear()  # a filesystem made for another endpoint must not be reused
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
        storage._filesystem_of.cache_clear()
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
