# %postun of drove ($1: 0 on erase, 1 on upgrade). On erase, also drop the
# enablement symlinks of instances (their units are gone) and /etc/drove if
# only rpm's files were in it; the operator's own files are kept.
if [ "$1" -eq 0 ]; then
    find /etc/systemd/system -maxdepth 2 -type l -name 'drove@*' -delete 2>/dev/null || :
    rmdir --ignore-fail-on-non-empty /etc/drove 2>/dev/null || :
    if command -v python3 >/dev/null 2>&1; then
        site=$(python3 -c 'import sysconfig; print(sysconfig.get_path("purelib"))' 2>/dev/null) \
            && rm -f "$site/drove.pth" || :
    fi
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
