# SPDX-License-Identifier: MIT OR Apache-2.0
"""The worker contract droved hands its workers, in one place for every
adapter in this package (drove.wsgi, drove.gunicorn):

- sd_listen_fds(3): listening sockets at fd 3.., ours only when
  LISTEN_PID is our pid;
- sd_notify(3): READY=1, WATCHDOG=1, STOPPING=1 to NOTIFY_SOCKET;
- template mode (docs/template.md, protocol 1): with DROVE_TEMPLATE_FD set,
  this process loads the app once, says hello and forks a worker for each
  `spawn` droved sends, with a double fork so the worker is droved's child.

The functions named parse_* are pure (no I/O) and unit-tested in
python/tests/test_protocol.py.
"""

import ctypes
import gc
import os
import random
import signal
import socket
import sys
import threading
import time

PROTOCOL_VERSION = 1
PR_SET_PDEATHSIG = 1
LISTEN_FDS_START = 3
# How long a fresh worker waits to be reparented to droved (the
# intermediate process exits at once); longer means droved is gone.
REPARENT_TIMEOUT = 2.0
# Forks a template starts before it answers the oldest: each intermediate
# forks its worker and exits while the template forks the next.
FORK_PIPELINE = 4


class ContractError(Exception):
    """The process was not started the way droved starts workers. The
    message says what is missing; the caller exits 2 with it."""


# ------------------------------------------------------------------ pure parts


def parse_notify_socket(value):
    """NOTIFY_SOCKET's value -> an address for sendto, or None.
    `@name` is the abstract namespace; a relative path is not valid."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def parse_listen_fds(environ, pid):
    """sd_listen_fds(3), strictly: [(fd, name)] for fds 3.., or
    ContractError saying what is wrong. Pure: reads only `environ`."""
    listen_pid = environ.get("LISTEN_PID")
    if listen_pid is None:
        raise ContractError(
            "LISTEN_PID is not set: not socket-activated (run me under droved)"
        )
    if listen_pid.strip() != str(pid):
        raise ContractError(
            f"LISTEN_PID={listen_pid} but my pid is {pid}: these fds are not for me"
        )
    raw = environ.get("LISTEN_FDS", "")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise ContractError(f"LISTEN_FDS={raw!r}: expected at least 1")
    names = environ.get("LISTEN_FDNAMES", "").split(":")
    return [
        (fd, names[i] if i < len(names) and names[i] else "unknown")
        for i, fd in enumerate(range(LISTEN_FDS_START, LISTEN_FDS_START + n))
    ]


def parse_template_fd(environ):
    """DROVE_TEMPLATE_FD -> an fd number, None when unset (exec mode), or
    ContractError when it is not a number."""
    raw = environ.get("DROVE_TEMPLATE_FD")
    if raw is None or raw == "":
        return None
    try:
        fd = int(raw)
    except ValueError:
        raise ContractError(f"DROVE_TEMPLATE_FD={raw!r} is not an fd number") from None
    if fd < LISTEN_FDS_START:
        raise ContractError(f"DROVE_TEMPLATE_FD={raw!r} is not an fd droved passes")
    return fd


def parse_message(data):
    """One datagram from droved -> ("spawn", slot, generation), ("eof",),
    or ("unknown", text). Words separated by single spaces, an optional
    trailing newline (docs/template.md, "Messages")."""
    if not data:
        return ("eof",)
    text = data.decode("ascii", "replace").rstrip("\n")
    words = text.split(" ")
    if len(words) == 3 and words[0] == "spawn" and all(w.isdigit() for w in words[1:]):
        return ("spawn", words[1], words[2])
    return ("unknown", text)


def parse_watchdog_usec(environ, pid):
    """WATCHDOG_USEC -> the watchdog timeout in seconds, or None when there
    is none for this process (unset, 0, or WATCHDOG_PID names another)."""
    usec = environ.get("WATCHDOG_USEC", "").strip()
    if not usec:
        return None
    wd_pid = environ.get("WATCHDOG_PID", "").strip()
    if wd_pid and wd_pid != str(pid):
        return None
    try:
        value = int(usec)
    except ValueError:
        raise ContractError(f"WATCHDOG_USEC={usec!r} is not an integer") from None
    return value / 1e6 if value > 0 else None


class Heartbeat:
    """Rate limit for WATCHDOG=1: a server may call its heartbeat on every
    request; droved needs one datagram per `interval`. Pure: the caller
    passes the clock."""

    def __init__(self, interval):
        self.interval = interval
        self.last = None

    def due(self, now):
        if self.last is not None and now - self.last < self.interval:
            return False
        self.last = now
        return True


# ------------------------------------------------------------------ sd_notify


class Notifier:
    """sd_notify(3) from this process. Safe to call from threads; never
    raises (a lost datagram must not take a request down with it)."""

    def __init__(self, log, environ=os.environ):
        self.log = log
        raw = environ.get("NOTIFY_SOCKET", "")
        self.addr = parse_notify_socket(raw)
        if raw and self.addr is None:
            log(f"unsupported NOTIFY_SOCKET={raw!r}, not notifying")
        self.sock = None
        # Re-entrant: a signal handler may notify while the main thread is
        # in send().
        self.lock = threading.RLock()
        self.heartbeat = None

    def send(self, msg):
        if self.addr is None:
            return
        with self.lock:
            try:
                if self.sock is None:
                    self.sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self.sock.sendto(msg.encode(), self.addr)
            except OSError as e:
                self.log(f"sending {msg!r} to NOTIFY_SOCKET: {e}")

    def watchdog_every(self, timeout):
        """Arm ping(): at most one WATCHDOG=1 per quarter of the timeout,
        so a caller that pings at least every timeout/2 is never late."""
        self.heartbeat = Heartbeat(timeout / 4)

    def ping(self):
        if self.heartbeat is not None and self.heartbeat.due(time.monotonic()):
            self.send("WATCHDOG=1")


# ------------------------------------------------------------------ sockets


def adopt_listeners(fds):
    """The inherited fds as socket objects, checked to be listening stream
    sockets; CLOEXEC so the app's own children get none."""
    out = []
    for fd, name in fds:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise ContractError(f"fd {fd} ({name}): not a socket: {e}") from None
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            raise ContractError(f"fd {fd} ({name}) is not a listening stream socket")
        os.set_inheritable(fd, False)
        out.append((sock, name))
    return out


# ------------------------------------------------------------------ template


class Spawn:
    """What a forked worker learns from droved's `spawn`."""

    def __init__(self, droved, slot, generation, number):
        self.droved = droved
        self.slot = slot
        self.generation = generation
        self.number = number  # this template's nth fork, from 1


def warn_threads(log):
    """Threads do not survive fork: a worker would miss them silently."""
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if others:
        log(
            f"warning: {len(others)} thread(s) running in the template "
            f"({', '.join(others)}); they will not run in the workers: "
            "start them in the worker (e.g. gunicorn's post_fork hook)"
        )


def serve_template(fd, log, freeze=True):
    """docs/template.md, protocol 1: hello, then one `spawn` at a time.
    Returns a Spawn in each forked worker (which then serves); the template
    itself never returns: it exits 0 when droved closes the socket."""
    tsock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    droved = os.getppid()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing to drain here
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    warn_threads(log)
    if freeze:
        # Move every object the app made into the permanent generation: the
        # collector then neither scans nor writes them, and the pages stay
        # shared with the workers (bpo-31558).
        gc.collect()
        gc.freeze()
    tsock.send(f"DROVE-TEMPLATE {PROTOCOL_VERSION}".encode())
    forks = 0
    # Answers owed, oldest first: ("fork", intermediate pid, pipe) or
    # ("error", text). droved pairs answers with its asks in order.
    owed = []

    def settle_oldest():
        kind, *rest = owed.pop(0)
        if kind == "error":
            answer = rest[0]
        else:
            middle, r = rest
            os.waitpid(middle, 0)  # the worker is droved's child from here on
            pid = os.read(r, 32).decode()
            os.close(r)
            answer = f"pid {pid}".encode() if pid else b"error fork failed"
        try:
            tsock.send(answer)
        except OSError:
            pass  # droved is gone: the eof that follows ends us

    while True:
        if owed:
            # More asks already waiting (a scale-up asks for many at once):
            # fork the next while the last intermediate forks its worker
            # and exits, on the other core. Else settle what is owed.
            try:
                data = tsock.recv(512, socket.MSG_DONTWAIT)
            except BlockingIOError:
                settle_oldest()
                continue
            if len(owed) >= FORK_PIPELINE:
                settle_oldest()
        else:
            data = tsock.recv(512)
        msg = parse_message(data)
        if msg[0] == "eof":
            while owed:
                settle_oldest()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)  # droved is done with us: no atexit of the app's
        if msg[0] != "spawn":
            log(f"ignoring unknown message from droved: {msg[1]!r}")
            continue
        _, slot, generation = msg
        forks += 1
        # Else what the app buffered is written once per worker.
        sys.stdout.flush()
        sys.stderr.flush()
        r, w = os.pipe()
        try:
            middle = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            owed.append(("error", f"error fork: {e.strerror}".encode()[:500]))
            continue
        if middle == 0:  # the intermediate: fork the worker, report, leave
            try:
                worker = os.fork()
            except OSError:
                os._exit(1)
            if worker == 0:
                os.close(r)
                os.close(w)
                for _, *rest in owed:  # the template's, not this worker's
                    if len(rest) == 2:
                        os.close(rest[1])
                tsock.close()
                become_worker(droved, slot, generation)
                return Spawn(droved, slot, generation, forks)
            os.write(w, str(worker).encode())
            os._exit(0)
        os.close(w)
        owed.append(("fork", middle, r))


def become_worker(droved, slot, generation):
    """docs/template.md, "In the worker": wait to be droved's child, set
    PDEATHSIG again (fork cleared it), fix the environment, reseed."""
    deadline = time.monotonic() + REPARENT_TIMEOUT
    while os.getppid() != droved:
        if time.monotonic() > deadline:
            os._exit(1)  # droved is gone
        time.sleep(0.001)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != droved:  # droved died before the prctl
        os._exit(1)
    os.environ.update(
        LISTEN_PID=str(os.getpid()), DROVE_WORKER=slot, DROVE_GENERATION=generation
    )
    os.environ.pop("DROVE_TEMPLATE_FD", None)
    random.seed()  # CPython reseeds at fork too; the app's own RNGs may not
