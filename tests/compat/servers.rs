//! One test per server and listener kind, each the server's own
//! socket-activation support, unmodified, with the one line of config the
//! table of docs/guide/servers.md gives for it.

use std::path::Path;

use crate::matrix::*;

fn s(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| a.to_string()).collect()
}

fn examples() -> String {
    repo().join("examples").display().to_string()
}

fn app(name: &str) -> String {
    repo()
        .join("tests/compat/apps")
        .join(name)
        .display()
        .to_string()
}

/// gunicorn adopts LISTEN_FDS by itself (when LISTEN_PID is its pid) and
/// its arbiter sends READY=1. gunicorn 27 also opens a control socket at
/// one fixed path per user: a pool of arbiters must not each take it over.
fn gunicorn(name: &'static str, worker_args: &[&str], listener: Listener) -> Server {
    let mut command = vec![gunicorn_path(), "--no-control-socket".into()];
    command.extend(s(worker_args));
    command.extend(s(&["--chdir", &examples(), "wsgi_app:application"]));
    Server {
        name,
        version: Version::Cmd(vec![gunicorn_path(), "--version".into()]),
        ready: Ready::Notify,
        listener,
        command,
        env: vec![],
        extra: "",
        drops_in_flight: None,
    }
}

fn gunicorn_path() -> String {
    super::matrix::gunicorn()
}

#[test]
fn gunicorn_sync() {
    run(gunicorn("gunicorn (sync)", &["-w", "1"], Listener::Tcp));
}

#[test]
fn gunicorn_gthread() {
    run(gunicorn(
        "gunicorn (gthread)",
        &["-w", "1", "-k", "gthread", "--threads", "2"],
        Listener::Tcp,
    ));
}

#[test]
fn gunicorn_sync_unix_socket() {
    run(gunicorn("gunicorn (sync)", &["-w", "1"], Listener::Unix));
}

/// Puma adopts the activated sockets with `--bind-to-activated-sockets
/// only` (else it also binds its default 0.0.0.0:9292) and, with the
/// sd_notify gem, sends READY=1: the gem only understands a filesystem
/// NOTIFY_SOCKET (issue 18).
fn puma(listener: Listener) -> Server {
    Server {
        name: "Puma (single, 1 thread)",
        version: Version::Deb("puma"),
        ready: Ready::Notify,
        listener,
        command: vec![
            program("puma"),
            "--bind-to-activated-sockets".into(),
            "only".into(),
            "-t".into(),
            "1:1".into(),
            app("hello.ru"),
        ],
        env: vec![],
        extra: "",
        drops_in_flight: Some(
            "Puma 5.6 closes, at a graceful stop, a connection it accepted whose request had not arrived yet (drove-puma fixes it in template mode)",
        ),
    }
}

#[test]
fn puma_single() {
    run(puma(Listener::Tcp));
}

#[test]
fn puma_single_unix_socket() {
    run(puma(Listener::Unix));
}

/// uWSGI adopts LISTEN_FDS by itself ("SystemD socket activation
/// detected"); `--protocol http` makes the adopted sockets speak HTTP;
/// without a master, the process droved starts is the one that serves, and
/// it sends READY=1. A uWSGI worker takes SIGTERM as "die now" (requests in
/// flight are cut); its graceful stop is SIGHUP.
fn uwsgi(listener: Listener) -> Server {
    Server {
        name: "uWSGI (1 process, no master)",
        version: Version::Deb("uwsgi-core"),
        ready: Ready::Notify,
        listener,
        command: vec![
            program("uwsgi"),
            "--plugin".into(),
            "python3".into(),
            "--protocol".into(),
            "http".into(),
            "--need-app".into(),
            "--wsgi-file".into(),
            repo().join("examples/wsgi_app.py").display().to_string(),
        ],
        env: vec![],
        extra: "stop_signal = \"SIGHUP\"",
        drops_in_flight: None,
    }
}

#[test]
fn uwsgi_no_master() {
    run(uwsgi(Listener::Tcp));
}

#[test]
fn uwsgi_no_master_unix_socket() {
    run(uwsgi(Listener::Unix));
}

/// Twisted's `systemd:` endpoint adopts fd 3 (index 0); it does not speak
/// sd_notify, so exec mode. Debian names the program `twist3`. The app is a
/// plain twisted.web resource (`--class`), served from the reactor thread.
/// On SIGTERM Twisted stops its reactor and closes every connection, so
/// the requests in flight on a stopped worker are lost (with `--wsgi`, a
/// worker may also hang in its thread pool until SIGKILL): Twisted cannot
/// be reloaded without losing them, under drove or anything else.
fn twisted(listener: Listener) -> Server {
    let domain = match listener {
        Listener::Tcp => "INET",
        Listener::Unix => "UNIX",
    };
    Server {
        name: "Twisted (twist web)",
        version: Version::Deb("python3-twisted"),
        ready: Ready::Exec,
        listener,
        command: vec![
            program("twist3"),
            "web".into(),
            "--listen".into(),
            format!("systemd:domain={domain}:index=0"),
            "--class".into(),
            "hello_twisted.Hello".into(),
        ],
        env: vec![(
            "PYTHONPATH",
            repo().join("tests/compat/apps").display().to_string(),
        )],
        extra: "",
        drops_in_flight: Some("twist web closes connections in flight on SIGTERM"),
    }
}

#[test]
fn twisted_web() {
    run(twisted(Listener::Tcp));
}

/// Node.js listens on fd 3 with `server.listen({ fd: 3 })`; no sd_notify,
/// so exec mode.
fn node(listener: Listener) -> Server {
    Server {
        name: "Node.js (http, listen fd 3)",
        version: Version::Cmd(vec![program("node"), "--version".into()]),
        ready: Ready::Exec,
        listener,
        command: vec![program("node"), app("hello.js")],
        env: vec![],
        extra: "",
        drops_in_flight: None,
    }
}

#[test]
fn node_http() {
    run(node(Listener::Tcp));
}

#[test]
fn node_http_unix_socket() {
    run(node(Listener::Unix));
}

/// drove.gunicorn (python/drove): gunicorn's own worker class in drove's
/// template mode. The template reads gunicorn's options and loads the app
/// once; each worker is forked from it, a child of droved, and sends
/// READY=1 itself. From a checkout: PYTHONPATH=python.
fn gunicorn_template(name: &'static str, args: &[&str], dir: &str, app: &str) -> Server {
    let mut command = vec![
        venv_python(),
        "-m".into(),
        "drove.gunicorn".into(),
        "--no-control-socket".into(),
    ];
    command.extend(s(args));
    command.extend(s(&["--chdir", dir, app]));
    Server {
        name,
        version: Version::Cmd(vec![gunicorn_path(), "--version".into()]),
        ready: Ready::Notify,
        listener: Listener::Tcp,
        command,
        env: vec![("PYTHONPATH", repo().join("python").display().to_string())],
        extra: "mode = \"template\"",
        drops_in_flight: None,
    }
}

/// The venv's python3, where gunicorn and uvicorn-worker are installed.
pub fn venv_python() -> String {
    let gunicorn = gunicorn_path();
    Path::new(&gunicorn)
        .with_file_name("python3")
        .display()
        .to_string()
}

#[test]
fn gunicorn_template_sync() {
    run(gunicorn_template(
        "drove.gunicorn template (sync)",
        &[],
        &examples(),
        "wsgi_app:application",
    ));
}

#[test]
fn gunicorn_template_gthread() {
    run(gunicorn_template(
        "drove.gunicorn template (gthread)",
        &["-k", "gthread", "--threads", "2"],
        &examples(),
        "wsgi_app:application",
    ));
}

/// uvicorn's gunicorn worker (uvicorn-worker) with a Starlette app: ASGI.
#[test]
fn gunicorn_template_uvicorn() {
    run(gunicorn_template(
        "drove.gunicorn template (uvicorn, Starlette)",
        &["-k", "uvicorn_worker.UvicornWorker"],
        &repo().join("tests/compat/apps").display().to_string(),
        "hello_asgi:app",
    ));
}
