"""A loopback TCP proxy that caps each connection's download rate, for the benchmarks.

Object stores and CDNs cap what one connection delivers (S3 documents about 85–90 MB/s
per request); on loopback nothing does, so a benchmark there cannot show what parallel
ranged requests are for. Put this in front of moto or fake-gcs-server and every client,
ours and the baseline alike, sees each connection capped at ``--conn-mbps``.

Only the upstream → client direction is paced (downloads are what is measured), in
slices of ``SLICE_BYTES`` by a per-connection token bucket, so a connection averages the
cap and an idle keep-alive connection cannot burst past it later. Prints
``BDN_LISTENING <url>`` once bound.

    python bench/conn_cap_proxy.py --upstream 127.0.0.1:9000 --conn-mbps 50 [--port 0]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bdn.service import announce

SLICE_BYTES = 64 * 1024
BURST_BYTES = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                bytes_per_s: float | None) -> None:
    loop = asyncio.get_running_loop()
    # A token bucket: an idle keep-alive connection saves up at most BURST_BYTES, so a
    # connection reused later cannot burst past the cap on what it did not use.
    tokens = float(BURST_BYTES)
    last = loop.time()
    try:
        while True:
            data = await reader.read(SLICE_BYTES)
            if not data:
                break
            if bytes_per_s:
                now = loop.time()
                tokens = min(float(BURST_BYTES), tokens + (now - last) * bytes_per_s)
                last = now
                tokens -= len(data)
                if tokens < 0:
                    await asyncio.sleep(-tokens / bytes_per_s)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    rate = args.conn_mbps * 1e6 if args.conn_mbps else None

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, up_w, None), _pipe(up_r, client_w, rate))

    server = await asyncio.start_server(handle, "127.0.0.1", args.port)
    bound = server.sockets[0].getsockname()[1]
    announce(f"http://127.0.0.1:{bound}")
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    p.add_argument("--conn-mbps", type=float, default=50.0,
                   help="download cap per connection, MB/s (0: none)")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
