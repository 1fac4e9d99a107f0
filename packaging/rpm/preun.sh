# %preun of drove ($1: 0 on erase, 1 on upgrade): stop every instance when
# the package is erased; on upgrade, %post has already upgraded them in place.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    /usr/lib/drove/instances stop || :
fi
