"""Object-storage locations (``s3://``, ``gs://``, ...): URL parsing, clear errors, small file transfers.

mosaicml-streaming streams the shards themselves; this module covers what happens around it:

- ``RemoteDir(url)``: list / read / upload / download / delete files under a remote "directory"
  (used by ``af-prepare --out s3://...`` and to read ``manifest.json``);
- every S3 call goes through one boto3 client with a bounded connect/read timeout and a bounded
  number of attempts, so a wrong endpoint fails in seconds, not minutes;
- failures become :class:`RemoteError` messages that say which bucket, prefix or endpoint is wrong
  and how to fix it (missing credentials, rejected credentials, no such bucket, nothing under the
  prefix, unreachable endpoint).

Credentials and endpoint come from the standard AWS chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws/``, instance roles)
plus ``S3_ENDPOINT_URL`` for S3-compatible stores (MinIO, Ceph, R2), the variable streaming reads.
Nothing here logs or returns a secret: messages name the credential *source* only.

Other schemes (``gs://``, ``oci://``, ``azure://``, ...) go through streaming's own uploaders and
downloaders (same credentials as streaming); only S3 gets the detailed diagnosis.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

S3_SCHEMES = ("s3",)
ENDPOINT_VARIABLE = "S3_ENDPOINT_URL"


class RemoteError(RuntimeError):
    """An object-storage location that cannot be used as asked; the message says how to fix it."""


def is_remote(path: str | os.PathLike) -> bool:
    """``s3://bucket/x``, ``gs://…`` are remote; plain paths (and ``C:\\`` drive letters) are local."""
    scheme = urllib.parse.urlparse(str(path)).scheme
    return "://" in str(path) and len(scheme) > 1


def split_url(url: str) -> tuple[str, str, str]:
    """``s3://bucket/a/b/`` -> ``('s3', 'bucket', 'a/b')``."""
    parsed = urllib.parse.urlparse(url)
    if not parsed.scheme or not parsed.netloc:
        raise RemoteError(f"'{url}' is not a remote URL like s3://bucket/prefix")
    return parsed.scheme, parsed.netloc, parsed.path.strip("/")


def join(url: str, *parts: str) -> str:
    """Join URL path parts with single slashes (``join('s3://b/x/', 'train')`` -> ``s3://b/x/train``)."""
    out = url.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def endpoint_url() -> str | None:
    """The custom S3 endpoint (``S3_ENDPOINT_URL``), or None for AWS itself."""
    return os.environ.get(ENDPOINT_VARIABLE) or None


def _credential_source() -> str | None:
    """Where boto3 finds credentials ('env', 'shared-credentials-file', 'iam-role', ...) or None."""
    import boto3

    credentials = boto3.session.Session().get_credentials()
    return None if credentials is None else getattr(credentials, "method", "configured")


def s3_client(timeout: float = 60.0, retries: int = 2, *, unsigned: bool = False) -> Any:
    """A boto3 S3 client with bounded timeouts: ``retries`` retries after the first attempt.

    The connect timeout is capped at 10 s: an endpoint that does not accept a connection in that
    time is not going to stream shards either.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    config = Config(connect_timeout=min(float(timeout), 10.0), read_timeout=float(timeout),
                    retries={"max_attempts": max(0, int(retries)) + 1, "mode": "standard"},
                    **({"signature_version": UNSIGNED} if unsigned else {}))
    return boto3.session.Session().client("s3", config=config, endpoint_url=endpoint_url())


def _where(client: Any) -> str:
    url = client.meta.endpoint_url
    return f"endpoint {url}" + ("" if endpoint_url() else f" (set {ENDPOINT_VARIABLE} for MinIO/Ceph/other stores)")


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class RemoteDir:
    """Files below one remote prefix, addressed by relative paths (``part-000000/chunk.json``)."""

    def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 2) -> None:
        self.url = url.rstrip("/")
        self.scheme, self.bucket, self.prefix = split_url(self.url)
        self.timeout, self.retries = timeout, retries
        self._client: Any = None
        self._uploader: Any = None

    def __repr__(self) -> str:
        return f"RemoteDir({self.url!r})"

    @property
    def is_s3(self) -> bool:
        return self.scheme in S3_SCHEMES

    def _key(self, rel: str = "") -> str:
        return "/".join(p for p in (self.prefix, rel.strip("/")) if p)

    # -- S3 plumbing ---------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client(self.timeout, self.retries)
            if _credential_source() is None:
                # Public buckets work without credentials (as in streaming); the errors below say
                # "no credentials" when a request is then refused.
                self._client = s3_client(self.timeout, self.retries, unsigned=True)
        return self._client

    def _translate(self, exc: BaseException, action: str, rel: str = "") -> RemoteError:
        """A botocore exception -> a RemoteError that names the bucket/prefix/endpoint and the fix."""
        from botocore import exceptions as bx

        target = join(self.url, rel)
        client = self._client
        where = _where(client) if client is not None else f"endpoint {endpoint_url() or 'AWS S3'}"
        if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError,
                            bx.ConnectionClosedError)):
            return RemoteError(
                f"cannot reach the S3 {where} to {action} '{target}' ({self.retries + 1} attempts, "
                f"timeout {self.timeout:g} s): {exc}. Check {ENDPOINT_VARIABLE} and that the store is up and "
                "reachable from this node")
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return RemoteError(f"no usable AWS credentials to {action} '{target}': {exc}. " + _CREDENTIALS_HELP)
        code = _error_code(exc)
        if code in ("NoSuchBucket",):
            return RemoteError(f"bucket '{self.bucket}' does not exist at the S3 {where} (while trying to "
                               f"{action} '{target}'); check the bucket name in the URL and {ENDPOINT_VARIABLE}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return RemoteError(f"the S3 {where} rejected the credentials from '{_credential_source()}' ({code}) "
                               f"while trying to {action} '{target}'. " + _CREDENTIALS_HELP)
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            source = _credential_source()
            if source is None:
                return RemoteError(f"access denied to '{target}' and no AWS credentials are configured "
                                   "(the anonymous request was refused: the bucket is not public). "
                                   + _CREDENTIALS_HELP)
            return RemoteError(f"access denied to '{target}' with the credentials from '{source}' ({code}); "
                               "grant them s3:GetObject/s3:ListBucket (and s3:PutObject to write) on the bucket")
        return RemoteError(f"could not {action} '{target}' at the S3 {where}: {type(exc).__name__}: {exc}")

    def _s3_call(self, action: str, rel: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self._translate(exc, action, rel) from exc

    # -- checks ----------------------------------------------------------------------------------
    def check_bucket(self) -> None:
        """Raise a RemoteError unless the bucket exists and these credentials can reach it."""
        if not self.is_s3:
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchBucket", "NotFound"):
                raise RemoteError(
                    f"bucket '{self.bucket}' does not exist at the S3 {_where(self.client)}; check the bucket name "
                    f"in '{self.url}' (create it first to write there)") from exc
            raise self._translate(exc, "access", "") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "access", "") from exc

    def missing_file_error(self, rel: str) -> RemoteError:
        """Why ``rel`` is not there: no bucket, nothing under the prefix (with neighbours), or just this file."""
        target = join(self.url, rel)
        self.check_bucket()
        if not self.is_s3:
            return RemoteError(f"'{target}' does not exist")
        if not self.list():
            parent_key, _, _ = self.prefix.rpartition("/")
            parent_prefix = f"{parent_key}/" if parent_key else ""
            listing = self._s3_call("list", "", self.client.list_objects_v2, Bucket=self.bucket,
                                    Prefix=parent_prefix, Delimiter="/", MaxKeys=50)
            near = sorted(p["Prefix"][len(parent_prefix):] for p in listing.get("CommonPrefixes", []))
            hint = (f"; prefixes there: {', '.join(near[:12])}" if near
                    else f"; s3://{self.bucket}/{parent_prefix} is empty too")
            return RemoteError(f"nothing is stored under '{self.url}' (wrong prefix?){hint}")
        return RemoteError(f"'{target}' does not exist (other files are under '{self.url}': "
                           "an unfinished upload or preparation?)")

    # -- file operations -------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        if not self.is_s3:
            return rel.strip("/") in set(self.list(rel))
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._translate(exc, "read", rel) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "read", rel) from exc

    def list(self, rel_prefix: str = "") -> list[str]:
        """Relative paths of all files whose path starts with ``rel_prefix`` (recursive, sorted)."""
        base = self._key()
        base = f"{base}/" if base else ""
        if not self.is_s3:
            keys = self._streaming_uploader().list_objects(rel_prefix) or []
            return sorted(k[len(base):] for k in keys if k.startswith(base))
        paginator = self.client.get_paginator("list_objects_v2")
        keys: list[str] = []

        def collect() -> None:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base + rel_prefix.lstrip("/")):
                keys.extend(obj["Key"][len(base):] for obj in page.get("Contents", []))

        self._s3_call("list", rel_prefix, collect)
        return sorted(keys)

    def read_bytes(self, rel: str) -> bytes:
        """The content of one file; a missing file raises a RemoteError that says why it is missing."""
        if not self.is_s3:
            with tempfile.TemporaryDirectory(prefix="af_remote_") as tmp:
                local = os.path.join(tmp, "file")
                self.download(rel, local)
                return Path(local).read_bytes()
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(rel))
            return response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise self.missing_file_error(rel) from None
            raise self._translate(exc, "read", rel) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, "read", rel) from exc

    def download(self, rel: str, local: str | os.PathLike) -> None:
        """Copy one file to ``local`` (written to a temporary name first, then renamed)."""
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
        try:
            if self.is_s3:
                tmp.write_bytes(self.read_bytes(rel))
            else:
                from streaming.base.storage.download import CloudDownloader

                try:
                    CloudDownloader.direct_download(join(self.url, rel), str(tmp), self.timeout)
                except Exception as exc:  # provider-specific errors
                    raise RemoteError(f"could not download '{join(self.url, rel)}': {exc}") from exc
            tmp.replace(local)
        finally:
            tmp.unlink(missing_ok=True)

    def upload(self, local: str | os.PathLike, rel: str) -> None:
        """Copy a local file to ``rel`` (an object store makes the new object visible atomically)."""
        if self.is_s3:
            self._s3_call("write", rel, self.client.upload_file, str(local), self.bucket, self._key(rel))
            return
        # streaming's uploaders take paths relative to their local root
        staging = Path(tempfile.mkdtemp(prefix="af_upload_"))
        try:
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, target)
            from streaming.base.storage.upload import CloudUploader

            uploader = CloudUploader.get(out=(str(staging), self.url), keep_local=True, exist_ok=True,
                                         retry=self.retries + 1)
            try:
                uploader.upload_file(rel)
            except Exception as exc:  # provider-specific errors
                raise RemoteError(f"could not upload to '{join(self.url, rel)}': {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def delete_tree(self, rel_prefix: str = "", keep: Callable[[str], bool] | None = None) -> int:
        """Delete every file under ``rel_prefix`` except those ``keep`` (given the relative path) keeps (S3
        only); returns how many were deleted."""
        if not self.is_s3:
            raise RemoteError(f"deleting under '{join(self.url, rel_prefix)}' is only supported for s3:// here; "
                              "delete it with your provider's tools and rerun")
        names = [n for n in self.list(rel_prefix) if keep is None or not keep(n)]
        for start in range(0, len(names), 1000):
            objects = [{"Key": self._key(n)} for n in names[start:start + 1000]]
            self._s3_call("delete", rel_prefix, self.client.delete_objects, Bucket=self.bucket,
                          Delete={"Objects": objects, "Quiet": True})
        return len(names)

    def _streaming_uploader(self) -> Any:
        if self._uploader is None:
            from streaming.base.storage.upload import CloudUploader

            try:
                self._uploader = CloudUploader.get(out=(tempfile.mkdtemp(prefix="af_list_"), self.url),
                                                   keep_local=True, exist_ok=True)
            except Exception as exc:  # provider-specific errors
                raise RemoteError(f"cannot access '{self.url}': {exc}") from exc
        return self._uploader


_CREDENTIALS_HELP = (
    "Provide credentials the standard AWS way: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and "
    "AWS_SESSION_TOKEN) in the environment of every node, or AWS_PROFILE with ~/.aws/credentials, or an "
    f"instance role; for MinIO/Ceph also {ENDPOINT_VARIABLE}=http(s)://host:port"
)

