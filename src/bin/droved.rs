//! droved: the drove supervisor daemon. Thin: parse arguments, assemble the
//! configuration, take or bind the listening sockets, run the supervisor.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;

use std::os::fd::OwnedFd;

use drove::bus::{self, BusKind};
use drove::config::{Config, ListenAddr, ListenSpec};
use drove::handover;
use drove::supervisor::{LoadFailure, Setup, Supervisor};
use drove::sys::listen::{self, Listener};
use drove::sys::spawn::Credentials;
use drove::sys::users;
use drove::sys::{exec, fdstore};

/// The embedded default: a demo pool of the Rust example worker on
/// 127.0.0.1:8080, used when droved gets neither a config nor a command.
const DEMO_CONFIG: &str = include_str!("../../examples/demo.toml");

fn drove_version() -> &'static str {
    Box::leak(drove::version().into_boxed_str())
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "droved",
    version = drove_version(),
    about = "Supervise a pre-forked pool of workers that share listening sockets",
    long_about = "Supervise a pre-forked pool of workers that share listening sockets.\n\n\
        Workers inherit the sockets as systemd socket activation passes them \
        (fds 3.., LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES) and accept on them directly. \
        Without a config file or command, droved runs a demo pool on 127.0.0.1:8080.",
    after_help = "Signals: HUP reload, TERM graceful stop, INT/QUIT fast stop, TTIN/TTOU one worker more/less."
)]
struct Args {
    /// Configuration file (TOML; see drove.toml(5)).
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address to listen on when systemd passes no sockets: HOST:PORT,
    /// [V6]:PORT or unix:/PATH. Repeatable; replaces listen.addresses.
    #[arg(short = 'l', long = "listen", value_name = "ADDR", value_parser = parse_listen)]
    listen: Vec<ListenAddr>,

    /// Minimum number of workers (overrides pool.min).
    #[arg(long, value_name = "N", conflicts_with = "workers")]
    min: Option<u32>,

    /// Maximum number of workers (overrides pool.max).
    #[arg(long, value_name = "N", conflicts_with = "workers")]
    max: Option<u32>,

    /// A fixed pool of N workers (min = max = N).
    #[arg(short = 'w', long = "workers", value_name = "N")]
    workers: Option<u32>,

    /// How workers are created: "exec" (fork+exec each one) or "template"
    /// (fork them from a loaded template; docs/template.md). Overrides
    /// worker.mode.
    #[arg(long, value_name = "MODE")]
    mode: Option<drove::config::WorkerMode>,

    /// When a worker counts as ready: "exec" (once started; a template's
    /// worker once forked) or "notify" (once it sends READY=1). Overrides
    /// worker.ready.
    #[arg(long, value_name = "WHEN")]
    ready: Option<drove::config::ReadyMode>,

    /// Validate the configuration and exit (0 when valid).
    #[arg(long)]
    check: bool,

    /// Like --check, and print the handover formats this binary reads (a
    /// running droved asks its successor this before a binary upgrade).
    #[arg(long, hide = true)]
    preflight: bool,

    /// Instance name, used in logs and the D-Bus name (default: the config
    /// file's stem, or "default").
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,

    /// Bus to serve the control interface org.drove.Drove1 on (default:
    /// system when started by systemd, else none). When given, failing to
    /// serve on it stops droved from starting; by default it only logs.
    #[arg(long, value_enum, value_name = "BUS")]
    bus: Option<BusChoice>,

    /// Worker command and arguments (overrides worker.command).
    #[arg(last = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BusChoice {
    System,
    Session,
    None,
}

impl Args {
    /// The bus to serve on; systemd sets INVOCATION_ID for every unit it
    /// starts (systemd.exec(5)).
    fn bus(&self) -> Option<BusKind> {
        match self.bus {
            Some(BusChoice::System) => Some(BusKind::System),
            Some(BusChoice::Session) => Some(BusKind::Session),
            Some(BusChoice::None) => None,
            None if std::env::var_os("INVOCATION_ID").is_some() => Some(BusKind::System),
            None => None,
        }
    }
}

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    s.parse::<ListenAddr>().map_err(|e| e.to_string())
}

impl Args {
    /// The configuration as files and flags say, validated for running.
    /// Also returns a warning for the journal (workers running as root).
    fn load_config(&self) -> anyhow::Result<(Config, Option<String>)> {
        let euid = nix::unistd::geteuid().as_raw();
        let mut config = match &self.config {
            // As root, whoever can write the file chooses what root runs.
            Some(path) if euid == 0 => Config::load_trusted(path, euid)?,
            Some(path) => Config::load(path)?,
            None if !self.command.is_empty() || !self.listen.is_empty() => Config::default(),
            None => Config::from_toml_str(DEMO_CONFIG, Path::new("<embedded demo config>"))?,
        };
        if !self.listen.is_empty() {
            config.listen.addresses = self.listen.iter().cloned().map(ListenSpec::from).collect();
        }
        if let Some(n) = self.workers {
            config.pool.min = n;
            config.pool.max = n;
            config.pool.initial = None;
        }
        if let Some(n) = self.min {
            config.pool.min = n;
        }
        if let Some(n) = self.max {
            config.pool.max = n;
        }
        if let Some(mode) = self.mode {
            config.worker.mode = mode;
        }
        if let Some(ready) = self.ready {
            config.worker.ready = ready;
        }
        if !self.command.is_empty() {
            config.worker.command = self.command.clone();
        }
        config.validate_runnable()?;
        // What start-up resolves, --check resolves too.
        socket_owner(&config)?;
        let credentials = Credentials::resolve(
            config.worker.user.as_deref(),
            config.worker.group.as_deref(),
        )
        .context("worker.user/worker.group")?;
        let worker_uid = credentials.map_or(euid, |c| c.uid.as_raw());
        // Started by systemd (the packaged root service): refuse root
        // workers unless the config asks for them; by hand: warn.
        let service = std::env::var_os("INVOCATION_ID").is_some();
        let warning = config.check_worker_uid(worker_uid, service)?;
        Ok((config, warning))
    }

    fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| {
            self.config
                .as_deref()
                .and_then(Path::file_stem)
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "default".into())
        })
    }
}

/// The owner of droved's unix socket files, by the same lookup as workers'
/// users (names or numeric ids).
fn socket_owner(config: &Config) -> anyhow::Result<users::SocketOwner> {
    let l = &config.listen;
    Ok(users::socket_owner(
        l.socket_user.as_deref(),
        l.socket_group.as_deref(),
    )?)
}

/// Binds the configured listeners, or takes them back from systemd's fd
/// store (`stored`); each bound now comes with its name in the store.
fn bind_listeners(
    config: &Config,
    stored: &mut fdstore::Stored,
) -> anyhow::Result<Vec<(Listener, Option<String>)>> {
    let l = &config.listen;
    let owner = socket_owner(config)?;
    l.addresses
        .iter()
        .map(|spec| {
            if let Some(kept) = stored.take(spec) {
                return Ok((kept, None));
            }
            match &spec.address {
                ListenAddr::Tcp(addr) => listen::bind_tcp(*addr, l.backlog, &spec.name),
                ListenAddr::Unix(path) => {
                    listen::bind_unix(path, l.backlog, &spec.name, l.socket_mode, owner)
                }
            }
            .map(|bound| (bound, Some(fdstore::store_name(&spec.address))))
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot open the listening sockets")
}

/// pool.idle_exit is refused unless systemd's socket unit can start
/// droved again after it exits.
fn check_idle_exit(config: &Config, socket_activated: bool) -> anyhow::Result<()> {
    if config.pool.idle_exit.is_some()
        && let Some(why) = drove::supervisor::ondemand::idle_exit_refusal(socket_activated)
    {
        bail!("{why}");
    }
    Ok(())
}

/// systemd's fd store for listeners droved binds itself: removes what it
/// should no longer keep, pushes what was bound now, and leaves socket
/// files in place at exit (a restarted droved takes the same socket back).
fn use_fd_store(listeners: &mut [(Listener, Option<String>)], stale: Vec<String>) {
    for name in stale {
        if let Err(e) = fdstore::remove(&name) {
            tracing::warn!(
                event = "fdstore",
                "cannot remove {name} from systemd's fd store: {e}"
            );
        }
    }
    let availability = fdstore::availability();
    let note = match availability {
        fdstore::Availability::Off => return,
        fdstore::Availability::Size(n) => {
            if (n as usize) < listeners.len() {
                tracing::warn!(
                    event = "fdstore",
                    "the unit's FileDescriptorStoreMax={n} holds fewer than droved's {} listeners; raise it",
                    listeners.len()
                );
            }
            ""
        }
        fdstore::Availability::Unknown => " (kept if the unit sets FileDescriptorStoreMax=)",
    };
    for (l, bound) in listeners.iter_mut() {
        if let Some(name) = bound {
            match fdstore::push(l, name) {
                Ok(()) => tracing::info!(
                    event = "fdstore",
                    "handed {}={} to systemd's fd store as {name}{note}",
                    l.name,
                    l.address
                ),
                Err(e) => tracing::warn!(
                    event = "fdstore",
                    "cannot hand {}={} to systemd's fd store: {e}; a restart of droved will bind it anew",
                    l.name,
                    l.address
                ),
            }
        } else {
            tracing::info!(
                event = "fdstore",
                "took {}={} back from systemd's fd store: connections waiting in its queue are kept",
                l.name,
                l.address
            );
        }
        // The socket outlives droved: its file must stay too.
        l.owned_path = None;
    }
}

/// `eprintln!` that cannot panic: with stderr on a full disk (or a closed
/// pipe) the message is lost, but the exit status still says what happened.
macro_rules! say_error {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    exec::ignore_control_signals();
    if drove::sys::process::is_namespace_init() {
        // PID 1 of a container: the kernel drops every signal PID 1 has no
        // handler for, so a SIGTERM before the supervisor's handlers exist
        // would be lost (and the runtime SIGKILLs us after its grace
        // period). Blocked, it waits; the supervisor unblocks it once its
        // handlers are in place, and stops the pool.
        if let Err(e) = exec::block_signals() {
            say_error!("droved: cannot block signals: {e}");
        }
    }
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let exe = std::env::current_exe();
    let args = Args::parse();
    // Take inherited fds first, before anything else opens an fd or starts
    // a thread: a previous droved's handover after an upgrade, else
    // systemd's sockets (sd_listen_fds(3)).
    let inherited = match std::env::var(handover::ENV_FD) {
        Ok(fd) => Inherited::Handover(Box::new(take_handover(&fd))),
        Err(_) => Inherited::Systemd(listen::systemd_fds()),
    };

    if args.preflight || args.check {
        // One-shot modes print and exit: a reader that went away (`droved
        // --check | true`) ends them quietly, as it does cat. The daemon
        // itself keeps SIGPIPE ignored (a closed socket must not kill it).
        exec::default_sigpipe();
    }
    if args.preflight {
        return match args.load_config() {
            Ok(_) => {
                println!("{}", handover::preflight_line());
                ExitCode::SUCCESS
            }
            Err(e) => {
                say_error!("droved: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if args.check {
        return match args.load_config() {
            Ok((config, warning)) => {
                println!(
                    "{}: OK ({} listen address{}, workers {}..{}, command {:?})",
                    args.config
                        .as_deref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "configuration".into()),
                    config.listen.addresses.len(),
                    if config.listen.addresses.len() == 1 {
                        ""
                    } else {
                        "es"
                    },
                    config.pool.min,
                    config.pool.max,
                    config.worker.command.join(" ")
                );
                // After the verdict (a closed stdout ends us before it).
                if let Some(w) = warning {
                    say_error!("droved: warning: {w}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                say_error!("droved: {e:#}");
                ExitCode::FAILURE
            }
        };
    }

    let sink = drove::logging::init();
    // From here on a panic (in a client's task, say) is one rate-limited
    // log line.
    drove::panics::install();
    if sink == drove::logging::Sink::Stderr && drove::logging::stderr_is_journal() {
        tracing::warn!(
            "the journal does not take messages now; logging to standard error (the journal stream) instead"
        );
    }
    let exe = match exe {
        // An upgrade execs the file it checked (sys::exec::Image); if the
        // path was replaced meanwhile, /proc/self/exe says "PATH (deleted)".
        // The next upgrade looks at PATH again.
        Ok(p) => p
            .to_str()
            .and_then(|s| s.strip_suffix(" (deleted)"))
            .map(PathBuf::from)
            .unwrap_or(p),
        Err(e) => {
            say_error!("droved: cannot find my own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(args, inherited, exe, argv) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            tracing::error!("{e:#}");
            say_error!("droved: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Fds this process inherited.
enum Inherited {
    /// From the previous droved image (binary upgrade).
    Handover(Box<anyhow::Result<(handover::State, Vec<Listener>, OwnedFd)>>),
    /// From systemd: socket activation, or listeners droved kept in
    /// systemd's fd store (named `fdstore::PREFIX`...), if any.
    Systemd(std::io::Result<Vec<(String, OwnedFd)>>),
}

/// Reads the state the previous image left and adopts its fds.
fn take_handover(fd: &str) -> anyhow::Result<(handover::State, Vec<Listener>, OwnedFd)> {
    let raw: i32 = fd
        .parse()
        .with_context(|| format!("{}={fd:?} is not an fd number", handover::ENV_FD))?;
    let bytes = exec::take_memfd(raw).context("cannot read the handover state")?;
    let state = handover::decode(&bytes)?;
    let listeners = state
        .listeners
        .iter()
        .map(|l| {
            let fd = exec::adopt_inherited(l.fd)?;
            let mut listener = Listener::from_fd(fd, l.name.clone())?;
            listener.owned_path = l.owned_path.clone();
            if l.owned_path.is_some() || listener.family == listen::Family::Unix {
                // bind_unix binds through /proc/self/fd/N (see there), which
                // is what getsockname says; the path is what we reported.
                listener.address = l.address.clone();
            }
            Ok(listener)
        })
        .collect::<std::io::Result<Vec<_>>>()
        .context("cannot adopt the listening sockets")?;
    let notify =
        exec::adopt_inherited(state.notify.fd).context("cannot adopt the notify socket")?;
    Ok((state, listeners, notify))
}

fn run(
    args: Args,
    inherited: Inherited,
    exe: PathBuf,
    argv: Vec<std::ffi::OsString>,
) -> anyhow::Result<i32> {
    let (config, warning) = args.load_config()?;
    if let Some(w) = warning {
        tracing::warn!(event = "root-workers", "{w}");
    }
    let (listeners, socket_activated, restored) = match inherited {
        Inherited::Handover(h) => {
            let (state, listeners, notify) = (*h).context("binary upgrade handover failed")?;
            // The handover says what the first image had.
            (listeners, state.socket_activated, Some((state, notify)))
        }
        Inherited::Systemd(fds) => {
            let fds = fds.context("cannot use the sockets passed by systemd")?;
            let (kept, activation): (Vec<_>, Vec<_>) = fds
                .into_iter()
                .partition(|(name, _)| name.starts_with(fdstore::PREFIX));
            let mut stored = fdstore::Stored::new(kept);
            if activation.is_empty() {
                check_idle_exit(&config, false)?;
                let mut bound = bind_listeners(&config, &mut stored)?;
                use_fd_store(&mut bound, stored.into_stale());
                (bound.into_iter().map(|(l, _)| l).collect(), false, None)
            } else {
                check_idle_exit(&config, true)?;
                // A socket unit now: what droved kept before is not needed.
                use_fd_store(&mut [], stored.into_stale());
                let fds = activation
                    .into_iter()
                    .map(|(name, fd)| Listener::from_fd(fd, name))
                    .collect::<std::io::Result<Vec<_>>>()
                    .context("cannot use the sockets passed by systemd")?;
                if !config.listen.addresses.is_empty() {
                    tracing::info!(
                        "using {} socket(s) passed by systemd; listen.addresses is ignored",
                        fds.len()
                    );
                }
                (fds, true, None)
            }
        }
    };
    if listeners.is_empty() {
        bail!(
            "no listening sockets: pass --listen ADDR, set listen.addresses, or start droved from a .socket unit"
        );
    }
    let metrics = bind_metrics(&config, restored.is_some())?;
    let instance = args.instance();
    let reload_args = args.clone();
    let args_for_control = args.clone();
    // Read once at start: a reload does not change who may control droved.
    let control_group = config.control.group.clone();
    let setup = Setup {
        config,
        load_config: Box::new(move || {
            let (config, warning) = reload_args.load_config().map_err(|e| LoadFailure {
                detail: format!("{e:#}"),
                // D-Bus callers get no value from the file: it may hold secrets.
                public: match e.downcast_ref::<drove::config::ConfigError>() {
                    Some(c) => c.redacted(),
                    None => format!("{e:#}"),
                },
            })?;
            if let Some(w) = warning {
                tracing::warn!(event = "root-workers", "{w}");
            }
            Ok(config)
        }),
        listeners,
        instance,
        exe,
        argv,
        restored,
        socket_activated,
        metrics: metrics.clone(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let supervisor = Supervisor::new(setup)?;
        metrics.serve(supervisor.handle().snapshot);
        let bus = start_control(
            &args_for_control,
            supervisor.handle(),
            supervisor.runtime_dir(),
            control_group,
        )
        .await?;
        let code = supervisor.run().await?;
        // The supervisor is gone: the bus task signals its last state
        // (stopping) and ends. Bounded, so a wedged bus cannot hold the exit.
        if let Some(bus) = bus {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), bus).await;
        }
        Ok(code)
    })
}

/// Binds `[metrics] listen` before any worker starts: an address that
/// cannot be bound stops droved with a message naming it. After a binary
/// upgrade the pool is already running, so there it only logs.
fn bind_metrics(config: &Config, upgraded: bool) -> anyhow::Result<drove::metrics::Metrics> {
    match drove::metrics::Metrics::bind(&config.metrics) {
        Ok(m) => Ok(m),
        Err(e) if upgraded => {
            tracing::error!("{e}; running without metrics until a reload binds it");
            Ok(drove::metrics::Metrics::default())
        }
        Err(e) => Err(e.into()),
    }
}

/// Starts the control front-ends that drive the supervisor through its
/// handle: D-Bus peer-to-peer on the private socket in `runtime_dir`
/// (always, whatever --bus says), and the bus. They live in tasks of the
/// runtime; the returned one is the bus connection's.
async fn start_control(
    args: &Args,
    handle: drove::supervisor::Handle,
    runtime_dir: Option<(PathBuf, bool)>,
    control_group: Option<String>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let access = bus::Access::new(control_group);
    bus::report_denials(access.clone());
    match runtime_dir {
        Some((dir, remove_dir)) => {
            if let Err(e) = bus::serve_private(&dir, remove_dir, handle.clone(), access.clone()) {
                tracing::error!(
                    "no private control socket in {}: {e}; drovectl can reach this droved only over D-Bus",
                    dir.display()
                );
            }
        }
        None => tracing::warn!(
            "no runtime directory, so no private control socket; drovectl can reach this droved only over D-Bus"
        ),
    }
    let Some(kind) = args.bus() else {
        return Ok(None);
    };
    match bus::serve(kind, handle, access).await {
        Ok(forwarding) => Ok(Some(forwarding)),
        // Asked for explicitly: no bus, no start.
        Err(e) if args.bus.is_some() => Err(e.into()),
        // Chosen by default under systemd: the pool matters more than its
        // remote control; run without it, and say so loudly.
        Err(e) => {
            tracing::error!(
                "{:#}; running without D-Bus control (pass --bus system to make this fatal, --bus none to silence it)",
                anyhow::Error::from(e)
            );
            Ok(None)
        }
    }
}
