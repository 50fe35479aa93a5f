"""Where shards come from: local paths, http(s)://, cloud storage, and (opt-in) pipe: commands.

http(s):// is read in-process by Python's http client (a failure is an exception that says what happened,
and the retries are the reader's, `shards.iter_shard`, rather than curl's 30 silent ones); s3:// through
`aws s3 cp URL -`; the rest by webdataset's `gopen` (gsutil for gs://, curl for sftp/scp, the Hugging Face
hub for hf://, AIStore for ais://). Every command is run as an argument list, never through a shell, so a
URL cannot inject a command. A `pipe:` URL *is* a shell
command (webdataset runs it with the shell), which is why the streaming layer refuses it unless the user
opts in with allow_pipe.
"""

from __future__ import annotations

import os
import urllib.request
from typing import IO

import webdataset as wds
from webdataset.gopen import Pipe

# schemes that can be opened, and the program each one needs
REMOTE_SCHEMES: dict[str, str] = {
    "http": "python",
    "https": "python",
    "sftp": "curl",
    "ftps": "curl",
    "scp": "curl",
    "s3": "aws",
    "gs": "gsutil",
    "hf": "huggingface_hub",
    "ais": "ais",
}


def scheme(url: str) -> str:
    """'' for a local path, else the URL scheme ('file', 'https', 's3', 'pipe', ...)."""
    if url.startswith("pipe:"):
        return "pipe"
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isalnum() else ""


def is_local(url: str) -> bool:
    return scheme(url) in ("", "file")


def local_path(url: str) -> str:
    return os.path.expanduser(url[len("file://"):] if url.startswith("file://") else url)


HTTP_TIMEOUT = 60.0  # seconds without a byte before an http(s) read fails (and is retried by the reader)


def open_url(url: str) -> IO[bytes]:
    """A binary read stream for a local path or a supported URL."""
    kind = scheme(url)
    if kind in ("", "file"):
        return open(local_path(url), "rb")
    if kind in ("http", "https"):  # HTTPError (404, 503, ...) and connection errors raise here or in read()
        request = urllib.request.Request(url, headers={"User-Agent": "vitx"})
        return urllib.request.urlopen(request, timeout=HTTP_TIMEOUT)
    if kind == "s3":
        # argument list, no shell; 141 (SIGPIPE) and 1/255 are what `aws` returns when we stop reading early
        return Pipe(["aws", "s3", "cp", "--quiet", url, "-"], mode="rb", bufsize=8192, ignore_status=[141])
    if kind != "pipe" and kind not in REMOTE_SCHEMES:
        raise ValueError(
            f"cannot open {url!r}: unsupported scheme '{kind}://'; use a local path, "
            + ", ".join(f"{s}://" for s in REMOTE_SCHEMES)
            + " (or pipe: with allow_pipe)"
        )
    return wds.gopen(url, "rb")


def close_quietly(stream: IO[bytes]) -> None:
    """Close a stream we may have stopped reading early; a downloader killed by the closed pipe is no error."""
    try:
        stream.close()
    except Exception:
        pass
