//! Unix sockets in a private runtime directory, made so that no other local
//! user can interfere: the directory is opened without following symlinks
//! and refused unless it is droved's and its parent is writable by nobody
//! else; the socket is bound under a private temporary name inside it and
//! renamed into place with its final owner and mode, so a stale one left by
//! a crashed droved is replaced atomically and a live one (another droved)
//! is never touched. Used for droved's NOTIFY_SOCKET (`notify_socket`) and
//! its control socket (`control_socket`), side by side in one directory.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag, renameat};
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::stat::{FchmodatFlags, Mode, SFlag, fchmodat, fstat, fstatat, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, unlinkat};
use tracing::debug;

use super::notify_socket::{DIR_MODE, MAX_SUN_PATH, SOCKET_MODE, SOCKET_NAME};

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
pub(crate) fn systemd_runtime_directory() -> Option<PathBuf> {
    let v = std::env::var_os("RUNTIME_DIRECTORY")?;
    let first = v.as_bytes().split(|&b| b == b':').next()?;
    (first.first() == Some(&b'/')).then(|| PathBuf::from(OsStr::from_bytes(first)))
}

/// Removes `<dir>.<pid>` directories (see [`NotifySocket::bind_in`]) left by
/// droveds that were killed: ours, unlocked, with no live socket inside.
pub(crate) fn sweep_stale_siblings(dir: &Path) {
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
        // The notify socket, and the control socket beside it: both stale,
        // or the directory stays.
        let stale = |name: &str, kind: SockType| match fstatat(
            &*lock,
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Err(Errno::ENOENT) => true,
            Ok(_) if matches!(is_live(&path.join(name), kind), Ok(false)) => {
                unlinkat(&*lock, name, UnlinkatFlags::NoRemoveDir).is_ok()
            }
            _ => false,
        };
        if !stale(SOCKET_NAME, SockType::Datagram)
            || !stale(super::control_socket::SOCKET_NAME, SockType::Stream)
        {
            continue;
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
/// - `dir` is created if missing, opened without following a
///   symlink, and refused unless it is a directory owned by us whose parent
///   no one else can write to (so nobody can swap it under the path);
/// - it gets our uid, `group` and mode 0755, the socket mode 0660 and
///   `group`: reachable by us and that group only (connecting to a unix
///   socket takes write permission on its file; others may only look up
///   names in the directory);
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
    bind_private_with(dir, name, kind, Some(group), SOCKET_MODE, remove_dir)
}

/// [`bind_private`] with the socket's `mode` chosen by the caller, and
/// `group: None` to leave the directory's owner and mode as they are (the
/// socket keeps droved's own group): for a second socket beside the first.
pub fn bind_private_with(
    dir: &Path,
    name: &str,
    kind: SockType,
    group: Option<Gid>,
    mode: u32,
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

    if let Some(group) = group {
        nix::unistd::fchown(&*lock, None, Some(group))
            .map_err(|e| ctx("give the workers' group", e))?;
        nix::sys::stat::fchmod(&*lock, Mode::from_bits_truncate(DIR_MODE))
            .map_err(|e| ctx("set the mode of", e))?;
    }

    let tmp = format!(".{name}.tmp-{}", std::process::id());
    match unlinkat(&*lock, tmp.as_str(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(ctx(&format!("remove {tmp} in"), e)),
    }
    let fd = socket::socket(AddressFamily::Unix, kind, SockFlag::SOCK_CLOEXEC, None)?;
    let addr = UnixAddr::new(&via.join(&tmp)).map_err(|e| ctx("name a socket in", e))?;
    socket::bind(fd.as_raw_fd(), &addr).map_err(|e| ctx("bind a socket in", e))?;
    let finish = || -> Result<(), Errno> {
        if group.is_some() {
            fchownat(
                &*lock,
                tmp.as_str(),
                None,
                group,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
        }
        // No symlink can be there: the directory is ours, and only we may
        // write to it.
        fchmodat(
            &*lock,
            tmp.as_str(),
            Mode::from_bits_truncate(mode),
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
pub(crate) fn ensure_drove_parent(parent: &Path) -> io::Result<()> {
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
pub(crate) fn open_dir(path: &Path) -> Result<OwnedFd, Errno> {
    nix::fcntl::open(
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Whether a process is bound to the socket at `path` (a connect succeeds);
/// a stale file refuses the connection.
pub(crate) fn is_live(path: &Path, kind: SockType) -> io::Result<bool> {
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
