"""Credentials out of anything we record or print: MLflow params and tags, logged and printed commands.

A tracking URI such as `postgresql://user:password@host/db` or `https://host/?token=...` is a config
value like any other; it must reach MLflow's client but never its params, tags or our output.

Layer-neutral: standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"

# scheme://user:password@host: the password runs to the last "@" before the path, query or space.
_URI_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/?#@:]*:)[^\s/?#]*@")
# scheme://token@host: a user-info without a password is often a token (https://TOKEN@host).
_URI_USER_ONLY = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^\s/?#@:*]+@")
# Names that say a value is a secret: query parameters (access_token, X-Amz-Signature, Azure SAS `sig`,
# api key), KEY=VALUE words in commands and logs (MLFLOW_TRACKING_PASSWORD=...), and param keys.
_SECRET_WORD = r"(?:token|passw(?:or)?d|pwd|secret|credential|signature|api_?key|access_?key)"
_QUERY_NAME = rf"(?:[\w.\-]*(?:{_SECRET_WORD}|key|auth)[\w.\-]*|sig)"
_ASSIGNED_NAME = rf"[\w.\-]*{_SECRET_WORD}[\w.\-]*"
_QUERY_SECRET = re.compile(rf"(?P<head>[?&;]{_QUERY_NAME}=)[^&#\s'\"]+", re.IGNORECASE)
_ASSIGNED_SECRET = re.compile(rf"(?P<head>(?<![\w.\-?&;/]){_ASSIGNED_NAME}=)[^\s'\"]+", re.IGNORECASE)
_SECRET_KEY = re.compile(rf"^{_ASSIGNED_NAME}$", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` (a URI, a command line, a log line) with passwords in URIs and secret-named query
    parameters or KEY=VALUE assignments replaced by ***; the user name before a password and the
    host stay readable."""
    text = _URI_PASSWORD.sub(rf"\g<head>{MASK}@", text)
    text = _URI_USER_ONLY.sub(rf"\g<head>{MASK}@", text)
    text = _QUERY_SECRET.sub(rf"\g<head>{MASK}", text)
    return _ASSIGNED_SECRET.sub(rf"\g<head>{MASK}", text)


def redact_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy for MLflow params or tags: string values redacted, and the whole value masked where
    the key itself names a secret (e.g. `aws_secret_access_key`)."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if _SECRET_KEY.match(key.rsplit(".", 1)[-1]) and value not in (None, ""):
            out[key] = MASK
        elif isinstance(value, str):
            out[key] = redact(value)
        else:
            out[key] = value
    return out
