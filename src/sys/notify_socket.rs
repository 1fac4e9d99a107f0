//! droved's own NOTIFY_SOCKET, where workers send sd_notify(3) datagrams.
//!
//! A datagram socket at a filesystem path, like systemd's own
//! `/run/systemd/notify`, because small client libraries (Ruby's sd_notify
//! gem, under Puma) do not understand an `@` abstract address. It lives in
//! droved's runtime directory: `$RUNTIME_DIRECTORY` when systemd gives one,
//! else `/run/drove/<instance>/` as root, else
//! `$XDG_RUNTIME_DIR/drove/<instance>/`. Directory (0750) and socket (0660)
//! belong to droved's uid and the workers' group, so no other local user can
//! reach it: an abstract socket can be flooded by anyone.
//!
//! The directory is opened without following symlinks and refused unless it
//! is ours and its parent is writable by nobody else; the socket is bound
//! under a private temporary name inside it and renamed into place, so it
//! appears with its final owner and mode, and a stale one left by a crashed
//! droved is replaced atomically. A live one (another droved serving the
//! same instance name) is left alone: this droved then uses a directory of
//! its own, `<dir>.<pid>`. The path and inode survive a binary upgrade (the
//! fd is handed over) and the socket is removed when droved exits. Only when
//! no directory is usable does droved fall back to an abstract socket, and
//! says so.
//!
//! SO_PASSCRED makes the kernel tell us each sender's uid and pid. Datagrams
//! from a uid other than droved's, root's or the workers' are dropped before
//! anything else is looked at, then those from pids that are not workers;
//! both are counted and summarised in one log line at most every
//! [`REPORT_EVERY`], never logged one by one (except at trace level). Any fds a sender attaches
//! (SCM_RIGHTS) are closed at once, never kept.

use std::ffi::OsStr;
use std::io::{self, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag, renameat};
use nix::sys::socket::{
    self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, unlinkat};
use tokio::io::unix::AsyncFd;
use tracing::{debug, info, trace, warn};

use crate::sys::spawn::Credentials;

/// Largest datagram we accept (systemd uses a 4 KiB page too); longer ones
/// are truncated by the kernel and then dropped by us.
pub const MAX_DATAGRAM: usize = 4096;

/// The socket's name inside its directory.
pub const SOCKET_NAME: &str = "notify";

/// At most one summary line about ignored datagrams per this interval.
pub const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Datagrams dropped in a row before `recv` lets other work run.
const DROP_BUDGET: u32 = 256;

/// sun_path is 108 bytes with its NUL.
const MAX_SUN_PATH: usize = 107;

const DIR_MODE: u32 = 0o750;
const SOCKET_MODE: u32 = 0o660;

/// One received datagram.
#[derive(Debug)]
pub struct Datagram {
    /// Sender pid from SCM_CREDENTIALS; `None` if the kernel sent none.
    pub pid: Option<i32>,
    pub bytes: Vec<u8>,
    /// The datagram was longer than [`MAX_DATAGRAM`] (it is cut off).
    pub truncated: bool,
    /// How many fds the sender attached (all already closed).
    pub fds_dropped: usize,
}

/// Datagrams dropped before they reached the supervisor, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ignored {
    /// From a uid that is neither droved's, root's nor the workers'.
    pub other_users: u64,
    /// From an accepted uid but a pid that is not a worker (or without
    /// credentials).
    pub not_workers: u64,
}

/// Who may send: droved's own uid, root, and every uid workers were
/// started as (grow-only: workers of an older configuration may still run).
#[derive(Debug)]
struct Filter {
    uids: Vec<u32>,
    ignored: Ignored,
    /// Per kind (not workers, other users): the count at the last summary
    /// line and when it was written.
    reported: [(u64, Option<Instant>); 2],
}

impl Filter {
    fn new(workers: Option<&Credentials>) -> Filter {
        let mut f = Filter {
            uids: vec![0, Uid::effective().as_raw()],
            ignored: Ignored::default(),
            reported: [(0, None); 2],
        };
        f.admit(workers);
        f
    }

    fn admit(&mut self, workers: Option<&Credentials>) {
        if let Some(c) = workers
            && !self.uids.contains(&c.uid.as_raw())
        {
            self.uids.push(c.uid.as_raw());
        }
    }

    fn uid_ok(&self, uid: u32) -> bool {
        self.uids.contains(&uid)
    }

    /// Counts a dropped datagram, from another user (`foreign`: its uid and
    /// pid) or not; returns the summary line to log if one of its kind is
    /// due (the first at once, then at most one per [`REPORT_EVERY`]), and
    /// whether it concerns other users (a warning).
    fn count(&mut self, foreign: Option<(u32, i32)>, now: Instant) -> Option<(String, bool)> {
        let total = match foreign {
            Some(_) => {
                self.ignored.other_users += 1;
                self.ignored.other_users
            }
            None => {
                self.ignored.not_workers += 1;
                self.ignored.not_workers
            }
        };
        let (last_count, last_at) = &mut self.reported[usize::from(foreign.is_some())];
        if last_at.is_some_and(|t| now.duration_since(t) < REPORT_EVERY) {
            return None;
        }
        let since = last_at
            .map(|t| format!(" in the last {}s", now.duration_since(t).as_secs()))
            .unwrap_or_default();
        let n = total - *last_count;
        (*last_count, *last_at) = (total, Some(now));
        let next = REPORT_EVERY.as_secs();
        Some(match foreign {
            Some((uid, pid)) => (
                format!(
                    "ignored {n} notify datagram(s) from other users{since} (latest uid {uid}, pid {pid}); {total} since start, next summary in {next}s at the earliest"
                ),
                true,
            ),
            None => (
                format!(
                    "ignored {n} notify datagram(s) from processes that are not workers{since}; {total} since start, next summary in {next}s at the earliest"
                ),
                false,
            ),
        })
    }
}

/// A socket file created by [`bind_private`], to remove when done.
#[derive(Debug)]
pub struct SocketFile {
    pub path: PathBuf,
    /// Device and inode of the file, so we never remove someone else's.
    pub id: (u64, u64),
    /// Remove the directory too (under its lock, if empty): droved's own,
    /// not one systemd manages (`$RUNTIME_DIRECTORY`).
    pub remove_dir: bool,
}

pub struct NotifySocket {
    fd: AsyncFd<OwnedFd>,
    /// Value for NOTIFY_SOCKET: `/run/drove/web/notify`, or `@drove/…` in
    /// the fallback.
    pub address: String,
    file: Option<SocketFile>,
    filter: Mutex<Filter>,
}

impl NotifySocket {
    /// Creates droved's NOTIFY_SOCKET for `instance` in the first usable
    /// runtime directory, reachable by `workers` (their uid and group; droved's
    /// own when `None`); the abstract namespace only when none is usable.
    pub fn open(instance: &str, workers: Option<&Credentials>) -> io::Result<NotifySocket> {
        let runtime = std::env::var_os("RUNTIME_DIRECTORY");
        let xdg = std::env::var_os("XDG_RUNTIME_DIR");
        let dirs = candidate_dirs(
            runtime.as_deref(),
            xdg.as_deref(),
            Uid::effective().is_root(),
            instance,
        );
        let mut tried = Vec::new();
        for dir in &dirs {
            match NotifySocket::bind_in(dir, workers) {
                Ok(sock) => {
                    if tried.is_empty() {
                        info!("notify socket for workers: {}", sock.address);
                    } else {
                        warn!(
                            "notify socket for workers: {}, since {}",
                            sock.address,
                            tried.join("; ")
                        );
                    }
                    return Ok(sock);
                }
                Err(e) => tried.push(format!("{}: {e}", dir.display())),
            }
        }
        let sock = NotifySocket::bind_abstract("notify", workers)?;
        warn!(
            "no runtime directory is usable for the workers' NOTIFY_SOCKET ({}); falling back to the abstract socket {}, which clients that need a path (Ruby's sd_notify) cannot reach and any local user can send to (their datagrams are dropped by uid). Run droved as root, under systemd with RuntimeDirectory=, or with XDG_RUNTIME_DIR set",
            if tried.is_empty() {
                "none to try".to_string()
            } else {
                tried.join("; ")
            },
            sock.address
        );
        Ok(sock)
    }

    /// Creates the socket in `dir` (made if missing; its parent must exist),
    /// or, when a live droved already serves `dir`, in `<dir>.<pid>`.
    pub fn bind_in(dir: &Path, workers: Option<&Credentials>) -> io::Result<NotifySocket> {
        let group = workers.map(|c| c.gid).unwrap_or_else(Gid::effective);
        let remove_dir = Some(dir) != systemd_runtime_directory().as_deref();
        let first = bind_private(dir, SOCKET_NAME, SockType::Datagram, group, remove_dir);
        sweep_stale_siblings(dir);
        let (fd, file) = match first? {
            Bound::Ours(fd, file) => (fd, file),
            Bound::Busy => {
                let mut own = dir.as_os_str().to_owned();
                own.push(format!(".{}", std::process::id()));
                let own = PathBuf::from(own);
                warn!(
                    "{} is in use by another droved with the same instance name; using {}",
                    dir.join(SOCKET_NAME).display(),
                    own.display()
                );
                match bind_private(&own, SOCKET_NAME, SockType::Datagram, group, true)? {
                    Bound::Ours(fd, file) => (fd, file),
                    Bound::Busy => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            format!("{} is in use", own.join(SOCKET_NAME).display()),
                        ));
                    }
                }
            }
        };
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        nonblocking(&fd)?;
        Ok(NotifySocket {
            fd: register(fd)?,
            address: file.path.display().to_string(),
            file: Some(file),
            filter: Mutex::new(Filter::new(workers)),
        })
    }

    /// Binds a fresh abstract socket named after droved's pid and `tag` (the
    /// fallback; any local user can reach it).
    pub fn bind_abstract(tag: &str, workers: Option<&Credentials>) -> io::Result<NotifySocket> {
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!("drove/{}/{tag}-{nonce:08x}", std::process::id());
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )?;
        let addr = UnixAddr::new_abstract(name.as_bytes())?;
        socket::bind(fd.as_raw_fd(), &addr)?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        Ok(NotifySocket {
            fd: register(fd)?,
            address: format!("@{name}"),
            file: None,
            filter: Mutex::new(Filter::new(workers)),
        })
    }

    /// Re-wraps the socket inherited across a binary upgrade: same fd, same
    /// path, same inode.
    pub fn from_fd(
        fd: OwnedFd,
        address: String,
        workers: Option<&Credentials>,
    ) -> io::Result<NotifySocket> {
        nonblocking(&fd)?;
        socket::setsockopt(&fd, sockopt::PassCred, &true)?;
        let file = match address.starts_with('/') {
            false => None,
            true => match nix::sys::stat::lstat(address.as_str()) {
                Ok(st) => {
                    let path = PathBuf::from(&address);
                    let remove_dir = path.parent() != systemd_runtime_directory().as_deref();
                    Some(SocketFile {
                        id: (st.st_dev, st.st_ino),
                        path,
                        remove_dir,
                    })
                }
                // Keep supervising: the workers already running lost their
                // way to notify, which the watchdog and ready_timeout report.
                Err(e) => {
                    warn!(
                        "the notify socket file {address} handed over by the previous binary is gone ({e}); workers cannot notify until droved restarts"
                    );
                    None
                }
            },
        };
        Ok(NotifySocket {
            fd: register(fd)?,
            address,
            file,
            filter: Mutex::new(Filter::new(workers)),
        })
    }

    /// Lets workers started as `workers` send (after a reload changed
    /// worker.user/group): their uid is accepted from now on, and the
    /// directory and socket move to their group. Workers of the previous
    /// group cannot reach the socket any more; the rollout replaces them.
    pub fn admit(&self, workers: Option<&Credentials>) {
        self.filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(workers);
        let Some(file) = &self.file else { return };
        let group = workers.map(|c| c.gid).unwrap_or_else(Gid::effective);
        let Some(dir) = file.path.parent() else {
            return;
        };
        let result = open_dir(dir).and_then(|d| {
            let st = fstat(&d)?;
            if st.st_gid == group.as_raw() {
                return Ok(false);
            }
            nix::unistd::fchown(&d, None, Some(group))?;
            fchownat(
                &d,
                SOCKET_NAME,
                None,
                Some(group),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            Ok(true)
        });
        match result {
            Ok(false) => {}
            Ok(true) => warn!(
                "notify socket {} now belongs to group {group}: workers still running as another group cannot send to it until they are replaced",
                file.path.display()
            ),
            Err(e) => warn!(
                "cannot give the workers' group {group} access to {}: {e}; new workers may not reach NOTIFY_SOCKET",
                file.path.display()
            ),
        }
    }

    pub fn raw_fd(&self) -> RawFd {
        self.fd.get_ref().as_raw_fd()
    }

    pub fn borrowed_fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }

    /// Datagrams dropped so far (other users, and pids that are not workers).
    pub fn ignored(&self) -> Ignored {
        self.filter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ignored
    }

    /// Waits for the next datagram from an accepted uid, whatever its pid.
    pub async fn recv(&self) -> io::Result<Datagram> {
        self.recv_from(|_| true).await
    }

    /// Waits for the next datagram from an accepted uid and a pid for which
    /// `is_worker` holds. Others are dropped and counted at the cost of one
    /// recvmsg(2) each, yielding to other work every [`DROP_BUDGET`] of them.
    pub async fn recv_from(&self, mut is_worker: impl FnMut(i32) -> bool) -> io::Result<Datagram> {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut dropped = 0u32;
        loop {
            let mut guard = self.fd.readable().await?;
            let got = match guard.try_io(|fd| recv_one(fd.get_ref().as_raw_fd(), &mut buf)) {
                Ok(result) => result?,
                Err(_would_block) => continue,
            };
            drop(guard);
            let verdict = {
                let mut filter = self.filter.lock().unwrap_or_else(|e| e.into_inner());
                let foreign = match got.cred {
                    Some((uid, pid)) if !filter.uid_ok(uid) => Some(Some((uid, pid))),
                    Some((_, pid)) if is_worker(pid) => None,
                    _ => Some(None),
                };
                // One line each only at trace level, for tests and
                // debugging; a static level check when it is off.
                match (foreign, got.cred) {
                    (Some(Some((uid, pid))), _) => {
                        trace!("notify datagram from another user ignored (uid {uid}, pid {pid})")
                    }
                    (Some(None), Some((uid, pid))) => trace!(
                        "notify datagram from a pid that is not a worker ignored (pid {pid}, uid {uid})"
                    ),
                    (Some(None), None) => trace!("notify datagram without credentials ignored"),
                    (None, _) => {}
                }
                foreign.map(|who| filter.count(who, Instant::now()))
            };
            match verdict {
                None => {
                    buf.truncate(got.len.min(MAX_DATAGRAM));
                    return Ok(Datagram {
                        pid: got.cred.map(|(_, pid)| pid),
                        bytes: buf,
                        truncated: got.truncated,
                        fds_dropped: got.fds_dropped,
                    });
                }
                Some(Some((line, true))) => warn!("{line}"),
                Some(Some((line, false))) => debug!("{line}"),
                Some(None) => {}
            }
            dropped += 1;
            if dropped.is_multiple_of(DROP_BUDGET) {
                tokio::task::yield_now().await;
            }
        }
    }
}

impl Drop for NotifySocket {
    /// Removes the socket file (and a directory of our own), if the path
    /// still names our socket. Not run across an upgrade's exec.
    fn drop(&mut self) {
        if let Some(file) = &self.file
            && let Err(e) = remove_socket(file)
        {
            warn!("cannot remove {}: {e}", file.path.display());
        }
    }
}

/// Removes a socket file made by [`bind_private`] if its path still names
/// it, and its directory if asked and empty, under the directory's lock so
/// a droved starting meanwhile never binds into a removed directory.
pub fn remove_socket(file: &SocketFile) -> io::Result<()> {
    let (Some(dir), Some(name)) = (file.path.parent(), file.path.file_name()) else {
        return Ok(());
    };
    let lock = Flock::lock(open_dir(dir)?, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
    match fstatat(&*lock, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if (st.st_dev, st.st_ino) == file.id => {
            unlinkat(&*lock, name, UnlinkatFlags::NoRemoveDir)?;
        }
        // Not ours any more: leave it, and the directory.
        _ => return Ok(()),
    }
    if file.remove_dir {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            r => r?,
        }
    }
    Ok(())
}

/// `$RUNTIME_DIRECTORY` (its first entry), which systemd removes itself.
fn systemd_runtime_directory() -> Option<PathBuf> {
    let v = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = v.as_bytes().split(|&b| b == b':').next()?;
    (first.first() == Some(&b'/')).then(|| PathBuf::from(OsStr::from_bytes(first)))
}

/// Removes `<dir>.<pid>` directories (see [`NotifySocket::bind_in`]) left by
/// droveds that were killed: ours, unlocked, with no live socket inside.
fn sweep_stale_siblings(dir: &Path) {
    let (Some(parent), Some(leaf)) = (dir.parent(), dir.file_name()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let mut prefix = leaf.to_owned();
    prefix.push(".");
    let me = format!(".{}", std::process::id());
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.as_bytes().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        if pid.is_empty()
            || !pid.iter().all(u8::is_ascii_digit)
            || name.as_bytes().ends_with(me.as_bytes())
        {
            continue;
        }
        let path = parent.join(&name);
        let Ok(fd) = open_dir(&path) else { continue };
        if fstat(&fd).map_or(true, |st| st.st_uid != Uid::effective().as_raw()) {
            continue;
        }
        let Ok(lock) = Flock::lock(fd, FlockArg::LockExclusiveNonblock) else {
            continue;
        };
        let socket = path.join(SOCKET_NAME);
        match fstatat(
            &*lock,
            SOCKET_NAME,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Err(Errno::ENOENT) => {}
            Ok(_) if matches!(is_live(&socket, SockType::Datagram), Ok(false)) => {
                let _ = unlinkat(&*lock, SOCKET_NAME, UnlinkatFlags::NoRemoveDir);
            }
            _ => continue,
        }
        if std::fs::remove_dir(&path).is_ok() {
            debug!("removed {}, left by a droved that is gone", path.display());
        }
    }
}

/// Where droved looks for its runtime directory, in order.
pub fn candidate_dirs(
    runtime_directory: Option<&OsStr>,
    xdg_runtime_dir: Option<&OsStr>,
    root: bool,
    instance: &str,
) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    // systemd passes a colon-separated list when several are configured.
    if let Some(first) = runtime_directory
        .and_then(|v| v.as_bytes().split(|&b| b == b':').next())
        .filter(|p| p.first() == Some(&b'/'))
    {
        dirs.push(PathBuf::from(OsStr::from_bytes(first)));
    }
    let name = path_component(instance);
    if root {
        dirs.push(Path::new("/run/drove").join(&name));
    } else if let Some(x) = xdg_runtime_dir.filter(|x| x.as_bytes().first() == Some(&b'/')) {
        dirs.push(Path::new(x).join("drove").join(&name));
    }
    // Room for "/notify" and the ".<pid>" of a second droved's directory.
    let room = MAX_SUN_PATH - 1 - SOCKET_NAME.len() - 8;
    dirs.retain(|d| d.as_os_str().len() <= room);
    dirs
}

/// The instance name as one short, safe path component: bytes outside
/// `[A-Za-z0-9._@+-]` become `_`, a leading dot too, and a name longer than
/// 48 bytes is cut and suffixed with a hash of the whole, so distinct long
/// names stay distinct.
pub fn path_component(instance: &str) -> String {
    let mut s: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._@+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() || s.starts_with('.') {
        s.insert(0, '_');
    }
    if s.len() > 48 {
        // FNV-1a: stable across builds (DefaultHasher is not).
        let hash = instance.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        s.truncate(32);
        s.push_str(&format!("-{hash:016x}"));
    }
    s
}

/// What [`bind_private`] made of a path.
pub enum Bound {
    /// A fresh socket at the path, with its file's identity.
    Ours(OwnedFd, SocketFile),
    /// A live socket (another process is bound there) was left alone.
    Busy,
}

/// Creates a unix socket `dir/name` of `kind`, safely even in hostile
/// surroundings:
/// - `dir` is created (0750) if missing, opened without following a
///   symlink, and refused unless it is a directory owned by us whose parent
///   no one else can write to (so nobody can swap it under the path);
/// - it gets our uid, `group` and mode 0750, the socket mode 0660 and
///   `group`: reachable by us and that group only;
/// - the socket is bound under a temporary name through the opened
///   directory (/proc/self/fd), given its owner and mode, then renamed over
///   `name`: a stale socket there is replaced atomically; a live one (a
///   connect succeeds) is left alone and [`Bound::Busy`] returned; any other
///   kind of file there is an error;
/// - all of it under an exclusive flock of the directory, so two processes
///   doing this at once cannot both take the path.
///
/// `remove_dir` says whether [`remove_socket`] should remove the directory
/// socket). Datagram and stream sockets work; a stream socket still needs
/// listen(2).
pub fn bind_private(
    dir: &Path,
    name: &str,
    kind: SockType,
    group: Gid,
    remove_dir: bool,
) -> io::Result<Bound> {
    let ctx = |what: &str, e: Errno| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot {what} {}: {e}", dir.display()),
        )
    };
    let path = dir.join(name);
    if path.as_os_str().len() > MAX_SUN_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is longer than a socket path may be", path.display()),
        ));
    }
    let parent = dir.parent().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no parent directory", dir.display()),
        )
    })?;
    let leaf = dir.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not end in a name", dir.display()),
        )
    })?;
    let me = Uid::effective();
    // The parent: create it if it is /run/drove or $XDG_RUNTIME_DIR/drove.
    if parent.file_name() == Some(OsStr::new("drove")) {
        ensure_drove_parent(parent)?;
    }
    let parent_fd = open_dir(parent).map_err(|e| ctx("open the parent of", e))?;
    let pst = fstat(&parent_fd).map_err(|e| ctx("inspect the parent of", e))?;
    if (pst.st_uid != 0 && pst.st_uid != me.as_raw()) || pst.st_mode & 0o022 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} may be changed by other users (owner uid {}, mode {:o}); refusing to keep a socket below it",
                parent.display(),
                pst.st_uid,
                pst.st_mode & 0o7777
            ),
        ));
    }
    // A directory found empty is removed by the droved leaving it (or by a
    // sweep), under its lock: start over if it went in between.
    let mut attempts = 0;
    let (lock, st) = loop {
        attempts += 1;
        match mkdirat(&parent_fd, leaf, Mode::from_bits_truncate(0o700)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(ctx("create", e)),
        }
        let dir_fd = match nix::fcntl::openat(
            &parent_fd,
            leaf,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Err(Errno::ENOENT) if attempts < 5 => continue,
            r => r.map_err(|e| ctx("open (it must be a directory, not a symlink)", e))?,
        };
        let lock = Flock::lock(dir_fd, FlockArg::LockExclusive).map_err(|(_, e)| ctx("lock", e))?;
        let st = fstat(&*lock).map_err(|e| ctx("inspect", e))?;
        if st.st_nlink > 0 || attempts >= 5 {
            break (lock, st);
        }
    };
    if st.st_uid != me.as_raw() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to droved's uid {me}; refusing to use it",
                dir.display(),
                st.st_uid
            ),
        ));
    }
    if st.st_nlink == 0 {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} was removed meanwhile", dir.display()),
        ));
    }
    let via = PathBuf::from(format!("/proc/self/fd/{}", lock.as_raw_fd()));
    let via = if via.exists() { via } else { dir.to_path_buf() };

    // Is a socket already at the path, and is anybody bound to it?
    match fstatat(&*lock, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(ctx(&format!("inspect {name} in"), e)),
        Ok(f) if SFlag::from_bits_truncate(f.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFSOCK => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Ok(_) => {
            if is_live(&via.join(name), kind)? {
                return Ok(Bound::Busy);
            }
        }
    }

    nix::unistd::fchown(&*lock, None, Some(group))
        .map_err(|e| ctx("give the workers' group", e))?;
    nix::sys::stat::fchmod(&*lock, Mode::from_bits_truncate(DIR_MODE))
        .map_err(|e| ctx("set the mode of", e))?;

    let tmp = format!(".{name}.tmp-{}", std::process::id());
    match unlinkat(&*lock, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(ctx(&format!("remove {tmp} in"), e)),
    }
    let fd = socket::socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(&via.join(&tmp)).map_err(|e| ctx("name a socket in", e))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| ctx("bind a socket in", e))?;
    let finish = || -> Result<(), Errno> {
        fchownat(
            &*lock,
            tmp.as_str(),
            None,
            Some(group),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        // No symlink can be there: the directory is ours and 0750.
        fchmodat(
            &*lock,
            tmp.as_str(),
            Mode::from_bits_truncate(SOCKET_MODE),
            FchmodatFlags::FollowSymlink,
        )?;
        renameat(&*lock, tmp.as_str(), &*lock, name)
    };
    if let Err(e) = finish() {
        let _ = unlinkat(&*lock, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        return Err(ctx(&format!("put the socket {name} in place in"), e));
    }
    let f = fstatat(&*lock, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| ctx(&format!("inspect {name} in"), e))?;
    Ok(Bound::Ours(
        fd,
        SocketFile {
            path,
            id: (f.st_dev, f.st_ino),
            remove_dir,
        },
    ))
}

/// Creates `/run/drove` (0755, as root) or `$XDG_RUNTIME_DIR/drove` (0700)
/// if missing.
fn ensure_drove_parent(parent: &Path) -> io::Result<()> {
    let (Some(up), Some(leaf)) = (parent.parent(), parent.file_name()) else {
        return Ok(());
    };
    let mode = if Uid::effective().is_root() {
        0o755
    } else {
        0o700
    };
    let up_fd = open_dir(up).map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot open {}: {e}", up.display()),
        )
    })?;
    match mkdirat(&up_fd, leaf, Mode::from_bits_truncate(mode)) {
        Ok(()) | Err(Errno::EEXIST) => Ok(()),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot create {}: {e}", parent.display()),
        )),
    }
}

/// Opens a directory for *at() calls without following a final symlink.
fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Whether a process is bound to the socket at `path` (a connect succeeds);
/// a stale file refuses the connection.
fn is_live(path: &Path, kind: SockType) -> io::Result<bool> {
    let probe = socket::socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(path)?;
    match socket::connect(probe.as_raw_fd(), &addr) {
        Ok(()) => Ok(true),
        Err(Errno::ECONNREFUSED) => Ok(false),
        Err(e) => Err(io::Error::new(
            io::Error::from(e).kind(),
            format!("cannot check whether {} is in use: {e}", path.display()),
        )),
    }
}

fn nonblocking(fd: &OwnedFd) -> io::Result<()> {
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )?;
    Ok(())
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd stays open and returns the same fd number until the
    // AsyncFd (its only owner) drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

/// What recvmsg(2) told us about one datagram (its bytes are in the buffer).
struct Received {
    /// Sender uid and pid from SCM_CREDENTIALS.
    cred: Option<(u32, i32)>,
    len: usize,
    truncated: bool,
    fds_dropped: usize,
}

fn recv_one(fd: RawFd, buf: &mut Vec<u8>) -> io::Result<Received> {
    buf.resize(MAX_DATAGRAM, 0);
    let mut cmsg = nix::cmsg_space!(libc::ucred, [RawFd; 16]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut cred = None;
    let mut fds_dropped = 0;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::ScmCredentials(c) => cred = Some((c.uid(), c.pid())),
            ControlMessageOwned::ScmRights(fds) => {
                for raw in fds {
                    // SAFETY: the kernel just installed this fd in our table
                    // for this message; nobody else knows it. Dropping closes it.
                    drop(unsafe { OwnedFd::from_raw_fd(raw) });
                    fds_dropped += 1;
                }
            }
            _ => {}
        }
    }
    let len = msg.bytes;
    let truncated = len > MAX_DATAGRAM || msg.flags.contains(MsgFlags::MSG_TRUNC);
    Ok(Received {
        cred,
        len,
        truncated,
        fds_dropped,
    })
}

/// A socket for droved's own messages to systemd's NOTIFY_SOCKET.
///
/// Sends never block: if the receiver's queue is full (a busy or wedged
/// service manager), the message is dropped and the caller told, rather
/// than stalling the supervisor and with it every worker's supervision.
pub struct UpwardSocket {
    fd: OwnedFd,
    addr: UnixAddr,
}

impl UpwardSocket {
    pub fn new(address: &str) -> io::Result<UpwardSocket> {
        let fd = socket::socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = match address.strip_prefix('@') {
            Some(name) => UnixAddr::new_abstract(name.as_bytes())?,
            None => UnixAddr::new(address)?,
        };
        Ok(UpwardSocket { fd, addr })
    }

    pub fn send(&self, payload: &[u8]) -> io::Result<()> {
        socket::sendto(
            self.fd.as_raw_fd(),
            payload,
            &self.addr,
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )?;
        Ok(())
    }
}

/// CLOCK_MONOTONIC in microseconds (for RELOADING=1's MONOTONIC_USEC).
pub fn monotonic_usec() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixDatagram;

    /// A private scratch directory (0755, so it passes the parent check).
    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("drove-ns-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[tokio::test(flavor = "current_thread")]
    async fn receives_with_sender_pid_and_drops_fds() {
        let dir = scratch("recv");
        let sock = NotifySocket::bind_in(&dir.join("rt"), None).unwrap();
        assert_eq!(sock.address, dir.join("rt/notify").display().to_string());
        let tx = UpwardSocket::new(&sock.address).unwrap();
        tx.send(b"READY=1\nSTATUS=hi").unwrap();
        let d = sock.recv().await.unwrap();
        assert_eq!(d.pid, Some(std::process::id() as i32));
        assert_eq!(d.bytes, b"READY=1\nSTATUS=hi");
        assert!(!d.truncated);

        // Oversized datagrams are flagged, not silently accepted.
        tx.send(&vec![b'x'; MAX_DATAGRAM + 100]).unwrap();
        let d = sock.recv().await.unwrap();
        assert!(d.truncated);

        // Attached fds are closed, not leaked.
        let marker = dir.join("fd-marker");
        let file = std::fs::File::create(&marker).unwrap();
        let tx = UnixDatagram::unbound().unwrap();
        let addr = UnixAddr::new(sock.address.as_str()).unwrap();
        let fds = [file.as_raw_fd()];
        let cmsg = [socket::ControlMessage::ScmRights(&fds)];
        let iov = [std::io::IoSlice::new(b"FDSTORE=1")];
        socket::sendmsg(tx.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), Some(&addr)).unwrap();
        drop(file);
        let d = sock.recv().await.unwrap();
        assert_eq!(d.fds_dropped, 1);
        let still_open = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .any(|target| target == marker);
        assert!(!still_open, "the passed fd was closed");

        // Datagrams from pids that are not workers are dropped and counted.
        let tx = UpwardSocket::new(&sock.address).unwrap();
        tx.send(b"READY=1").unwrap();
        tx.send(b"STATUS=worker").unwrap();
        let mut n = 0;
        let d = sock
            .recv_from(|_| {
                n += 1;
                n > 1
            })
            .await
            .unwrap();
        assert_eq!(d.bytes, b"STATUS=worker");
        assert_eq!(sock.ignored().not_workers, 1);
        assert_eq!(sock.ignored().other_users, 0);

        // The file goes with the socket.
        let path = PathBuf::from(&sock.address);
        drop(sock);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn private_socket_file_owner_mode_and_replacement() {
        let dir = scratch("private");
        let rt = dir.join("rt");
        let group = Gid::from_raw(1);
        let Bound::Ours(fd, file) =
            bind_private(&rt, "s", SockType::Datagram, group, false).unwrap()
        else {
            panic!("fresh directory is busy")
        };
        let dm = std::fs::metadata(&rt).unwrap();
        assert_eq!(
            (dm.uid(), dm.gid(), dm.mode() & 0o7777),
            (Uid::effective().as_raw(), 1, 0o750)
        );
        let sm = std::fs::symlink_metadata(&file.path).unwrap();
        assert!(sm.file_type().is_socket());
        assert_eq!((sm.gid(), sm.mode() & 0o7777), (1, 0o660));
        assert_eq!(file.id, (sm.dev(), sm.ino()));

        // Live: left alone.
        assert!(matches!(
            bind_private(&rt, "s", SockType::Datagram, group, false).unwrap(),
            Bound::Busy
        ));
        // Stale: replaced by a new inode.
        drop(fd);
        let Bound::Ours(_fd, again) =
            bind_private(&rt, "s", SockType::Datagram, group, false).unwrap()
        else {
            panic!("stale socket not replaced")
        };
        assert_ne!(again.id, file.id);
        // No temporary names left behind.
        let names: Vec<_> = std::fs::read_dir(&rt)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("s")]);

        // A file that is not a socket is not ours to replace.
        std::fs::write(rt.join("f"), b"data").unwrap();
        let err = bind_private(&rt, "f", SockType::Datagram, group, false)
            .err()
            .unwrap();
        assert!(err.to_string().contains("not a socket"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_symlinks_foreign_directories_and_open_parents() {
        let dir = scratch("hostile");
        let target = dir.join("elsewhere");
        std::fs::create_dir(&target).unwrap();
        std::os::unix::fs::symlink(&target, dir.join("link")).unwrap();
        let err = bind_private(
            &dir.join("link"),
            "s",
            SockType::Datagram,
            Gid::effective(),
            false,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0);

        if Uid::effective().is_root() {
            let foreign = dir.join("foreign");
            std::fs::create_dir(&foreign).unwrap();
            nix::unistd::chown(&foreign, Some(Uid::from_raw(65534)), None).unwrap();
            let err = bind_private(&foreign, "s", SockType::Datagram, Gid::effective(), false)
                .err()
                .unwrap();
            assert!(err.to_string().contains("belongs to uid 65534"), "{err}");
        }

        let open = dir.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let err = bind_private(
            &open.join("rt"),
            "s",
            SockType::Datagram,
            Gid::effective(),
            false,
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("other users"), "{err}");
        assert!(!open.join("rt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_second_droved_of_the_same_instance_gets_its_own_directory() {
        let dir = scratch("second");
        let rt = dir.join("rt");
        let first = NotifySocket::bind_in(&rt, None).unwrap();
        let second = NotifySocket::bind_in(&rt, None).unwrap();
        assert_eq!(first.address, rt.join("notify").display().to_string());
        let own = format!("{}.{}/notify", rt.display(), std::process::id());
        assert_eq!(second.address, own);
        drop(second);
        assert!(!Path::new(&own).exists());
        assert!(
            !Path::new(&own).parent().unwrap().exists(),
            "own directory removed"
        );
        drop(first);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn candidate_directories_and_names() {
        let none = candidate_dirs(None, None, false, "web");
        assert!(none.is_empty());
        assert_eq!(
            candidate_dirs(Some(OsStr::new("/run/drove/web:/run/x")), None, true, "web"),
            vec![
                PathBuf::from("/run/drove/web"),
                PathBuf::from("/run/drove/web")
            ]
        );
        assert_eq!(
            candidate_dirs(None, Some(OsStr::new("/run/user/1000")), false, "beta 2/ü"),
            vec![PathBuf::from("/run/user/1000/drove/beta_2__")]
        );
        // Too long for sun_path with "/notify": skipped.
        let long = format!("/{}", "x".repeat(120));
        assert_eq!(
            candidate_dirs(Some(OsStr::new(&long)), None, true, "a"),
            vec![PathBuf::from("/run/drove/a")]
        );
        assert_eq!(path_component(".."), "_..");
        assert_eq!(path_component(""), "_");
        let a = path_component(&"a".repeat(100));
        let b = path_component(&format!("{}b", "a".repeat(99)));
        assert_eq!(a.len(), 32 + 17);
        assert_ne!(a, b);
    }

    #[test]
    fn ignored_datagrams_are_summarised_at_most_every_interval() {
        let mut f = Filter::new(None);
        assert!(f.uid_ok(0) && f.uid_ok(Uid::effective().as_raw()));
        assert!(!f.uid_ok(4242));
        let creds = Credentials {
            uid: Uid::from_raw(4242),
            gid: Gid::from_raw(4242),
            groups: vec![],
        };
        f.admit(Some(&creds));
        assert!(f.uid_ok(4242));
        let t = Instant::now();
        let (line, warn) = f.count(None, t).unwrap();
        assert!(
            !warn
                && line.starts_with(
                    "ignored 1 notify datagram(s) from processes that are not workers;"
                ),
            "{line}"
        );
        // The first of the other kind is not held back by the first.
        let (line, warn) = f.count(Some((777, 12)), t).unwrap();
        assert!(warn && line.starts_with("ignored 1 notify datagram(s) from other users (latest uid 777, pid 12); 1 since start"), "{line}");
        for i in 0..1000 {
            assert!(
                f.count(Some((777, i)), t + Duration::from_millis(i as u64))
                    .is_none()
            );
        }
        assert!(f.count(None, t + REPORT_EVERY / 2).is_none());
        let (line, _) = f.count(Some((778, 5)), t + REPORT_EVERY).unwrap();
        assert!(line.starts_with("ignored 1001 notify datagram(s) from other users in the last 10s (latest uid 778, pid 5); 1002 since start"), "{line}");
        let (line, _) = f.count(None, t + REPORT_EVERY).unwrap();
        assert!(line.starts_with("ignored 2 notify datagram(s) from processes that are not workers in the last 10s; 3 since start"), "{line}");
        assert_eq!(
            f.ignored,
            Ignored {
                other_users: 1002,
                not_workers: 3
            }
        );
    }
}
