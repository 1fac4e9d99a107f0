# Twisted web resource for the compatibility suite (tests/compat):
#   PYTHONPATH=tests/compat/apps \
#   twist3 web --listen systemd:domain=INET:index=0 --class hello_twisted.Hello
# SPDX-License-Identifier: MIT OR Apache-2.0
#
#   /            pid=<pid>
#   /sleep?ms=N  the same after N ms (reactor timer, no thread)
import os

from twisted.internet import reactor
from twisted.web import resource, server


class Hello(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        body = f"pid={os.getpid()}\n".encode()
        request.setHeader(b"content-type", b"text/plain")
        try:
            ms = int(request.args.get(b"ms", [b"0"])[0]) if request.path == b"/sleep" else 0
        except ValueError:
            ms = 0
        if ms <= 0:
            return body
        gone = []
        request.notifyFinish().addErrback(gone.append)

        def finish():
            if not gone:
                request.write(body)
                request.finish()

        reactor.callLater(min(ms, 60_000) / 1000, finish)
        return server.NOT_DONE_YET

