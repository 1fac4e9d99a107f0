# %post of drove ($1: 1 on install, 2 or more on upgrade). The units are
# templates: enabling and starting is per instance and the operator's. On
# upgrade, running instances re-exec the new droved in place (same PID, no
# connection dropped) instead of restarting.
# The unprivileged user the example config runs workers as
# (worker.user = "drove-worker"): no login, no home, its own group.
if ! getent passwd drove-worker >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /sbin/nologin --comment "drove worker pool" drove-worker || :
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -ge 2 ]; then
        /usr/lib/drove/instances upgrade || :
    fi
fi
