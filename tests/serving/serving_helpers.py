"""Helpers shared by the serving tests: safetensors files byte by byte, an event server.

Files are written by hand (not with ``safetensors.torch.save_file``) so tests control
every header field — dtypes torch lacks, odd alignments, gaps, hostile values. The event
server plays the node agent's ``GET /v1/pulls/{id}/events``: a real HTTP server (TCP or
unix socket) that streams whatever events the test puts on its queue.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import math
import os
import queue
import random
import socketserver
import struct
from pathlib import Path

import torch

from manifests.safetensors import DTYPE_BITS

Entry = tuple[str, tuple[int, ...], bytes]

# Shapes every dtype is tried with (F4/F6 get shapes whose bit count fills bytes).
SHAPES: tuple[tuple[int, ...], ...] = ((), (0,), (3, 0, 2), (5,), (4, 6), (2, 3, 4))
SUB_BYTE_SHAPES: dict[str, tuple[tuple[int, ...], ...]] = {
    "F4": ((0,), (4,), (2, 6), (2, 3, 4), (3, 2), (2, 3)),
    "F6_E2M3": ((0,), (4,), (2, 8)),
    "F6_E3M2": ((0,), (8,), (4, 4)),
}


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPE_BITS[dtype] // 8


def every_dtype_entries(seed: int = 0, big: bool = True) -> dict[str, Entry]:
    """Every dtype × shape case, random bytes (valid bit patterns for BOOL)."""
    rng = random.Random(seed)
    out: dict[str, Entry] = {}
    for dtype in DTYPE_BITS:
        for shape in SUB_BYTE_SHAPES.get(dtype, SHAPES):
            n = nbytes(dtype, shape)
            data = (bytes(rng.getrandbits(1) for _ in range(n)) if dtype == "BOOL"
                    else rng.randbytes(n))
            out[f"{dtype.lower()}.{'x'.join(map(str, shape)) or 'scalar'}"] = (dtype, shape,
                                                                                data)
    if big:  # larger than the small buffers the tests use, so tensors are split
        out["big.f32"] = ("F32", (300, 257), rng.randbytes(300 * 257 * 4))
        out["big.bf16"] = ("BF16", (1000, 129), rng.randbytes(1000 * 129 * 2))
    return out


def write_safetensors(path: str | os.PathLike[str], entries: dict[str, Entry], *,
                      metadata: dict[str, str] | None = None, pad_to: int = 8,
                      shuffle: int | None = None) -> dict[str, tuple[int, int]]:
    """Write ``entries`` and return each tensor's absolute [begin, end) in the file.

    ``shuffle`` permutes the data order (offsets need not follow header order).
    """
    names = list(entries)
    if shuffle is not None:
        random.Random(shuffle).shuffle(names)
    header: dict[str, object] = {}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for name in names:
        dtype, shape, data = entries[name]
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [pos, pos + len(data)]}
        offsets[name] = (pos, pos + len(data))
        pos += len(data)
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % pad_to)
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            f.write(entries[name][2])
    return {k: (start + b, start + e) for k, (b, e) in offsets.items()}


def write_sharded(folder: Path, entries: dict[str, Entry], shards: int) -> Path:
    """Split ``entries`` over ``shards`` files plus a Hugging Face index; return the index."""
    names = list(entries)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / fname, {n: entries[n] for n in part})
        weight_map.update(dict.fromkeys(part, fname))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a tensor (any dtype, any shape, CPU or CUDA)."""
    t = t.detach().cpu().contiguous().reshape(-1)
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes()


def digest(t: torch.Tensor) -> str:
    return hashlib.blake2b(tensor_bytes(t), digest_size=16).hexdigest()


# -- a stand-in for the node agent's event stream, over real sockets ----------------------

class EventHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        events: queue.Queue = self.server.events  # type: ignore[attr-defined]
        if not self.path.endswith("/events"):
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"no such\r\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        while True:
            ev = events.get()
            if ev is None:
                break
            line = (json.dumps(ev) + "\n").encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: object) -> None:
        pass


class TCPEvents(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


class UnixEvents(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
