"""Object storage: reading inputs from local paths or s3:// URIs, and checking the remote.

S3 clients are built here, at the edge, from StorageParams (endpoint, region);
credentials come from the standard AWS sources, never from the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmops.core.config import StorageParams
from llmops.core.errors import LlmopsError


class StorageError(LlmopsError):
    """Storage that cannot be used: the message says which and why."""


def s3_client(storage: StorageParams):
    """A boto3 S3 client for this storage, failing fast when the endpoint is down."""
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2, "mode": "standard"})
    return boto3.client("s3", endpoint_url=storage.endpoint_url, region_name=storage.region, config=config)


def explain(exc: Exception, what: str, storage: StorageParams) -> StorageError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    endpoint = storage.endpoint_url or "AWS S3"
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{what}: cannot reach the S3 endpoint {endpoint}")
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{what}: no AWS credentials found (environment, ~/.aws or instance role)")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            return StorageError(f"{what}: bucket does not exist at {endpoint}")
        if code in ("NoSuchKey",):
            return StorageError(f"{what}: no such object")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{what}: access denied ({code}); check the AWS credentials")
        return StorageError(f"{what}: S3 error {code}: {exc}")
    return StorageError(f"{what}: {type(exc).__name__}: {exc}")


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise StorageError(f"{uri}: expected s3://bucket/key")
    return bucket, key


def read_bytes(uri: str, storage: StorageParams) -> bytes:
    """The bytes of a local file or an s3:// object.

    Raises:
        StorageError: the file or object is missing or the store unreachable; the message names it.
    """
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        try:
            return s3_client(storage).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise explain(exc, uri, storage) from None
    path = Path(os.path.expanduser(uri))
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None
    except IsADirectoryError:
        raise StorageError(f"{uri}: is a directory, expected a file") from None


def check_remote(storage: StorageParams) -> None:
    """Make sure the DVC remote can be written before anything is pushed to it.

    Raises:
        StorageError: endpoint unreachable, bucket missing, credentials refused.
    """
    if storage.remote == "local":
        path = Path(os.path.expanduser(storage.local_dir))
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"storage.local_dir {storage.local_dir}: cannot create: {exc.strerror}") from None
        if not os.access(path, os.W_OK):
            raise StorageError(f"storage.local_dir {storage.local_dir}: not writable")
        return
    try:
        s3_client(storage).head_bucket(Bucket=storage.bucket)
    except Exception as exc:
        raise explain(exc, f"s3://{storage.bucket}", storage) from None
