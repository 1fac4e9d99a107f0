# Used by bench/gunicorn_template.py; not run by hand.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""A WSGI app that builds ~100 MB of Python objects at import (a stand-in
for a large framework app's modules, caches and tables), so copy-on-write
sharing between a template and its workers shows in PSS.

    /         pid=<pid> items=<n>
    /sleep, /cpu, any t=   as bench/app.py (bench/servers.py's bursts)
    /work     reads 2,000 of the objects (the same hot ones each time:
              their refcount writes unshare only their pages) and
              allocates a little, as a request of a real app would; the
              first /work of each process runs one full collection
              (gc.collect()), as CPython does by itself once enough
              long-lived objects pile up, and as some apps do
"""

import gc
import os

from app import application as _bench_app  # bench/app.py: /sleep, X-Bench-T

ITEMS = int(os.environ.get("HEAVY_ITEMS", "200000"))
DATA = [
    {"id": i, "name": f"item-{i}", "tags": [f"t{i % 97}", f"u{i % 89}"], "score": i * 0.5}
    for i in range(ITEMS)
]


_collected_in = None


def application(environ, start_response):
    global _collected_in
    if environ.get("PATH_INFO") == "/work":
        if _collected_in != os.getpid():
            _collected_in = os.getpid()
            gc.collect()
        picked = [DATA[i] for i in range(0, min(ITEMS, 2000))]
        total = sum(d["score"] for d in picked)
        body = f"pid={os.getpid()} total={total:.0f}\n".encode()
    elif environ.get("PATH_INFO") != "/" or "t=" in environ.get("QUERY_STRING", ""):
        return _bench_app(environ, start_response)
    else:
        body = f"pid={os.getpid()} items={ITEMS}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
