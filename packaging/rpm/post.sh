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
# The Python adapters (python3 -m drove.gunicorn, drove.wsgi) live in
# /usr/lib/drove/python: site-packages is per Python version here, so a
# .pth file in this python3's puts them on its path (postun removes it).
if command -v python3 >/dev/null 2>&1; then
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))' 2>/dev/null) \
        && mkdir -p "$site" && echo /usr/lib/drove/python > "$site/drove.pth" || :
fi
