# SPDX-License-Identifier: MIT OR Apache-2.0
"""A drove worker for any WSGI app, standard library only.

    python3 -m drove.wsgi path/to/module.py:callable
    python3 -m drove.wsgi package.module:callable
    systemd-socket-activate -l 127.0.0.1:8080 python3 -m drove.wsgi app.py:application

(From a checkout without installing: python3 examples/wsgi_worker.py, the
same program, serving examples/wsgi_app.py by default.)

Why processes: CPython runs one thread's bytecode at a time (the GIL), so a
threaded server on N cores still computes on one. This worker therefore
does the simplest thing: one request at a time, in one process. Throughput
comes from droved running several of these, each a separate interpreter
with its own GIL, all accepting from the same inherited listening socket.
The kernel hands each new connection to one of them, and droved adds or
removes workers as the accept queue grows or drains. The app needs no
threading care and no async rewrite; a CPU-bound request stalls only its
own worker.

The contract is systemd's (DESIGN.md, "Worker contract"; sd_listen_fds(3),
sd_notify(3)):
- listening sockets at fd 3.. (LISTEN_FDS), meant for us only if
  LISTEN_PID == our pid, named by LISTEN_FDNAMES;
- READY=1 to NOTIFY_SOCKET once the app is imported and we can serve,
  STOPPING=1 on the way out, WATCHDOG=1 every WATCHDOG_USEC/2 if set;
- SIGTERM: finish the request in progress, then exit 0.
  SIGINT/SIGQUIT: exit at once (128 + signal number).

Besides the listeners and the connection being served, the worker holds
/dev/null (see on_term) and, once it has notified, a datagram socket.

Template mode (droved's worker.mode = "template", docs/template.md): the
same command line. When DROVE_TEMPLATE_FD is set, this process is the
template: it loads the app once, freezes the collector (gc.freeze(), so
refcount and GC writes do not unshare its pages), says hello on that socket
and forks a worker for each `spawn` droved sends. The workers share the
loaded app copy-on-write and start in about a millisecond.

Exit codes: 0 after SIGTERM, 2 when the socket-activation contract is
broken, 1 when the app cannot be loaded.
"""

import importlib
import importlib.util
import os
import select
import signal
import socket
import sys
import threading
import time
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from drove import _protocol

READ_TIMEOUT = 5.0  # seconds per read: a silent client cannot wedge us

_stopping = False
_listener_fds = []
_devnull = -1


def log(msg):
    print(f"drove.wsgi[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def die(msg, code=2):
    log(msg)
    sys.exit(code)


_notifier = None


def notify(msg):
    _notifier.send(msg)


def start_watchdog():
    try:
        timeout = _protocol.parse_watchdog_usec(os.environ, os.getpid())
    except _protocol.ContractError as e:
        die(str(e))
    if timeout is None or _notifier.addr is None:
        return
    interval = timeout / 2

    def ping():
        while True:
            notify("WATCHDOG=1")
            time.sleep(interval)

    # Signals must reach the main thread: its blocking poll/accept is what
    # they have to interrupt. The thread inherits the mask set around start().
    sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGQUIT}
    signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    threading.Thread(target=ping, name="watchdog", daemon=True).start()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)


# ------------------------------------------------------------------ signals


def on_term(signum, frame):
    """Graceful stop. Sets the flag, and points our listener fds at
    /dev/null: a poll or accept that is blocked, or about to block, then
    returns at once (PEP 475 retries the call after this handler, and the
    retry sees the swapped fd), so the flag is never missed. The request in
    progress is untouched. Only our fd table changes; droved and the other
    workers keep the shared sockets."""
    global _stopping
    _stopping = True
    for fd in _listener_fds:
        os.dup2(_devnull, fd, inheritable=False)


def on_quit(signum, frame):
    os._exit(128 + signum)


# ------------------------------------------------------------------ listeners


def take_listeners():
    try:
        fds = _protocol.parse_listen_fds(os.environ, os.getpid())
        adopted = _protocol.adopt_listeners(fds)
    except _protocol.ContractError as e:
        die(str(e))
    # Ask for the address now: once on_term is installed the fd may be
    # /dev/null.
    return [(sock, name, sock.getsockname()) for sock, name in adopted]


# ------------------------------------------------------------------ WSGI


class CloseHandler(ServerHandler):
    """wsgiref's handler, answering HTTP/1.1 with `Connection: close`.

    A WSGI app may not set hop-by-hop headers, so the server adds it."""

    http_version = "1.1"

    def cleanup_headers(self):
        super().cleanup_headers()
        self.headers["Connection"] = "close"


class RequestHandler(WSGIRequestHandler):
    timeout = READ_TIMEOUT  # applied to the connection by StreamRequestHandler
    # Answer unparseable request lines with a status line and headers too,
    # not as HTTP/0.9 (a bare body).
    default_request_version = "HTTP/1.0"

    def handle(self):
        # WSGIRequestHandler.handle, with our ServerHandler.
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.requestline = self.request_version = self.command = ""
            self.send_error(414)
            return
        if not self.parse_request():  # the error response has been sent
            return
        self.close_connection = True
        handler = CloseHandler(
            self.rfile,
            self.wfile,
            self.get_stderr(),
            self.get_environ(),
            multithread=False,
            multiprocess=True,
        )
        handler.request_handler = self  # for log_request
        handler.run(self.server.get_app())

    def log_request(self, code="-", size="-"):
        pass  # per-request logs belong to the app or a proxy, not here


class Server(WSGIServer):
    """A WSGIServer around an inherited socket instead of a bound one."""

    def __init__(self, sock, addr, app):
        super().__init__(None, RequestHandler, bind_and_activate=False)
        self.socket.close()  # the unused one the constructor made
        self.socket = sock
        self.unix = sock.family == socket.AF_UNIX
        if self.unix:
            self.server_name, self.server_port = "localhost", 0
        else:
            # No getfqdn() like HTTPServer.server_bind: it may do DNS lookups.
            self.server_name, self.server_port = addr[0], addr[1]
        self.server_address = addr
        self.setup_environ()
        self.set_app(app)

    def serve_one(self):
        try:
            conn, addr = self.socket.accept()
        except OSError:
            return  # another worker took it, or we are stopping
        if self.unix:
            addr = ("", 0)  # unix peers have no address; wsgiref wants one
        try:
            self.finish_request(conn, addr)
        except OSError:
            pass  # client went away or timed out: nothing to answer
        except Exception:
            self.handle_error(conn, addr)
        finally:
            self.shutdown_request(conn)


def load_app(spec):
    target, _, attr = spec.partition(":")
    attr = attr or "application"
    try:
        if target.endswith(".py") or os.sep in target:
            path = os.path.abspath(target)
            sys.path.insert(0, os.path.dirname(path))  # for the app's own imports
            name = os.path.splitext(os.path.basename(path))[0]
            mod_spec = importlib.util.spec_from_file_location(name, path)
            if mod_spec is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            mod_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
        return getattr(module, attr)
    except Exception as e:
        import traceback

        traceback.print_exc()
        log(f"cannot load WSGI app {spec!r}: {type(e).__name__}: {e}")
        sys.exit(1)


# ------------------------------------------------------------------ main


USAGE = "usage: python3 -m drove.wsgi module.py:callable | package.module:callable"


def main(argv=None, default_app=None):
    global _devnull, _notifier
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    if len(argv) > 1 or (not argv and default_app is None):
        die(USAGE)
    spec = argv[0] if argv else default_app

    _notifier = _protocol.Notifier(log)
    signal.signal(signal.SIGINT, on_quit)
    signal.signal(signal.SIGQUIT, on_quit)
    try:
        template_fd = _protocol.parse_template_fd(os.environ)
    except _protocol.ContractError as e:
        die(str(e))
    listeners = take_listeners()
    _devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    _listener_fds.extend(sock.fileno() for sock, _, _ in listeners)
    signal.signal(signal.SIGTERM, on_term)

    app = load_app(spec)
    if template_fd is not None:
        _protocol.serve_template(template_fd, log)  # returns in a worker
        _notifier = _protocol.Notifier(log)  # not the template's socket
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_quit)
    servers = {sock.fileno(): Server(sock, addr, app) for sock, _, addr in listeners}
    for sock, name, addr in listeners:
        log(f"serving fd {sock.fileno()} ({name}) {addr!r}")
    start_watchdog()
    if not _stopping:  # stopped while importing the app: no READY=1
        notify("READY=1")

    # select.poll, not selectors' epoll: poll() takes fd numbers on every
    # call, so it notices when on_term swaps them for /dev/null.
    poller = select.poll()
    for fd in servers:
        poller.register(fd, select.POLLIN)
    while not _stopping:
        for fd, _ in poller.poll():
            if _stopping:
                break
            # Blocking accept on the shared socket (we never set O_NONBLOCK
            # on it: that would change it for droved and the other workers
            # too). If another worker won the race we block until the next
            # connection or until SIGTERM makes the retried accept fail.
            servers[fd].serve_one()

    notify("STOPPING=1")
    sys.exit(0)


if __name__ == "__main__":
    main()
