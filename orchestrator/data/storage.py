"""Local paths and object-storage URIs behind one interface: pyarrow filesystems (plain Python).

`data.path`, `ray.storage_path` and `limpq data to-parquet` take a local path or any URI that
pyarrow's filesystems open (`s3://bucket/prefix`, `gs://`, `hdfs://`, `file://`). S3 credentials,
endpoint and region come from the standard AWS variables, read by the AWS SDK inside pyarrow:
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile, or the node's IAM role), AWS_ENDPOINT_URL
for an S3-compatible server (MinIO, Ceph, moto; honoured by pyarrow >= 16), AWS_REGION or
AWS_DEFAULT_REGION. Ray workers read the same variables, so they must be set on every node (they are
inherited from the driver when it starts local Ray). Credentials written into a URI are never
echoed: messages show `redact(uri)`.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from orchestrator.common.errors import UserError, first_line
from orchestrator.common.fileio import writable_directory
from orchestrator.common.redact import redact

CREDENTIAL_VARIABLES = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
PROBE_SECONDS = 20
SERVICE_HINTS = {
    "s3": "the network, AWS_ENDPOINT_URL and the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the "
          "node's role)",
    "gs": "the network and the credentials (GOOGLE_APPLICATION_CREDENTIALS or the node's service account)",
    "hdfs": "the network and the namenode address",
}


def is_uri(path: str) -> bool:
    """A URI with a scheme (s3://, gs://, file://...), as opposed to a local path."""
    return "://" in str(path)


@dataclass(frozen=True)
class Location:
    """A directory or file on a pyarrow filesystem: `path` is what the filesystem takes
    (`/abs/dir` locally, `bucket/prefix` on S3); `uri` is what users see (absolute path or URI)."""

    filesystem: pafs.FileSystem
    path: str
    uri: str

    def __truediv__(self, name: str) -> Location:
        return Location(self.filesystem, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return redact(self.uri)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def bucket(self) -> str | None:
        """The bucket (first path component) on object storage; None for local paths."""
        return None if self.is_local else self.path.split("/", 1)[0]

    def info(self, key: str) -> pafs.FileInfo:
        try:
            return self.filesystem.get_file_info(self.path)
        except OSError as error:
            raise storage_error(error, key, self) from None

    def is_dir(self, key: str) -> bool:
        return self.info(key).type == pafs.FileType.Directory

    def exists(self, key: str) -> bool:
        return self.info(key).type != pafs.FileType.NotFound

    def files(self, key: str) -> list[tuple[str, int]]:
        """Every file below this directory (recursive) as (path relative to it, '/'-separated; size in
        bytes), sorted by path."""
        if self.is_local:
            return sorted(_local_files(self.path, key, self))
        try:
            infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True))
        except OSError as error:
            raise storage_error(error, key, self) from None
        return sorted((self.relative(info.path), info.size) for info in infos if info.type == pafs.FileType.File)

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.path) as stream:
            return stream.read()

    def relative(self, path: str) -> str:
        """`path` (a filesystem path below this location) relative to it, '/'-separated."""
        prefix = self.path.rstrip("/") + "/"
        return path[len(prefix):] if path.startswith(prefix) else path


def _local_files(root: str, key: str, location: Location) -> list[tuple[str, int]]:
    """`Location.files` on a local disk with os.scandir: at ImageNet's 1.3 M files, pyarrow's
    recursive FileInfo objects cost several times the listing itself. Symlinked directories are
    followed, each directory once (a link cycle ends)."""
    found: list[tuple[str, int]] = []
    pending = [("", root)]
    seen: set[tuple[int, int]] = set()
    try:
        while pending:
            prefix, directory = pending.pop()
            identity = os.stat(directory)
            if (identity.st_dev, identity.st_ino) in seen:
                continue
            seen.add((identity.st_dev, identity.st_ino))
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir():
                        pending.append((f"{prefix}{entry.name}/", entry.path))
                    elif entry.is_file():
                        found.append((prefix + entry.name, entry.stat().st_size))
    except OSError as error:
        raise storage_error(error, key, location) from None
    return found


def locate(path_or_uri: str | Path, key: str = "path") -> Location:
    """The filesystem and path of a local path (made absolute) or a URI."""
    text = str(path_or_uri)
    if not is_uri(text):
        absolute = str(Path(text).expanduser().resolve())
        return Location(pafs.LocalFileSystem(), absolute, absolute)
    try:
        filesystem, path = pafs.FileSystem.from_uri(text)
    except (OSError, ValueError, TypeError) as error:  # unknown scheme, malformed URI, unreachable service
        raise UserError(f"{key}: cannot open {redact(text)}: {first_line(error)}") from None
    return Location(filesystem, path.rstrip("/"), text.rstrip("/"))


def locate_reachable(path_or_uri: str | Path, key: str) -> Location:
    """`locate`, and for object storage one request (the location's info) answered within
    PROBE_SECONDS: a service that does not answer (a wrong endpoint, a firewall, missing credentials
    that make the SDK wait for a metadata service) is one line naming `key` instead of minutes of
    silence. Later listings, which may take minutes on a large bucket, have no such deadline."""
    if not is_uri(str(path_or_uri)):
        return locate(path_or_uri, key)

    def probe() -> Location:
        location = locate(path_or_uri, key)
        location.info(key)
        return location

    outcome: dict = {}

    def target() -> None:
        try:
            outcome["location"] = probe()
        except BaseException as error:  # handed to the caller as it is
            outcome["error"] = error

    # A daemon thread: a call that never returns is left behind, not waited for at exit.
    thread = threading.Thread(target=target, name=f"probe {key}", daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS)
    if thread.is_alive():
        scheme = str(path_or_uri).split("://", 1)[0]
        hint = SERVICE_HINTS.get(scheme, "the network and the service's credentials")
        raise UserError(f"{key}: no answer from {redact(str(path_or_uri))} within {PROBE_SECONDS} s; check {hint}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["location"]


def storage_error(error: OSError, key: str, location: Location) -> UserError:
    """One line naming the key and the likely fix for a filesystem error on `location`."""
    message = str(error)
    code = re.search(r"AWS Error ([A-Z_]+)", message)
    code = code.group(1) if code else ""
    where = str(location)
    if code == "NO_SUCH_BUCKET" or "bucket does not exist" in message.lower():
        return UserError(f"{key}: bucket '{location.bucket}' does not exist ({where}); create it or fix the URI")
    if code in ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "UNRECOGNIZED_CLIENT",
                "EXPIRED_TOKEN", "MISSING_AUTHENTICATION_TOKEN") or "403" in message or "Forbidden" in message:
        return UserError(f"{key}: access denied to {where} ({code or 'forbidden'}); check {CREDENTIAL_VARIABLES}, "
                         "AWS_ENDPOINT_URL and AWS_REGION")
    if code == "NETWORK_CONNECTION" or "curlCode" in message or "Couldn't connect" in message:
        return UserError(f"{key}: cannot reach the storage service for {where}; check AWS_ENDPOINT_URL")
    return UserError(f"{key}: {where}: {first_line(error)}")


def bucket_exists(location: Location, key: str) -> bool:
    """Whether the bucket of an object-storage location exists (raises on refused credentials)."""
    scheme = location.uri.split("://", 1)[0]
    return Location(location.filesystem, location.bucket or "", f"{scheme}://{location.bucket}").exists(key)


def check_storage_uri(uri: str, key: str = "ray.storage_path") -> None:
    """Checks, before any work, that results can be written under `uri`: a local directory that
    exists or can be created (nothing is created), or an object-storage URI whose bucket exists and
    accepts the credentials for writing (one small probe object is written and deleted). Raises a
    one-line UserError naming `key` otherwise."""
    location = locate_reachable(uri, key)
    if location.is_local:
        writable_directory(location.path, key)
        return
    if location.bucket and not bucket_exists(location, key):
        raise UserError(f"{key}: bucket '{location.bucket}' does not exist ({location}); create it or fix the URI")
    probe = location / f".limpq-write-probe-{uuid.uuid4().hex}"
    try:
        with location.filesystem.open_output_stream(probe.path) as stream:
            stream.write(b"limpq write probe\n")
        location.filesystem.delete_file(probe.path)
    except OSError as error:
        raise storage_error(error, key, location) from None
