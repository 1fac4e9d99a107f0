# SPDX-License-Identifier: MIT OR Apache-2.0
"""gunicorn's worker classes in drove's template mode.

    python3 -m drove.gunicorn [gunicorn's options] APP_MODULE

droved execs this once per configuration generation as the template
(worker.mode = "template", docs/template.md). It reads gunicorn's
configuration exactly as gunicorn does (command line, gunicorn.conf.py,
GUNICORN_CMD_ARGS), loads the app once, and forks a worker for each of
droved's `spawn`s: each worker is gunicorn's own worker class (-k sync,
gthread, uvicorn_worker.UvicornWorker, ...) serving on droved's inherited
listening sockets. droved, not gunicorn's arbiter, then owns the pool: its
size, scaling, reloads, the watchdog and stopping.

The template takes the arbiter's place: the arbiter forks, then calls
`worker_class(age, ppid, sockets, app, timeout, cfg, log).init_process()`;
so does each fork here, with ppid = droved's pid (a worker whose parent
changes exits, as under gunicorn).

With mode = "exec" the same command line runs one worker in the process
droved starts (the app is then loaded by every worker).

Exit codes: 2 for options that cannot work under drove and for a process
not started by droved; 1 when the app cannot be loaded (its traceback is
on stderr); a worker exits like a gunicorn worker.
"""

import os
import sys
import traceback

from drove import _protocol

PROG = "python3 -m drove.gunicorn"
# How long a stopping uvicorn worker waits for the requests of connections
# it accepted but has not read yet (_adapt_uvicorn).
SHUTDOWN_READ_GRACE = 0.5

# The arbiter's hooks: droved does their work, nothing calls them here.
ARBITER_ONLY_HOOKS = (
    "on_starting",
    "on_reload",
    "when_ready",
    "pre_fork",
    "pre_exec",
    "nworkers_changed",
    "child_exit",
    "on_exit",
)


def log(msg):
    print(f"drove.gunicorn[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)


def die(msg, code=2):
    log(msg)
    sys.exit(code)


# ------------------------------------------------------------------ options


def incompatible_options(setting):
    """What in gunicorn's configuration cannot work under drove, each as a
    message naming the option and what to do instead. Pure: `setting(name)`
    returns (value, default) for a gunicorn setting's name."""
    errors = []
    workers, _ = setting("workers")
    if workers > 1:
        errors.append(
            f"workers = {workers} (-w/--workers, WEB_CONCURRENCY or gunicorn.conf.py): "
            "droved runs the pool, one gunicorn worker per process; size it with "
            "[pool] min/max in drove.toml and leave workers at 1"
        )
    bind, default_bind = setting("bind")
    if list(bind) != list(default_bind):
        errors.append(
            f"bind = {', '.join(bind)} (-b/--bind): droved owns the listening sockets; "
            "set them with [listen] addresses in drove.toml and drop --bind"
        )
    if setting("daemon")[0]:
        errors.append(
            "daemon = True (-D/--daemon): droved supervises the process it starts; "
            "it must not daemonize"
        )
    if setting("reload")[0]:
        errors.append(
            "reload = True (--reload): reload with `drovectl reload` (or SIGHUP to "
            "droved): a new template loads the new code and the workers roll over"
        )
    if setting("reuse_port")[0]:
        errors.append(
            "reuse_port = True (--reuse-port): it makes every worker bind its own "
            "socket; under drove the workers share droved's sockets"
        )
    dirty_workers, _ = setting("dirty_workers")
    dirty_apps, _ = setting("dirty_apps")
    if dirty_workers and dirty_apps:
        errors.append(
            f"dirty_workers = {dirty_workers} (--dirty-workers): the dirty arbiter is "
            "part of gunicorn's arbiter, which does not run under drove"
        )
    return errors


def worker_timeout(gunicorn_timeout, gunicorn_timeout_set, watchdog):
    """The timeout the worker class gets (half of it, as from gunicorn's
    arbiter: it heartbeats at least that often), the watchdog the worker
    announces to droved itself (WATCHDOG_USEC=, or None), and a note for
    the log when gunicorn's `timeout` and drove's watchdog disagree. Pure.

    Without drove's watchdog (worker.watchdog in drove.toml), gunicorn's
    `timeout` becomes it: the worker sends WATCHDOG_USEC=timeout and
    heartbeats, and droved kills it when it stops, as gunicorn's arbiter
    would. With drove's watchdog set, that wins: a worker that heartbeats
    on gunicorn's longer timeout would be killed while idle."""
    if watchdog is None:
        if not gunicorn_timeout:
            return 0, None, None  # timeout = 0: gunicorn's "no timeout"
        return gunicorn_timeout / 2.0, float(gunicorn_timeout), None
    note = None
    if gunicorn_timeout_set and abs(gunicorn_timeout - watchdog) > 1e-3:
        note = (
            f"gunicorn's timeout ({gunicorn_timeout:g} s) is replaced by drove's "
            f"watchdog ({watchdog:g} s, worker.watchdog in drove.toml)"
        )
    return watchdog / 2.0, None, note


# ------------------------------------------------------------------ gunicorn


def _application_class():
    from gunicorn.app.wsgiapp import WSGIApplication

    class DroveApplication(WSGIApplication):
        """gunicorn's own WSGIApplication: the same command line, config
        file and GUNICORN_CMD_ARGS, loaded the same way; only run() differs
        (no arbiter)."""

    return DroveApplication


class Template:
    """Stands in for gunicorn's arbiter as the `server` argument of the
    hooks that run in a worker (post_fork, worker_exit)."""

    def __init__(self, app, cfg, log, listeners, worker_class, timeout):
        self.app = app
        self.cfg = cfg
        self.log = log
        self.LISTENERS = listeners
        self.WORKERS = {}
        self.worker_class = worker_class
        self.timeout = timeout
        self.num_workers = 1
        self.pid = os.getpid()
        self.proc_name = cfg.proc_name
        self.address = cfg.address


def drove_worker_class(base, notifier):
    """`base` (the configured worker class), with drove's side of the
    contract: READY=1 once it is about to serve, WATCHDOG=1 from its
    heartbeat, STOPPING=1 when it ends on its own (max_requests, SIGTERM,
    its parent gone)."""

    class DroveWorker(base):
        _drove_alive = True
        _drove_aborting = False

        # gunicorn's worker classes stop by setting `alive` to False (on
        # SIGTERM, SIGINT/SIGQUIT, max_requests, a new parent): say
        # STOPPING=1 at that moment, so droved starts the replacement while
        # this one drains, not after.
        @property
        def alive(self):
            return self._drove_alive

        @alive.setter
        def alive(self, value):
            if self._drove_alive and not value and self.booted and not self._drove_aborting:
                notifier.send("STOPPING=1")
            self._drove_alive = value

        def handle_abort(self, sig, frame):
            self._drove_aborting = True  # an abort is a failure, not a stop
            super().handle_abort(sig, frame)

        def notify(self):
            super().notify()
            notifier.ping()

        def run(self):
            if _is_uvicorn(self):
                _adapt_uvicorn(notifier)
            else:
                notifier.send("READY=1")
            super().run()
            # Returned, not raised: a planned end (said already by the
            # `alive` setter, unless a worker class stops another way).
            notifier.send("STOPPING=1")

    DroveWorker.__name__ = base.__name__
    DroveWorker.__qualname__ = base.__qualname__
    DroveWorker.__module__ = base.__module__
    return DroveWorker


def _is_uvicorn(worker):
    config = getattr(worker, "config", None)
    return type(config).__module__.startswith("uvicorn.")


def _adapt_uvicorn(notifier):
    """Two changes to uvicorn's server, in this worker process only:

    - READY=1 once it has started: uvicorn's worker runs the app's lifespan
      startup inside run(), so not before;
    - on shutdown (SIGTERM, max_requests): STOPPING=1, stop accepting, and
      let the connections it has already accepted deliver their request
      before it closes the idle ones. uvicorn alone closes a connection
      whose request it has not read yet; under drove the listening socket
      stays open (other workers serve it), so that client would get a
      reset instead of an answer. Bounded by SHUTDOWN_READ_GRACE."""
    import asyncio

    import uvicorn.server

    server_class = uvicorn.server.Server
    startup, shutdown = server_class.startup, server_class.shutdown

    async def started(server, *args, **kwargs):
        await startup(server, *args, **kwargs)
        if server.started:
            notifier.send("READY=1")

    async def drained(server, *args, **kwargs):
        notifier.send("STOPPING=1")  # droved starts the replacement now
        for s in getattr(server, "servers", []):
            s.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_READ_GRACE
        while loop.time() < deadline and any(
            getattr(c, "cycle", True) is None for c in server.server_state.connections
        ):
            await asyncio.sleep(0.005)
        await shutdown(server, *args, **kwargs)

    server_class.startup = started
    server_class.shutdown = drained


def warm_up(worker_class, app, glog):
    """Import in the template what a worker would import at every start.
    uvicorn's worker loads its config (HTTP, websocket and lifespan
    protocol modules, the event loop's) in each worker: ~100 ms per fork
    when not done once here."""
    if not worker_class.__module__.startswith("uvicorn"):
        return
    try:
        from uvicorn.config import Config

        kwargs = dict(getattr(worker_class, "CONFIG_KWARGS", {}))
        config = Config(app=app, log_config=None, **kwargs)
        config.load()
        config.get_loop_factory()
    except Exception as e:  # only a warm-up: each worker loads its own
        glog.debug("warming up uvicorn in the template failed: %s", e)


def run_worker(template, notifier, ppid, age):
    """The arbiter's spawn_worker, the child side: run the worker class
    until it ends, with gunicorn's exit codes and hooks."""
    from gunicorn import util
    from gunicorn.arbiter import Arbiter
    from gunicorn.errors import AppImportError

    cfg, glog = template.cfg, template.log
    cls = drove_worker_class(template.worker_class, notifier)
    worker = cls(age, ppid, template.LISTENERS, template.app, template.timeout, cfg, glog)
    worker.pid = os.getpid()
    try:
        util._setproctitle(f"worker [{template.proc_name}]")
        glog.info("Booting worker with pid: %s", worker.pid)
        cfg.post_fork(template, worker)
        worker.init_process()
        sys.exit(0)
    except SystemExit:
        raise
    except AppImportError as e:
        glog.debug("Exception while loading the application", exc_info=True)
        print(f"{e}", file=sys.stderr, flush=True)
        sys.exit(Arbiter.APP_LOAD_ERROR)
    except Exception as e:
        glog.exception("Exception in worker process")
        print(f"{e}", file=sys.stderr, flush=True)
        sys.exit(-1 if worker.booted else Arbiter.WORKER_BOOT_ERROR)
    finally:
        glog.info("Worker exiting (pid: %s)", worker.pid)
        try:
            worker.tmp.close()
            cfg.worker_exit(template, worker)
        except Exception:
            glog.warning("Exception during worker exit:\n%s", traceback.format_exc())


def main(argv=None):
    if argv is not None:
        sys.argv = [sys.argv[0]] + list(argv)
    try:
        import gunicorn
        from gunicorn import sock, util
    except ImportError:
        die(
            f"gunicorn is not installed for {sys.executable}: "
            "pip install gunicorn (in the venv whose python3 drove.toml runs)",
            1,
        )

    # gunicorn's own parsing: --help, --version and config errors as usual.
    application = _application_class()(
        "%(prog)s [OPTIONS] [APP_MODULE]", prog=PROG
    )
    cfg = application.cfg
    if cfg.print_config or cfg.check_config:
        application.run()  # prints/loads, then exits like gunicorn

    def setting(name):
        s = cfg.settings[name]
        return s.value, s.default

    errors = incompatible_options(setting)
    if errors:
        for e in errors:
            log(f"cannot run under drove: {e}")
        sys.exit(2)

    try:
        template_fd = _protocol.parse_template_fd(os.environ)
        fds = _protocol.parse_listen_fds(os.environ, os.getpid())
    except _protocol.ContractError as e:
        die(
            f"{e}.\n{PROG} is a drove worker: droved starts it with its listening "
            "sockets (and, with [worker] mode = \"template\", DROVE_TEMPLATE_FD). "
            "Run it from drove.toml's [worker] command, or run gunicorn itself "
            "outside drove"
        )

    # What the arbiter does before it forks (Arbiter.__init__/setup,
    # Application.run).
    if cfg.pythonpath:
        for path in cfg.pythonpath.split(","):
            path = os.path.abspath(path)
            if path not in sys.path:
                sys.path.insert(0, path)
    os.environ["SERVER_SOFTWARE"] = gunicorn.SERVER_SOFTWARE
    for k, v in (cfg.env or {}).items():
        os.environ[k] = v
    glog = cfg.logger_class(cfg)
    try:
        listeners = sock.create_sockets(cfg, glog, [fd for fd, _ in fds])
    except Exception as e:
        die(f"cannot use droved's listening sockets: {e}")
    for lnr, (_, name) in zip(listeners, fds):
        util.close_on_exec(lnr.fileno())  # the app's own children get none
        glog.info("Listening at: %s (%s, from droved)", lnr, name)
    try:
        watchdog = _protocol.parse_watchdog_usec(os.environ, os.getpid())
    except _protocol.ContractError as e:
        die(str(e))
    timeout_setting = cfg.settings["timeout"]
    timeout, announce, note = worker_timeout(
        cfg.timeout, timeout_setting.value != timeout_setting.default, watchdog
    )
    if note:
        log(note)

    # Load the app once. (With the collector off during the import it was
    # no faster here, within noise, and an app making cyclic garbage at
    # import would only grow: it stays on.)
    util._setproctitle(f"template [{cfg.proc_name}]")
    worker_class = cfg.worker_class  # imports it (uvicorn's too) here, once
    if hasattr(worker_class, "check_config"):
        worker_class.check_config(cfg, glog)
    glog.info("Using worker: %s", cfg.worker_class_str)
    try:
        application.wsgi()
    except Exception:
        traceback.print_exc()
        die(f"cannot load the app {application.app_uri!r}", 1)
    warm_up(worker_class, application.wsgi(), glog)
    template = Template(application, cfg, glog, listeners, worker_class, timeout)

    if template_fd is None:  # exec mode: this process is the worker
        ppid, age = os.getppid(), 1
    else:
        spawn = _protocol.serve_template(template_fd, log)  # returns in a worker
        ppid, age = spawn.droved, spawn.number
    template.pid = ppid  # the hooks' server.pid: the worker's parent, droved
    notifier = _protocol.Notifier(log)
    if announce is not None:
        # gunicorn's timeout is the watchdog: droved learns it from us.
        notifier.send(f"WATCHDOG_USEC={int(announce * 1_000_000)}")
        watchdog = announce
    if watchdog is not None:
        notifier.watchdog_every(watchdog)
    run_worker(template, notifier, ppid, age)


if __name__ == "__main__":
    main()
