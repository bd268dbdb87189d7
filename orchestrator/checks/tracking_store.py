"""Is a tracking URI an MLflow store we can use, answered within seconds and without writing to it.

`check_tracking_store(uri, key)` is what every command that reads or writes a tracking store runs
before work: the config commands through preflight (key `mlflow.tracking_uri` or
`MLFLOW_TRACKING_URI`), `limpq export` with `--tracking-uri`. MLflow itself would retry an unanswering
server for minutes, and would create its schema in any file a `sqlite:///` URI names (an empty file,
another program's database), so both are refused here in one line naming `key` and the fix.

Layer-neutral: the standard library only (no MLflow).
"""

from __future__ import annotations

import socket
import sqlite3
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path
from urllib.parse import unquote, urlsplit

from orchestrator.common.errors import ConfigError
from orchestrator.common.redact import redact

SERVICE_TIMEOUT_S = 10
SQLITE_PREFIX = "sqlite:///"
SQLITE_HEADER = b"SQLite format 3\x00"
# Tables every MLflow database has (its schema migrations and the experiments they hold).
MLFLOW_TABLES = {"alembic_version", "experiments"}
# Database servers MLflow's SQLAlchemy store takes, with their default ports.
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
# Stores reached through their own clients and credentials: not probed here.
HOSTED_SCHEMES = ("databricks", "databricks-uc", "uc")


def check_tracking_store(uri: str, key: str) -> None:
    """Raise ConfigError (one line naming `key`) unless `uri` is a store MLflow can use as it is: a
    tracking server that answers its health check, a database server that accepts connections, or
    a `sqlite:///` path that is an MLflow database already or a new file in an existing directory.
    A local file-store path is left to the caller (MLflow 3 refuses those; see resolve_tracking_uri)."""
    scheme = uri.partition("://")[0].lower() if "://" in uri else ""
    if not scheme or scheme == "file":
        return
    if scheme in ("http", "https"):
        _check_server(uri, key)
    elif scheme == "sqlite":
        _check_sqlite(uri, key)
    elif scheme.partition("+")[0] in DATABASE_PORTS:
        _check_database_server(uri, key, scheme.partition("+")[0])
    elif scheme not in HOSTED_SCHEMES:
        raise ConfigError(f"{key}: {redact(uri)!r} is not an MLflow tracking store; give sqlite:///PATH, the "
                          "http://HOST:PORT of a tracking server, or a database URL (postgresql://, mysql://, mssql://)")


def _check_server(uri: str, key: str) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVICE_TIMEOUT_S) as response:
            response.read()
    except urllib.error.HTTPError as error:  # it answers: up, perhaps behind an auth proxy
        if error.code >= 500:
            raise ConfigError(f"{key}: the MLflow server at {redact(uri)} answers {error.code} "
                              f"{error.reason}; check the server's log") from None
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise ConfigError(f"{key}: no MLflow server answers at {redact(uri)} ({reason}); start it "
                          "(cluster/local-up.sh starts one) or fix the URI") from None


def _check_database_server(uri: str, key: str, dialect: str) -> None:
    parts = urlsplit(uri)
    host, port = parts.hostname, parts.port or DATABASE_PORTS[dialect]
    if not host:
        raise ConfigError(f"{key}: {redact(uri)!r} names no database host; write {dialect}://USER@HOST:PORT/DATABASE")
    try:
        socket.create_connection((host, port), timeout=SERVICE_TIMEOUT_S).close()
    except OSError as error:
        raise ConfigError(f"{key}: no database answers at {host}:{port} ({error.strerror or error}); start it "
                          "or fix the URI") from None


def _check_sqlite(uri: str, key: str) -> None:
    if not uri.startswith(SQLITE_PREFIX):
        raise ConfigError(f"{key}: {redact(uri)!r} is not an SQLite URI; write sqlite:///PATH (three slashes, "
                          "then a relative path, or four for an absolute one)")
    name = unquote(uri.removeprefix(SQLITE_PREFIX)).partition("?")[0]
    if name == ":memory:":
        return
    if not name:
        raise ConfigError(f"{key}: {uri!r} names no database file; write sqlite:///PATH, e.g. sqlite:///mlflow.db")
    path = Path(name)
    if path.is_dir():
        raise ConfigError(f"{key}: {path} is a directory; give the MLflow database file in it, e.g. "
                          f"sqlite:///{path / 'mlflow.db'}")
    if not path.exists():
        if not path.parent.is_dir():
            raise ConfigError(f"{key}: the directory {path.parent} of the new MLflow database {path.name} does not "
                              "exist; create it or fix the path")
        return
    try:
        with path.open("rb") as handle:
            header = handle.read(len(SQLITE_HEADER))
    except OSError as error:
        raise ConfigError(f"{key}: {path}: {error.strerror or error}") from None
    if header != SQLITE_HEADER:
        what = "an empty file" if not header else "not an SQLite database"
        raise ConfigError(f"{key}: {path} is {what}, not an MLflow database, and MLflow would write its tables "
                          "into it; give the store the pipeline wrote, or a path that does not exist yet")
    try:
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                                     timeout=SERVICE_TIMEOUT_S)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
    except sqlite3.Error as error:
        raise ConfigError(f"{key}: {path} cannot be read as an SQLite database ({error}); give the store "
                          "the pipeline wrote, or a path that does not exist yet") from None
    if not MLFLOW_TABLES <= tables:
        raise ConfigError(f"{key}: {path} is an SQLite database but not an MLflow store (no "
                          f"{' or '.join(sorted(MLFLOW_TABLES - tables))} table), and MLflow would write its tables "
                          "into it; give the store the pipeline wrote, or a path that does not exist yet")
