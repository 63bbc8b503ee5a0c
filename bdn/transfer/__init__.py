"""The transfer engine: how remote bytes reach the mirror, whatever the source.

Source adapters (:mod:`bdn.sources`) say *what* to fetch — they list, pin and
fingerprint files and give a fetcher and a checksum per file. The engine says *how*:

* :mod:`~bdn.transfer.options` — :class:`DownloadOptions` (part size, concurrency,
  timeouts, retry policy);
* :mod:`~bdn.transfer.files` — the records that cross the boundary (``SourceFile``,
  ``Fetch``, ``Checksum``, ``FetchCounters``);
* :mod:`~bdn.transfer.cancel` — ``CancelToken``, ``AnyOf`` and ``MirrorCancelled``;
* :mod:`~bdn.transfer.ranged` — one range fetched, retried and resumed;
* :mod:`~bdn.transfer.stream` — a file streamed straight into its chunks;
* :mod:`~bdn.transfer.spool` — a file downloaded into a local spool, resumable;
* :mod:`~bdn.transfer.http_range` — ranged GETs on blocking sockets;
* :mod:`~bdn.transfer.fetchers` — fetchers over fsspec filesystems;
* :mod:`~bdn.transfer.crc` — CRC32/CRC32C computed per chunk and combined.

The arrows point one way: adapters import the engine, the engine imports no source and
not the mirror, and the blob store imports neither (tests/core/test_layers.py checks).
"""
