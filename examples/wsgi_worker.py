# Run: systemd-socket-activate -l 127.0.0.1:8080 python3 examples/wsgi_worker.py
# SPDX-License-Identifier: MIT OR Apache-2.0
"""drove's standard-library WSGI worker, run from a checkout (or from a
copy next to an installed drove package): the program is drove.wsgi
(python/drove/wsgi.py; installed: `python3 -m drove.wsgi APP`).

    python3 examples/wsgi_worker.py [path/to/module.py:callable | package.module:callable]

Default app: wsgi_app.py next to this file, callable `application`. Same
command line in exec and template mode (docs/template.md).
"""

import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
# A checkout's own package first; else the installed one (the .deb/.rpm put
# it where the system's python3 finds it).
checkout = os.path.join(os.path.dirname(here), "python")
if os.path.isfile(os.path.join(checkout, "drove", "wsgi.py")):
    sys.path.insert(0, checkout)

from drove.wsgi import main  # noqa: E402

if __name__ == "__main__":
    main(default_app=os.path.join(here, "wsgi_app.py") + ":application")
