"""Local folders and `s3://bucket/prefix` behind a few functions, with bounded retries and clear errors.

The S3 endpoint comes from `S3_ENDPOINT_URL` (any S3-compatible store; unset: AWS), credentials from boto3's
standard chain (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`, ...). They are
never written anywhere: errors name the object and the endpoint (with any user-info stripped), never a key.

Every request is retried `RetryPolicy.attempts` times with a capped exponential backoff (0.5, 1, 2, 4, 4, ... s,
plus jitter), so a store that is down for a few seconds (a restart) is ridden out; a missing object or denied
credentials are retried once only. After the last attempt a `DataStorageError` names the object, the endpoint,
the attempts and the time spent.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple, TypeVar

from calm_megatron.data.errors import DataNotFoundError, DataStorageError

SUPPORTED_SCHEMES = ("s3",)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one storage request."""
    attempts: int = 8
    first_backoff_s: float = 0.5
    max_backoff_s: float = 4.0
    timeout_s: float = 60.0  # per request: connect (at most 10 s) and read timeout

    def backoff(self, attempt: int) -> float:
        return min(self.first_backoff_s * 2 ** attempt, self.max_backoff_s) + random.random() * 0.25


# ---------------------------------------------------------------- paths

def is_remote(path) -> bool:
    """True for `scheme://...` paths (only s3:// is supported), False for local paths."""
    return "://" in str(path)


def check_supported(path) -> None:
    if is_remote(path) and urllib.parse.urlparse(str(path)).scheme not in SUPPORTED_SCHEMES:
        raise ValueError(f"{path}: unsupported storage scheme (use a local folder or s3://bucket/prefix)")


def join(base: str, name: str) -> str:
    """`base/name` for a local folder or a remote prefix."""
    base = str(base)
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else os.path.join(base, name)


def split_s3(url: str) -> Tuple[str, str]:
    """(bucket, key) of `s3://bucket/key`."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{url}: not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def redact_url(url: str) -> str:
    """`url` without any user:password@ part."""
    parsed = urllib.parse.urlparse(url)
    if parsed.username is None and parsed.password is None:
        return url
    host = parsed.hostname or ""
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return urllib.parse.urlunparse(parsed._replace(netloc=netloc))


def endpoint() -> str:
    """The S3 endpoint in use, for messages (credentials stripped)."""
    url = os.environ.get("S3_ENDPOINT_URL")
    return redact_url(url) if url else "the default AWS S3 endpoint (S3_ENDPOINT_URL is not set)"


def describe(path: str) -> str:
    """`path`, plus the endpoint when it is remote."""
    return f"{path} (endpoint {endpoint()})" if is_remote(path) else str(path)


# ---------------------------------------------------------------- the client and error classes

_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                    "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_DEFAULT_REGION")
_clients: dict = {}
_clients_lock = threading.Lock()


def s3_client(timeout_s: float = 60.0):
    """A boto3 S3 client for this process (clients are thread-safe; a forked child makes its own).

    botocore's own retries are off: `_retrying` owns the policy, so the time to an error is bounded."""
    # Keyed by a digest of the credential variables (a changed key gets a new client; the key itself is not kept).
    creds = hashlib.sha256("\0".join(os.environ.get(v, "") for v in _CREDENTIAL_VARS).encode()).hexdigest()
    key = (os.getpid(), os.environ.get("S3_ENDPOINT_URL"), creds, float(timeout_s))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=min(float(timeout_s), 10.0), read_timeout=float(timeout_s),
                            retries={"max_attempts": 1, "mode": "standard"})
            client = boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
                                                    config=config)
            _clients[key] = client
        return client


_MISSING_CODES = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "InvalidToken", "ExpiredToken", "AccountProblem"}


def _classify(err: BaseException) -> str:
    """'missing', 'denied', 'transient' (retry), 'fatal' (a storage error not worth retrying), or 'bug' (not a
    storage error at all: re-raised unchanged)."""
    try:
        from botocore import exceptions as bx
    except ImportError:  # pragma: no cover - boto3 comes with mosaicml-streaming
        bx = None
    if isinstance(err, FileNotFoundError):
        return "missing"
    if bx is not None:
        if isinstance(err, bx.ClientError):
            error = err.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _MISSING_CODES or status == 404:
                return "missing"
            if code in _DENIED_CODES or status == 403:
                return "denied"
            if status >= 500 or status in (408, 429) or code in ("SlowDown", "RequestTimeout", "InternalError",
                                                                  "ServiceUnavailable", "Throttling"):
                return "transient"
            return "fatal"
        if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
            return "denied"
        if isinstance(err, bx.BotoCoreError):
            return "transient"
    if isinstance(err, (OSError, ConnectionError, TimeoutError)):
        return "transient"
    return "bug"


_USERINFO = re.compile(r"(\w+://)[^/@\s\"']+@")


def _short(err: BaseException) -> str:
    """One line naming the error, with any user:password@ of a URL in it removed."""
    text = _USERINFO.sub(r"\1", " ".join(str(err).split()))
    return f"{type(err).__name__}: {text[:400]}"


def _retrying(what: str, fn: Callable[[], T], policy: RetryPolicy, remote: bool = True,
              cancel: Optional[threading.Event] = None) -> T:
    """fn() with the retry policy; a `DataStorageError` naming `what` and the endpoint when it keeps failing.
    Setting `cancel` ends the retries at the next attempt (the loader gave up waiting)."""
    start = time.monotonic()
    where = f" at endpoint {endpoint()}" if remote else ""
    attempts = max(1, policy.attempts)
    last = ""
    for attempt in range(attempts):
        if cancel is not None and cancel.is_set() and attempt:
            raise DataStorageError(f"{what}: abandoned after {attempt} failed attempt(s) over "
                                   f"{time.monotonic() - start:.1f} s{where} (the loader timed out); "
                                   f"last error: {last}")
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below, re-raised as DataStorageError
            kind, last = _classify(err), _short(err)
            if kind == "bug":
                raise
            final = attempt + 1 >= attempts or kind == "fatal" or (kind in ("missing", "denied") and attempt >= 1)
            if not final:
                if cancel is not None:
                    cancel.wait(policy.backoff(attempt))
                else:
                    time.sleep(policy.backoff(attempt))
                continue
            elapsed = time.monotonic() - start
            if kind == "missing":
                raise DataNotFoundError(f"{what}: not found{where} ({_short(err)})") from None
            if kind == "denied":
                raise DataStorageError(
                    f"{what}: access denied{where}; check the AWS credentials in the environment "
                    f"(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) ({_short(err)})", resumable=False) from None
            raise DataStorageError(f"{what}: failed after {attempt + 1} attempt(s) over {elapsed:.1f} s{where}: "
                                   f"{_short(err)}", resumable=kind == "transient") from None
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- operations (local or s3)

def read_bytes(path: str, policy: RetryPolicy = RetryPolicy()) -> bytes:
    """The whole content of a local file or an s3:// object."""
    if not is_remote(path):
        return _retrying(f"reading {path}", lambda: Path(path).read_bytes(), policy, remote=False)
    check_supported(path)
    bucket, key = split_s3(path)

    def get() -> bytes:
        return s3_client(policy.timeout_s).get_object(Bucket=bucket, Key=key)["Body"].read()

    return _retrying(f"reading {path}", get, policy)


def exists(path: str, policy: RetryPolicy = RetryPolicy()) -> bool:
    """Whether a local file/folder or an s3:// object exists."""
    if not is_remote(path):
        return Path(path).exists()
    try:
        bucket, key = split_s3(path)
        _retrying(f"checking {path}", lambda: s3_client(policy.timeout_s).head_object(Bucket=bucket, Key=key),
                  policy)
        return True
    except DataNotFoundError:
        return False


def download(path: str, local: str, policy: RetryPolicy = RetryPolicy(),
             cancel: Optional[threading.Event] = None) -> None:
    """Copy a local file or an s3:// object to `local`, atomically (a temporary name, then a rename)."""
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    tmp = f"{local}.{os.getpid()}.{threading.get_ident()}.tmp"

    def fetch() -> None:
        try:
            if is_remote(path):
                bucket, key = split_s3(path)
                body = s3_client(policy.timeout_s).get_object(Bucket=bucket, Key=key)["Body"]
                with open(tmp, "wb") as out:
                    for block in iter(lambda: body.read(1 << 22), b""):
                        out.write(block)
            else:
                shutil.copyfile(path, tmp)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    if is_remote(path):
        check_supported(path)
    _retrying(f"downloading {path}", fetch, policy, remote=is_remote(path), cancel=cancel)


def write_bytes(path: str, data: bytes, policy: RetryPolicy = RetryPolicy()) -> None:
    """Write `data` to a local file or an s3:// object."""
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return
    bucket, key = split_s3(path)
    _retrying(f"writing {path}", lambda: s3_client(policy.timeout_s).put_object(Bucket=bucket, Key=key, Body=data),
              policy)


def upload_file(local: str, path: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """Copy the local file `local` to an s3:// object or a local path."""
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, path)
        return
    bucket, key = split_s3(path)

    def put() -> None:  # one PUT per file (shards are far below S3's 5 GB single-PUT limit)
        with open(local, "rb") as body:
            s3_client(policy.timeout_s).put_object(Bucket=bucket, Key=key, Body=body)

    _retrying(f"uploading {path}", put, policy)


def list_objects(prefix: str, policy: RetryPolicy = RetryPolicy()) -> List[str]:
    """Keys (full s3:// URLs) under the s3:// `prefix` folder."""
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""

    def listing() -> List[str]:
        names: List[str] = []
        for page in s3_client(policy.timeout_s).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
            names += [f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", [])]
        return names

    return _retrying(f"listing {prefix}", listing, policy)


def delete_objects(urls: List[str], policy: RetryPolicy = RetryPolicy()) -> None:
    """Delete s3:// objects (in batches of 1000)."""
    by_bucket: dict = {}
    for url in urls:
        bucket, key = split_s3(url)
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            _retrying(f"deleting {len(batch)} objects in s3://{bucket}",
                      lambda: s3_client(policy.timeout_s).delete_objects(Bucket=bucket, Delete={"Objects": batch}),
                      policy)


def check_bucket(prefix: str, policy: RetryPolicy = RetryPolicy()) -> None:
    """DataStorageError naming the bucket and the endpoint when it does not exist or cannot be reached."""
    bucket, _ = split_s3(prefix)
    try:
        _retrying(f"bucket s3://{bucket}", lambda: s3_client(policy.timeout_s).head_bucket(Bucket=bucket), policy)
    except DataNotFoundError:
        raise DataNotFoundError(f"bucket s3://{bucket} does not exist at endpoint {endpoint()} (create it "
                                "first)") from None
