//! Re-executing droved in place for a binary upgrade: the fds to keep, the
//! state memfd, the signal mask across `execve`.
//!
//! Invariants: listeners and the worker notify socket are CLOEXEC except
//! for the instant of the upgrade exec, when they (and the state memfd) are
//! made inheritable; if `execve` fails, CLOEXEC is restored and the memfd
//! closed. Catchable signals are blocked across `execve` so one arriving in
//! the window stays pending (the mask and pending set survive exec) instead
//! of meeting a default disposition; the new image unblocks them once its
//! handlers are installed.

use std::ffi::{CString, OsString};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

/// Marks `fd` inheritable across exec (`keep = true`) or not.
pub fn set_inheritable(fd: BorrowedFd<'_>, keep: bool) -> io::Result<()> {
    let flags = if keep {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    fcntl(fd, FcntlArg::F_SETFD(flags))?;
    Ok(())
}

/// An inheritable memfd holding `bytes`, positioned at the start.
pub fn memfd_with(bytes: &[u8]) -> io::Result<OwnedFd> {
    let fd = nix::sys::memfd::memfd_create(c"drove-handover", nix::sys::memfd::MFdFlags::empty())?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekSet)?;
    Ok(OwnedFd::from(file))
}

/// Reads the handover memfd named by its number, and closes it.
pub fn take_memfd(raw: RawFd) -> io::Result<Vec<u8>> {
    // Refuse anything that is not an open fd before taking ownership.
    fcntl(unsafe_free_borrow(raw)?, FcntlArg::F_GETFD)?;
    // SAFETY: the previous image passed this fd number for us alone to
    // read; nothing else in this process knows or owns it.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    let mut bytes = Vec::new();
    nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekSet)?;
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Takes ownership of an fd inherited from the previous image and makes it
/// CLOEXEC again.
pub fn adopt_inherited(raw: RawFd) -> io::Result<OwnedFd> {
    fcntl(unsafe_free_borrow(raw)?, FcntlArg::F_GETFD)?;
    // SAFETY: the handover state names this fd as ours; it is open (checked
    // above) and adopted exactly once.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    set_inheritable(fd.as_fd(), false)?;
    Ok(fd)
}

fn unsafe_free_borrow(raw: RawFd) -> io::Result<BorrowedFd<'static>> {
    if raw < 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "negative fd"));
    }
    // SAFETY: only used for an fcntl(F_GETFD) probe, which is harmless on
    // any number; a closed fd yields EBADF.
    Ok(unsafe { BorrowedFd::borrow_raw(raw) })
}

/// Catchable signals droved handles: blocked across the exec window.
fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        set.add(sig);
    }
    set
}

pub fn block_signals() -> io::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_signals()), None)?;
    Ok(())
}

pub fn unblock_signals() -> io::Result<()> {
    pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&handled_signals()), None)?;
    Ok(())
}

/// The new droved binary of an upgrade, opened once: the preflight runs
/// this file and the exec replaces the process with this file, so a
/// package manager replacing the path in between cannot make droved exec
/// an image that was never checked.
#[derive(Debug)]
pub struct Image {
    file: OwnedFd,
    path: PathBuf,
}

impl Image {
    /// Opens the regular file at `path` (CLOEXEC; read-only).
    pub fn open(path: &Path) -> io::Result<Image> {
        let file = nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot open {}: {e}", path.display()),
            )
        })?;
        let st = nix::sys::stat::fstat(&file)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(Image {
            file,
            path: path.to_path_buf(),
        })
    }

    /// The path it was opened at (what droved reports).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs this very file, through `/proc/self/fd/N` in
    /// the child (argv[0] stays the path). The fd is made inheritable in
    /// the child only, so a `#!` script, whose interpreter opens that path
    /// after exec, runs as well. tokio waits for the child by its pid:
    /// spawn it through `process::fork_held`, or droved's sweep of exited
    /// children may take its status first.
    pub fn command(&self) -> tokio::process::Command {
        let raw = self.file.as_raw_fd();
        let mut cmd = tokio::process::Command::new(format!("/proc/self/fd/{raw}"));
        cmd.arg0(&self.path);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls fcntl(2), which is async-signal-safe; `raw` is open there
        // (inherited through fork) and owned by this Image in the parent.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Replaces the process image with this file (execveat(2) with
    /// AT_EMPTY_PATH). Returns only on failure. The fd stays CLOEXEC, so
    /// the new image does not inherit it; a `#!` script therefore cannot be
    /// exec'd this way (ENOENT, before anything is lost).
    pub fn exec(&self, argv: &[OsString], env: &[(OsString, OsString)]) -> io::Error {
        match exec_strings(argv, env) {
            Ok((argv, env)) => match nix::unistd::execveat(
                &self.file,
                c"",
                &argv,
                &env,
                nix::fcntl::AtFlags::AT_EMPTY_PATH,
            ) {
                Err(e) => io::Error::from(e),
            },
            Err(e) => e,
        }
    }
}

type CStrings = (Vec<CString>, Vec<CString>);

fn exec_strings(argv: &[OsString], env: &[(OsString, OsString)]) -> io::Result<CStrings> {
    let to_c = |b: Vec<u8>| {
        CString::new(b).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
    };
    let argv = argv
        .iter()
        .map(|a| to_c(a.clone().into_vec()))
        .collect::<io::Result<Vec<_>>>()?;
    let env = env
        .iter()
        .map(|(k, v)| {
            let mut kv = k.clone().into_vec();
            kv.push(b'=');
            kv.extend(v.clone().into_vec());
            to_c(kv)
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok((argv, env))
}

/// Restores SIGPIPE's default action, which Rust programs start with
/// ignored: a command-line tool whose reader went away (`drovectl list |
/// head -1`) should end quietly, as cat or systemctl do, not panic on EPIPE.
pub fn default_sigpipe() {
    // SAFETY: SIG_DFL installs no handler code; it only changes the
    // disposition, before any thread exists.
    let _ =
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) };
}

/// Ignores the control signals (HUP, USR2, TTIN, TTOU) until droved's own
/// handlers replace this: their default actions (terminate, stop) would
/// kill or freeze a droved that is signalled while it starts up. TERM, INT
/// and QUIT keep their defaults: before there are workers, dying is right
/// (except as PID 1, which the kernel does not let them kill: droved then
/// blocks them until the supervisor handles them; see droved's main).
pub fn ignore_control_signals() {
    for sig in [
        Signal::SIGHUP,
        Signal::SIGUSR2,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
    ] {
        // SAFETY: SIG_IGN installs no handler code, so no async-signal
        // safety question arises; it only changes the disposition.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn image_runs_the_file_opened_not_what_is_at_the_path_later() {
        let dir = std::env::temp_dir().join(format!("drove-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("prog");
        let write = |body: &str| {
            use std::os::unix::fs::PermissionsExt;
            let tmp = dir.join("prog.new");
            std::fs::write(&tmp, format!("#!/bin/sh\necho {body} \"$0\"\n")).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        write("checked");
        let image = Image::open(&path).unwrap();
        write("replaced");
        let out = image.command().output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("checked "), "{text}");
        assert_eq!(image.path(), path);
        assert!(
            Image::open(&dir)
                .unwrap_err()
                .to_string()
                .contains("not a regular file")
        );
        assert!(Image::open(&dir.join("none")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
