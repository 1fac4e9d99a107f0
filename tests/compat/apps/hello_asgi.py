# Starlette (ASGI) app for the compatibility suite (tests/compat), served by
# uvicorn's gunicorn worker in drove's template mode:
#   python3 -m drove.gunicorn -k uvicorn_worker.UvicornWorker hello_asgi:app
# SPDX-License-Identifier: MIT OR Apache-2.0
#
#   /            pid=<pid> loaded_by=<pid that imported this module>
#   /sleep?ms=N  the same after N ms (asyncio.sleep: the worker serves others)
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

LOADED_BY = os.getpid()  # the template: every worker forked from it says so


def body():
    return f"pid={os.getpid()} loaded_by={LOADED_BY}\n"


async def hello(request):
    return PlainTextResponse(body())


async def sleep(request):
    try:
        ms = int(request.query_params.get("ms", "0"))
    except ValueError:
        ms = 0
    await asyncio.sleep(min(max(ms, 0), 60_000) / 1000)
    return PlainTextResponse(body())


app = Starlette(routes=[Route("/", hello), Route("/sleep", sleep)])
