# Used by bench/run; not run by hand.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""The benchmark's WSGI app: examples/wsgi_app.py, plus one thing.

A request with `t=<number>` in its query string gets it back in an
`X-Bench-T` response header, unchanged. bench/burst.lua puts the send time
there, so wrk can compute each request's latency when its response arrives
and log latency over time. Every contender (drove, gunicorn, uWSGI) serves
this same module, so the extra header costs all of them the same.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from wsgi_app import application as _inner  # noqa: E402


def application(environ, start_response):
    tag = None
    for part in environ.get("QUERY_STRING", "").split("&"):
        if part.startswith("t="):
            tag = part[2:]
    if tag is None:
        return _inner(environ, start_response)

    def start(status, headers, exc_info=None):
        return start_response(status, list(headers) + [("X-Bench-T", tag)], exc_info)

    return _inner(environ, start)
