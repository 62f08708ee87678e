"""A store in an S3 bucket (AWS S3, MinIO, Ceph, R2, ...) through boto3.

Configuration is the AWS way and nothing else: boto3's credential chain, and
AWS_ENDPOINT_URL(_S3) for an S3-compatible store. No credential is ever passed in,
stored or printed: an endpoint's `user:password@` is dropped before boto3 uses it (S3
signs with the access key; the userinfo would only reach errors and presigned links).

Uploads carry SHA-256 checksums that S3 verifies on arrival; a multipart upload's
composite checksum is then compared with one computed from the bytes hashed for the
manifest.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import time
import traceback
from email.utils import parsedate_to_datetime
from pathlib import Path

import boto3
import botocore.session
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnectionError, HTTPClientError,
                                 NoCredentialsError, PartialCredentialsError)
from s3transfer.utils import ChunksizeAdjuster

from store.base import (MAX_DOCUMENT_BYTES, PreconditionFailed, Store, StoreError, StoreUnavailable, StoreUnreachable,
                        TooLarge, check_size, join_key, parse_uri, read_at_most, too_big)
from store.files import publishing
from store.scrub import scrub, without_userinfo

log = logging.getLogger(__name__)

MiB = 1 << 20
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60
DEFAULT_MAX_ATTEMPTS = 5
MULTIPART_THRESHOLD = 16 * MiB
MULTIPART_CHUNKSIZE = 16 * MiB  # S3's smallest part is 5 MiB
MAX_CONCURRENCY = 8
MAX_LINK_EXPIRY_S = 7 * 24 * 3600  # the longest a SigV4 presigned URL may live

# permanent errors: never retried
_HINTS = {
    "NoSuchBucket": "the bucket does not exist: create it (aws s3 mb s3://{bucket}) or fix --store",
    "AccessDenied": "the credentials in use may not do this on bucket {bucket!r}: grant them s3:ListBucket, "
                    "s3:GetObject and s3:PutObject on it, or use other credentials (AWS_PROFILE, ...)",
    "AllAccessDisabled": "all access to bucket {bucket!r} is disabled: ask its owner",
    "InvalidAccessKeyId": "the endpoint does not know the access key in use: check the credentials boto3 finds "
                          "(AWS_ACCESS_KEY_ID, AWS_PROFILE, ~/.aws/credentials, an instance role) and, for an "
                          "S3-compatible store, AWS_ENDPOINT_URL",
    "SignatureDoesNotMatch": "the secret key in use does not match its access key: check AWS_SECRET_ACCESS_KEY "
                             "or the profile's aws_secret_access_key",
    "ExpiredToken": "the session token has expired: renew the credentials (aws sso login, a new role session)",
    "InvalidToken": "the session token is not valid: renew the credentials",
    "PermanentRedirect": "bucket {bucket!r} is in another region: set AWS_REGION to the bucket's region",
    "AuthorizationHeaderMalformed": "the request was signed for the wrong region: set AWS_REGION to the "
                                    "bucket's region",
    "BadDigest": "the object arrived with another SHA-256 than was sent: the upload was corrupted on the way "
                 "(or the file changed while it was read); run again",
    "InvalidBucketName": "{bucket!r} is not a valid bucket name",
}
# HEAD requests carry no error body: only the status tells what went wrong
_STATUS_HINTS = {
    403: "access denied or invalid credentials: check the credentials boto3 finds and that they may read "
         "bucket {bucket!r}",
    404: "not found",
}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


class S3Store(Store):
    def __init__(self, uri: str):
        self.bucket, self.prefix = parse_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        core = botocore.session.get_session()
        # the user's retry settings (AWS_MAX_ATTEMPTS, AWS_RETRY_MODE, the profile) win over ours
        self.max_attempts = int(core.get_config_variable("max_attempts") or DEFAULT_MAX_ATTEMPTS)
        mode = core.get_config_variable("retry_mode") or "standard"
        self._session = boto3.session.Session(botocore_session=core)
        config = Config(
            retries={"mode": mode, "total_max_attempts": self.max_attempts},
            connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
            signature_version="s3v4",  # presigned links too (SigV2 is retired)
        )
        self.client = self._session.client("s3", config=config)
        configured = self.client.meta.endpoint_url
        if without_userinfo(configured) != configured:
            self.client = self._session.client("s3", config=config, endpoint_url=without_userinfo(configured))
        self.endpoint = scrub(configured)
        self._bucket_checked = False

    def _key(self, key: str) -> str:
        key = join_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _fail(self, err: Exception, action: str, key: str | None = None) -> StoreError:
        where = self.uri_for(key) if key else self.uri
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return StoreError(
                f"cannot {action} {where}: no AWS credentials found. boto3 looks in AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws/credentials, then an instance or task role")
        if isinstance(err, (BotoConnectionError, HTTPClientError)):
            return StoreUnreachable(
                f"cannot {action} {where}: the S3 endpoint {self.endpoint} did not answer after "
                f"{self.max_attempts} attempts ({type(err).__name__}). Check that it is running and reachable, "
                "and that AWS_ENDPOINT_URL points to it")
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            hint = _HINTS.get(code) or _STATUS_HINTS.get(status) or self._scrub(
                str(err.response.get("Error", {}).get("Message", "")))
            # 5xx (InternalError, SlowDown) outlasted the retries: transient, unlike 4xx
            kind = StoreUnavailable if isinstance(status, int) and status >= 500 else StoreError
            return kind(f"cannot {action} {where}: S3 answered {code or status} (HTTP {status}) from "
                        f"{self.endpoint}: {hint.format(bucket=self.bucket)}")
        if isinstance(err, BotoCoreError):
            return StoreError(f"cannot {action} {where}: {type(err).__name__}: {self._scrub(str(err))}")
        return StoreError(f"cannot {action} {where}: {type(err).__name__}")

    def _raise(self, err: Exception, action: str, key: str | None = None):
        if isinstance(err, S3UploadFailedError) and isinstance(err.__context__, Exception):
            err = err.__context__  # boto3 wraps the ClientError of an upload
        if isinstance(err, RetriesExceededError):
            err = err.last_exception  # a download whose stream broke on every attempt
        failure = self._fail(err, action, key)
        code = getattr(err, "response", {}).get("Error", {}).get("Code") if isinstance(err, ClientError) else None
        if code in _AUTH_CODES or isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            raise failure from None  # the raw error's response may echo the access key id
        # the raw error (and what it wraps) is kept for the traceback only if nothing in it needs scrubbing
        raw = "".join(traceback.format_exception(err))
        raise failure from (err if self._scrub(raw) == raw else None)

    def _scrub(self, text: str) -> str:
        """`text` scrubbed, the credentials boto3 found included, should an error echo them."""
        creds = self._session.get_credentials()
        frozen = creds.get_frozen_credentials() if creds is not None else None
        return scrub(text, *((frozen.access_key, frozen.secret_key, frozen.token) if frozen else ()))

    def _check_bucket(self) -> None:
        """Once per store: a HEAD's 403/404 cannot tell a missing key from a missing bucket or bad credentials."""
        if self._bucket_checked:
            return
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "", MaxKeys=1)
        except Exception as e:
            self._raise(e, "list")
        self._bucket_checked = True

    def _is_missing(self, err: ClientError) -> bool:
        code = err.response.get("Error", {}).get("Code")
        if code in ("NoSuchKey", "404", "NotFound"):
            self._check_bucket()
            return True
        return False

    def put_file(self, key: str, path: Path) -> dict:
        path = Path(path)
        size = path.stat().st_size
        config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNKSIZE,
                                max_concurrency=MAX_CONCURRENCY)
        multipart = size >= config.multipart_threshold
        # the same part size the transfer manager will use, so the composite checksum matches
        part = ChunksizeAdjuster().adjust_chunksize(config.multipart_chunksize, size) if multipart else size
        whole, parts = _hash_file(path, part)
        if multipart:
            # S3 has no whole-object SHA-256 for multipart uploads, only one of the parts' checksums
            extra = {"ChecksumAlgorithm": "SHA256"}
            expected = _b64(hashlib.sha256(b"".join(parts)).digest())
        else:
            extra = {"ChecksumAlgorithm": "SHA256", "ChecksumSHA256": _b64(whole.digest())}
            expected = extra["ChecksumSHA256"]
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key), ExtraArgs=extra, Config=config)
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        except Exception as e:
            self._raise(e, "upload to", key)
        stored = head.get("ChecksumSHA256")
        if stored is None:
            log.warning("%s: the endpoint %s keeps no SHA-256 checksum; the upload was not verified end to end",
                        self.uri_for(key), self.endpoint)
        elif stored.split("-")[0] != expected:  # AWS writes a composite as '<base64>-<parts>'
            raise StoreError(f"{self.uri_for(key)}: S3 holds SHA-256 {stored} but {path} hashed to {expected}: "
                             "the file changed while it was uploaded; run again")
        return {"uri": self.uri_for(key), "sha256": whole.hexdigest(), "bytes": size}

    def get_file(self, key: str, path: Path, limit: int | None = None) -> Path:
        path = Path(path)
        try:
            # the transfer manager renames its own temporary file, without fsync: into ours,
            # which `publishing` makes `path` durably
            if limit is None:
                with publishing(path) as tmp:
                    self.client.download_file(self.bucket, self._key(key), str(tmp))
                return path
            # the bytes are counted too, should it be replaced after the HEAD
            size = self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
            check_size(self.uri_for(key), size, limit, "this download")
            with publishing(path) as tmp, open(tmp, "wb") as f:
                self.client.download_fileobj(self.bucket, self._key(key), _Capped(f, limit, self.uri_for(key)))
        except TooLarge:
            raise
        except ClientError as e:
            if self._is_missing(e):
                raise FileNotFoundError(f"{self.uri_for(key)}: not in the store") from None
            self._raise(e, "download", key)
        except Exception as e:
            self._raise(e, "download", key)
        return path

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as e:
            if self._is_missing(e):
                return False
            self._check_bucket()  # turns a bare 403 into the bucket's real error if there is one
            self._raise(e, "read", key)
        except Exception as e:
            self._raise(e, "read", key)

    def list(self, prefix: str) -> list[str]:
        root = self._key(prefix) + "/" if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root):
                keys += [obj["Key"][strip:] for obj in page.get("Contents", [])]
        except Exception as e:
            self._raise(e, "list", prefix or None)
        return sorted(keys)

    def read_versioned(self, key: str, limit: int = MAX_DOCUMENT_BYTES) -> tuple[bytes | None, str | None]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            with obj["Body"] as body:
                check_size(self.uri_for(key), obj.get("ContentLength"), limit, "a store document")
                return read_at_most(body, limit, self.uri_for(key), "a store document"), obj["ETag"]
        except TooLarge:
            raise
        except ClientError as e:
            if self._is_missing(e):
                return None, None
            self._raise(e, "read", key)
        except Exception as e:
            self._raise(e, "read", key)

    def read_stamped(self, key: str, limit: int) -> tuple[bytes | None, str | None, float | None]:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            with obj["Body"] as body:
                if obj["ContentLength"] > limit:
                    raise too_big(self.uri_for(key), limit, obj["ContentLength"])
                data = body.read(limit + 1)
        except ClientError as e:
            if self._is_missing(e):
                return None, None, None
            self._raise(e, "read", key)
        except StoreError:
            raise
        except Exception as e:
            self._raise(e, "read", key)
        if len(data) > limit:
            raise too_big(self.uri_for(key), limit, len(data))
        # both times are the endpoint's: its Date header (now) and the object's LastModified
        date = obj.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return data, obj["ETag"], max(0.0, now - obj["LastModified"].timestamp())

    def write_if(self, key: str, data: bytes, version: str | None) -> None:
        # 412 (lost) and 409 (a concurrent conditional write in flight) both mean another
        # writer got there first
        cond = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, ChecksumAlgorithm="SHA256",
                                   ChecksumSHA256=_b64(hashlib.sha256(data).digest()), **cond)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            # If-Match on an object deleted since it was read answers 404 NoSuchKey
            if status in (409, 412) or (version is not None and code == "NoSuchKey"):
                raise PreconditionFailed(f"{self.uri_for(key)} changed since it was read ({code})") from None
            self._raise(e, "write", key)
        except Exception as e:
            self._raise(e, "write", key)

    def link_for(self, key: str, expires_s: int = MAX_LINK_EXPIRY_S) -> str:
        """Like every presigned URL it names the access key id, never the secret."""
        if not 1 <= expires_s <= MAX_LINK_EXPIRY_S:
            raise ValueError(f"expires_s: expected 1..{MAX_LINK_EXPIRY_S} seconds, found {expires_s}")
        try:
            return self.client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)}, ExpiresIn=expires_s)
        except Exception as e:
            self._raise(e, "sign a link to", key)


class _Capped:
    """A download that grew after its size was checked stops at `limit` instead of filling the disk."""

    def __init__(self, f, limit: int, where: str):
        self.f, self.limit, self.where, self.written = f, limit, where, 0

    def write(self, data: bytes) -> int:
        self.written += len(data)
        check_size(self.where, self.written, self.limit, "this download")
        return self.f.write(data)


def _hash_file(path: Path, part_size: int) -> tuple["hashlib._Hash", list[bytes]]:
    whole, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
        while chunk := f.read(part_size) if part_size else b"":
            whole.update(chunk)
            parts.append(hashlib.sha256(chunk).digest())
    return whole, parts
