# gunicorn configuration file for the compatibility suite (tests/compat):
# every server hook appends "<hook> <pid>" to the file $HOOKS_LOG, so a
# test can see which hooks drove.gunicorn calls, and in which process.
#   python3 -m drove.gunicorn -c gunicorn_hooks.conf.py APP
# SPDX-License-Identifier: MIT OR Apache-2.0
import os


def _note(hook):
    with open(os.environ["HOOKS_LOG"], "a") as f:
        f.write(f"{hook} {os.getpid()}\n")


# Called in the workers.
def post_fork(server, worker):
    _note("post_fork")


def post_worker_init(worker):
    _note("post_worker_init")


def pre_request(worker, req):
    _note("pre_request")


def post_request(worker, req, environ, resp):
    _note("post_request")


def worker_int(worker):
    _note("worker_int")


def worker_abort(worker):
    _note("worker_abort")


def worker_exit(server, worker):
    _note("worker_exit")


# gunicorn's arbiter's own: under drove nothing calls them.
def on_starting(server):
    _note("on_starting")


def when_ready(server):
    _note("when_ready")


def pre_fork(server, worker):
    _note("pre_fork")


def on_exit(server):
    _note("on_exit")
