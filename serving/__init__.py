"""bdn's serving runtime: the safetensors streaming loader and the model server.

* :mod:`serving.loader` — ``load`` / ``iter_tensors`` / ``open_weights``: safetensors
  files (a folder, an index, explicit files) to tensors on CPU or CUDA, each yielded as
  soon as it is complete, optionally while the files are still arriving; its parts are
  :mod:`serving.plan` (which byte ranges to read, pure), :mod:`serving.calibrate`
  (``auto``'s measurement), :mod:`serving.strategies` (one class per way of reading)
  and :mod:`serving.rawio` (the system calls they share);
* :mod:`serving.readiness` — which byte ranges are verified (the node agent's events);
* :mod:`serving.files` — resolving inputs and reading headers without trusting them;
* :mod:`serving.runtime` / :mod:`serving.server` / :mod:`serving.cli` — ``bdn serve``.

Importing this package imports nothing heavy; torch loads with the loader.
"""
