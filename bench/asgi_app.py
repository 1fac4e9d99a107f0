# Used by bench/servers.py (uvicorn's gunicorn worker); not run by hand.
# SPDX-License-Identifier: MIT OR Apache-2.0
"""bench/heavy_app.py's routes as a Starlette (ASGI) app, with the same
~100 MB of objects at import (HEAVY_ITEMS=0: a light app).

    /          pid=<pid> items=<n>
    /sleep?ms=N  blocks the event loop for N ms (time.sleep, not
               asyncio.sleep): each worker serves one request at a time, as
               the sync contenders do, so a burst needs 16 workers here too;
               with an await a single worker would absorb it
    /work      as heavy_app's /work
Any t=<n> in the query is echoed in X-Bench-T (bench/burst.lua's latencies).
"""

import gc
import os
import time

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from heavy_app import DATA, ITEMS

_collected_in = None


def _reply(request, body):
    tag = request.query_params.get("t")
    return PlainTextResponse(body, headers={"X-Bench-T": tag} if tag is not None else None)


async def hello(request):
    return _reply(request, f"pid={os.getpid()} items={ITEMS}\n")


async def sleep(request):
    time.sleep(int(request.query_params.get("ms", "0")) / 1000)
    return _reply(request, "slept\n")


async def work(request):
    global _collected_in
    if _collected_in != os.getpid():
        _collected_in = os.getpid()
        gc.collect()
    total = sum(DATA[i]["score"] for i in range(0, min(ITEMS, 2000)))
    return _reply(request, f"pid={os.getpid()} total={total:.0f}\n")


app = Starlette(routes=[Route("/", hello), Route("/sleep", sleep), Route("/work", work)])
