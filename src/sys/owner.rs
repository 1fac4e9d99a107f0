//! Reading another process's /proc files as that process's owner.
//!
//! Some /proc files of a process (smaps_rollup, wchan, the links in fd/)
//! pass a ptrace access check (PTRACE_MODE_READ_FSCREDS): the reader's
//! file-system uid and gid must equal the target's real, effective and
//! saved ids, unless the reader has CAP_SYS_PTRACE. droved under the
//! packaged unit is root without CAP_SYS_PTRACE (and without
//! CAP_DAC_OVERRIDE), with workers of another user; so it takes the
//! worker's ids as its file-system ids for the read. setfsuid/setfsgid
//! act on the calling thread only and need CAP_SETUID/CAP_SETGID, which the
//! unit keeps for starting workers.

use std::io;
use std::os::unix::fs::MetadataExt;

use nix::unistd::{Gid, Pid, Uid, geteuid, setfsgid, setfsuid};

/// Whose /proc/PID is it: its effective uid and gid (root's when the
/// process is not dumpable, which no check of ours can pass anyway).
pub fn ids_of(pid: Pid) -> io::Result<(Uid, Gid)> {
    let meta = std::fs::metadata(format!("/proc/{pid}"))?;
    Ok((Uid::from_raw(meta.uid()), Gid::from_raw(meta.gid())))
}

/// Runs `read` with this thread's file-system ids set to `pid`'s owner's
/// when droved is root and the owner is someone else; restores them
/// before returning, whatever `read` did. Everything `read` opens must be
/// opened (and, for files checked at read time like wchan, read) inside.
pub fn as_owner_of<T>(pid: Pid, read: impl FnOnce() -> io::Result<T>) -> io::Result<T> {
    if !geteuid().is_root() {
        return read();
    }
    let (uid, gid) = ids_of(pid)?;
    if uid.is_root() && gid.as_raw() == 0 {
        return read();
    }
    let old_uid = setfsuid(uid);
    let old_gid = setfsgid(gid);
    let result = read();
    setfsgid(old_gid);
    setfsuid(old_uid);
    result
}
