"""Where shards come from: local paths, http(s)://, cloud storage, and (opt-in) pipe: commands.

Streams are opened by webdataset's `gopen` (curl for http(s)/sftp/scp, gsutil for gs://, the Hugging Face
hub for hf://, AIStore for ais://) plus one scheme it lacks: s3:// through `aws s3 cp URL -`. Every command is
run as an argument list, never through a shell, so a URL cannot inject a command. A `pipe:` URL *is* a shell
command (webdataset runs it with the shell), which is why the streaming layer refuses it unless the user
opts in with allow_pipe.
"""

from __future__ import annotations

import os
from typing import IO

import webdataset as wds
from webdataset.gopen import Pipe

# schemes that can be opened, and the program each one needs
REMOTE_SCHEMES: dict[str, str] = {
    "http": "curl",
    "https": "curl",
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


def open_url(url: str) -> IO[bytes]:
    """A binary read stream for a local path or a supported URL."""
    kind = scheme(url)
    if kind in ("", "file"):
        return open(local_path(url), "rb")
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
