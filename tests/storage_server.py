"""An S3-compatible store on 127.0.0.1 for tests (moto's server), and helpers to look inside it."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class Store:
    endpoint: str
    bucket: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])

    def keys(self, prefix: str = "") -> list[str]:
        """Every object key under ``prefix`` (bucket-relative)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(item["Key"] for page in pages for item in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint).get_object(Bucket=self.bucket, Key=key)["Body"].read()


STORE_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def loopback_store(bucket: str = "runs") -> Iterator[Store]:
    """Start moto's S3 server on a free loopback port, point AWS_ENDPOINT_URL at it, create a bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in [*STORE_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(STORE_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield Store(endpoint, bucket)
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
