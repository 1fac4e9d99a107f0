# Run: python3 examples/wsgi_worker.py (drove), or any WSGI server (below)
# SPDX-License-Identifier: MIT OR Apache-2.0
"""A plain WSGI test app, served identically by drove, gunicorn and uWSGI.

    python3 examples/wsgi_worker.py                        # under drove
    gunicorn --chdir examples -w 4 wsgi_app:application
    uwsgi --http-socket 127.0.0.1:8080 --wsgi-file examples/wsgi_app.py

Routes (GET):
    /             pid=<pid> worker=<DROVE_WORKER> generation=<DROVE_GENERATION>
    /sleep?ms=N   sleep N ms (I/O-bound: releases the GIL)
    /cpu?ms=N     pure-Python busy loop for N ms of wall time (holds the GIL)
    /env          the socket-activation and drove variables that are set,
                  pid=<pid> and one "fd <n> -> <target>" line per open fd

Standard library only, and nothing drove-specific beyond reading the
environment, so benchmarks compare servers and not apps.
"""

import os
import time
from urllib.parse import parse_qs

MAX_MS = 600_000

ENV_KEYS = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "DROVE_WORKER",
    "DROVE_GENERATION",
)


def _ms(environ):
    """The ms= query parameter, or None if missing or invalid."""
    values = parse_qs(environ.get("QUERY_STRING", "")).get("ms", [])
    try:
        ms = int(values[0])
    except (IndexError, ValueError):
        return None
    return ms if 0 <= ms <= MAX_MS else None


def _burn_cpu(seconds):
    """Busy-loop in Python bytecode, holding the GIL, for `seconds`."""
    end = time.monotonic() + seconds
    x = 1
    while time.monotonic() < end:
        for _ in range(1000):
            x = (x * 6364136223846793005 + 1) & 0xFFFFFFFFFFFFFFFF
    return x


def _env_report():
    lines = [f"{k}={os.environ[k]}" for k in ENV_KEYS if k in os.environ]
    lines.append(f"pid={os.getpid()}")
    # listdir's own fd is closed again by the time we readlink, so it drops
    # out (FileNotFoundError) instead of showing up as a phantom fd.
    for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):
        try:
            lines.append(f"fd {fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return "\n".join(lines) + "\n"


def application(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    method = environ.get("REQUEST_METHOD", "GET")
    pid = os.getpid()
    status = "200 OK"

    if method not in ("GET", "HEAD"):
        status, body = "405 Method Not Allowed", "only GET and HEAD\n"
    elif path == "/":
        body = "pid={} worker={} generation={}\n".format(
            pid,
            os.environ.get("DROVE_WORKER", "-"),
            os.environ.get("DROVE_GENERATION", "-"),
        )
    elif path in ("/sleep", "/cpu"):
        ms = _ms(environ)
        if ms is None:
            status = "400 Bad Request"
            body = f"expected ?ms=<integer 0..{MAX_MS}>\n"
        elif path == "/sleep":
            time.sleep(ms / 1000)
            body = f"pid={pid} slept_ms={ms}\n"
        else:
            _burn_cpu(ms / 1000)
            body = f"pid={pid} cpu_ms={ms}\n"
    elif path == "/env":
        body = _env_report()
    else:
        status, body = "404 Not Found", "not found\n"

    data = body.encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
        ],
    )
    return [b""] if method == "HEAD" else [data]
