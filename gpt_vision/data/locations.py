"""What a data name (a manifest or a shard) may be, and the one place that opens one.

Data names are data, never commands: a name is a local path, a `file://` URL or an `http(s)://`
URL. `pipe:` names (which webdataset runs in a shell) are refused unless the user sets
`data.allow_pipe: true`; every other scheme is refused. Local and http(s) names are opened
without webdataset, so no environment setting (GOPEN_REWRITE, ...) can turn them into a command.
"""

import re
import urllib.request
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset

from gpt_vision.errors import UserError

REMOTE_SCHEMES = ("http", "https")
PIPE_SCHEME = "pipe"
HTTP_TIMEOUT_S = 60
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_NO_CLIENT = ("s3", "gs", "gcs", "ais", "hf")


def scheme_of(name: str) -> str | None:
    """The name's URL scheme in lower case, or None for a plain path."""
    match = _SCHEME.match(name)
    return match.group(1).lower() if match else None


def is_local(name: str) -> bool:
    return scheme_of(name) in (None, "file")


def local_path(name: str) -> Path:
    """The filesystem path of a plain path or a `file://` URL."""
    return Path(url2pathname(urlparse(name).path)) if scheme_of(name) == "file" else Path(name)


def refusal(name: str, allow_pipe: bool) -> str | None:
    """Why `name` may not be opened, or None when it may."""
    scheme = scheme_of(name)
    if scheme in (None, "file", *REMOTE_SCHEMES):
        return None
    if scheme == PIPE_SCHEME:
        return None if allow_pipe else "a pipe: name runs a shell command; refused unless data.allow_pipe: true"
    if scheme in _NO_CLIENT:
        return f"{scheme}:// needs a storage client gpt_vision does not use; copy the shards locally or serve them over https"
    return f"scheme '{scheme}:' is not allowed (allowed: relative paths, file://, http://, https://)"


def open_location(name: str, allow_pipe: bool, what: str) -> BinaryIO:
    """Open a data name for reading. A refused name is a `UserError` naming `what` it is;
    I/O failures stay `OSError`s for the caller to word."""
    why = refusal(name, allow_pipe)
    if why is not None:
        raise UserError(f"{what} {name}: {why}")
    scheme = scheme_of(name)
    if scheme in REMOTE_SCHEMES:
        return urllib.request.urlopen(name, timeout=HTTP_TIMEOUT_S)
    if scheme == PIPE_SCHEME:
        return webdataset.gopen(name, "rb")
    return open(local_path(name), "rb")
