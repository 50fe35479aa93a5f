"""Tiny shard sets for the data tests: a few hundred 8x8 JPEGs whose label is the sample's global index,
so coverage across simulated ranks and workers can be checked exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import webdataset as wds

from data_pipelines.metadata import write_sizes

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def jpeg(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> None:
    """One shard with exactly these samples (members written in key order, as webdataset does)."""
    with wds.TarWriter(str(path), encoder=False, mtime=0) as w:
        for sample in samples:
            w.write(sample)


def make_shards(
    out: Path, sizes: list[int], split: str = "train", image_size: int = 8, with_sizes: bool = True
) -> str:
    """Shards with the given sample counts; sample i (global) has label i. Returns a brace pattern."""
    out.mkdir(parents=True, exist_ok=True)
    img = jpeg(0, image_size)  # one encoded image shared by all samples keeps this fast
    index, table = 0, {}
    for s, n in enumerate(sizes):
        name = f"{split}-{s:06d}.tar"
        write_tar(out / name, [{"__key__": f"s{index + i:06d}", "jpg": img, "cls": str(index + i).encode()} for i in range(n)])
        table[name] = n
        index += n
    if with_sizes:
        write_sizes(out, table)
    last = len(sizes) - 1
    return str(out / (f"{split}-{{000000..{last:06d}}}.tar" if last else f"{split}-000000.tar"))


@pytest.fixture
def shards(tmp_path):
    """Factory fixture: shards(sizes, split=..., ...) -> pattern in a fresh directory."""

    def make(sizes, split="train", sub="shards", **kw):
        return make_shards(tmp_path / sub, list(sizes), split=split, **kw)

    return make


# ---------------------------------------------------------------------------------------------- a flaky server


class FaultyServer:
    """A threaded HTTP server on 127.0.0.1 serving the files under `root`, whose first `faults` requests of every
    shard (.tar) fail in turn in one of these ways, chosen by a seeded generator; later requests succeed:

    * 503: a "service unavailable" answer;
    * drop: the connection closed before any answer (what a proxy in trouble does);
    * reset: half of the body, then a TCP reset;
    * short: Content-Length says the whole file, half of it comes, then a clean close;
    * cut: no Content-Length and a clean close right at a tar member header: to an HTTP client a complete
      response, to a tar reader a valid but shorter archive (only its missing end-of-archive blocks tell).
    """

    KINDS = ("503", "drop", "reset", "short", "cut")

    def __init__(self, root, faults: int = 3, seed: int = 0):
        import http.server
        import random
        import socket
        import struct
        import tarfile
        import threading

        from collections import Counter

        self.root, self.faults, self.requests, self.served = Path(root), faults, {}, Counter()
        rng, lock, server = random.Random(seed), threading.Lock(), self

        def header_offsets(path: Path) -> list[int]:
            with tarfile.open(path) as tar:
                return [m.offset for m in tar.getmembers()][1:]

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path = server.root / self.path.lstrip("/")
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                with lock:
                    n = server.requests[self.path] = server.requests.get(self.path, -1) + 1
                    kind = rng.choice(server.KINDS) if path.suffix == ".tar" and n < server.faults else "ok"
                    server.served[kind] += 1
                if kind == "503":
                    self.send_error(503)
                    return
                if kind == "drop":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                if kind != "cut":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if kind == "ok":
                    self.wfile.write(data)
                elif kind == "cut":
                    offsets = header_offsets(path)
                    self.wfile.write(data[: offsets[len(offsets) // 2]])
                else:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    if kind == "reset":
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def faulty_server():
    """Factory: faulty_server(root, faults=3, seed=0) -> a running FaultyServer (shut down after the test)."""
    servers = []

    def start(root, **kw):
        servers.append(FaultyServer(root, **kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
