# SPDX-License-Identifier: MIT OR Apache-2.0
"""drove's Python adapters: run Python web apps as drove workers.

- `python3 -m drove.wsgi APP`: a standard-library WSGI worker;
- `python3 -m drove.gunicorn [gunicorn options] APP`: gunicorn's own worker
  classes (sync, gthread, uvicorn's ASGI worker, ...) in drove's template
  mode: the app is loaded once and droved forks warm workers from it.

See python/README.md and docs/template.md.
"""

__version__ = "0.1.0"
