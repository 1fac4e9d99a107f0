//! Template mode, the pure part: the template's states, the forks asked of
//! it, the protocol's messages (docs/template.md) and the decisions about
//! templates, all without I/O and table-tested here. `template_io` carries
//! them out.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::oneline::{OneLine, one_line};
use crate::sys::process::ExitStatus;

/// The protocol version this droved speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// How long a ready template may take to answer a `spawn`.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stopping template gets before SIGKILL (it only forks; it has
/// nothing to drain).
pub const TEMPLATE_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// When droved says what it waits for, if no hello has come by then: a
/// template that loads slowly (or never speaks) is not left to guess.
pub const HELLO_NOTE_AFTER: Duration = Duration::from_secs(5);

/// How long a template that closed its socket gets to be seen exiting. A
/// dying process closes its files before it can be reaped, so the end of
/// file often comes before SIGCHLD: its exit, when it comes, is told as
/// what it was. One that stays after this is killed as broken.
pub const CLOSED_GRACE: Duration = Duration::from_secs(1);

/// Where a template is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateState {
    /// Exec'd; loading the app, no hello yet.
    Starting,
    /// Said hello: forks on request.
    Ready,
    /// Asked to go (replaced, broken, or droved stops); `killed` once
    /// SIGKILL was sent.
    Stopping { since: Instant, killed: bool },
}

/// One template process.
#[derive(Debug, Clone)]
pub struct Template {
    pub pid: Pid,
    pub generation: u64,
    pub state: TemplateState,
    pub started: Instant,
    /// Why droved killed it as broken (its exit then counts as failed).
    pub broken: Option<&'static str>,
    /// droved said it waits for the hello ([`HELLO_NOTE_AFTER`]).
    pub hello_noted: bool,
    /// When it closed its socket ([`CLOSED_GRACE`]).
    pub closed: Option<Instant>,
}

/// The slot `ListWorkers` shows for a template, which has none.
pub const NO_SLOT: u32 = u32::MAX;

impl Template {
    /// Its state as `ListWorkers` shows it: never a worker's state.
    pub fn list_state(&self) -> &'static str {
        match self.state {
            TemplateState::Starting => "template-starting",
            TemplateState::Ready => "template",
            TemplateState::Stopping { .. } => "template-stopping",
        }
    }

    pub fn new(pid: Pid, generation: u64, now: Instant) -> Template {
        Template {
            pid,
            generation,
            state: TemplateState::Starting,
            started: now,
            broken: None,
            hello_noted: false,
            closed: None,
        }
    }

    pub fn is_active(&self) -> bool {
        !matches!(self.state, TemplateState::Stopping { .. })
    }
}

/// A `spawn` sent to the template, not answered yet. Holds its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingFork {
    pub template: Pid,
    pub slot: u32,
    pub generation: u64,
    pub asked: Instant,
}

/// Templates and their unanswered forks (part of the pool).
#[derive(Debug, Default)]
pub struct Templates {
    pub all: Vec<Template>,
    /// Answered in order (the template handles one request at a time).
    pub forks: VecDeque<PendingFork>,
}

impl Templates {
    /// The active template of `generation`, if any.
    pub fn current(&self, generation: u64) -> Option<&Template> {
        self.all
            .iter()
            .find(|t| t.generation == generation && t.is_active())
    }

    pub fn get_mut(&mut self, pid: Pid) -> Option<&mut Template> {
        self.all.iter_mut().find(|t| t.pid == pid)
    }

    pub fn remove(&mut self, pid: Pid) -> Option<Template> {
        let i = self.all.iter().position(|t| t.pid == pid)?;
        Some(self.all.remove(i))
    }

    /// Forks of `generation` still unanswered.
    pub fn forks_of(&self, generation: u64) -> u32 {
        self.forks
            .iter()
            .filter(|f| f.generation == generation)
            .count() as u32
    }
}

/// What droved knows of a pid a template answered, read while it was
/// still unreaped (from /proc, or from the zombie an early exit left).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answered {
    pub pid: Pid,
    /// Its parent and session; `None` when /proc had nothing for it.
    pub lineage: Option<(Pid, Pid)>,
    /// It is a template (of any generation).
    pub is_template: bool,
    /// It is a worker already.
    pub is_worker: bool,
    /// Some other code waits for it: a fork not yet exec'd, the upgrade's
    /// preflight.
    pub is_held: bool,
}

/// Why a `pid` answer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Template,
    Worker,
    Held,
    NotOurChild,
    NotItsFork,
}

impl Refusal {
    /// What the template did, for its kill: "killing template N: it ...".
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Template => "answered the pid of a template",
            Refusal::Worker => "answered the pid of a worker",
            Refusal::Held => "answered the pid of a process droved waits for",
            Refusal::NotOurChild => "answered a pid that is not droved's child",
            Refusal::NotItsFork => "answered a pid that is not its fork",
        }
    }
}

/// Whether droved adopts the pid `template` answered as a worker: only a
/// child of droved's (the double fork reparented it) in the template's own
/// session (droved makes every template a session leader; a fork inherits
/// the session, nothing outside the template's tree can join it, and the
/// session's id cannot be reused while a member lives); never a template,
/// a worker or a child waited for elsewhere (the preflight), whatever
/// their lineage says. Pure.
pub fn judge_answer(a: &Answered, template: Pid, droved: Pid) -> Result<(), Refusal> {
    if a.is_template || a.pid == template {
        return Err(Refusal::Template);
    }
    if a.is_worker {
        return Err(Refusal::Worker);
    }
    if a.is_held {
        return Err(Refusal::Held);
    }
    match a.lineage {
        Some((parent, _)) if parent != droved => Err(Refusal::NotOurChild),
        None => Err(Refusal::NotOurChild),
        Some((_, session)) if session != template => Err(Refusal::NotItsFork),
        Some(_) => Ok(()),
    }
}

/// A template lost with forks unanswered: its session, and when droved
/// first asked it for a fork it never named (since boot, the clock of a
/// process's start time in /proc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostTemplate {
    pub session: Pid,
    pub asked: Duration,
}

/// Whether a child of droved's that is neither a worker nor a template is
/// an unnamed fork of a lost template: in its session (whatever program
/// it runs by now) and started no earlier than the first unanswered ask
/// (`tick`: the start time's granularity), so what the template's workers
/// left behind before is not taken for one. Pure.
pub fn is_stray(session: Pid, started: Duration, lost: &[LostTemplate], tick: Duration) -> bool {
    lost.iter()
        .any(|l| l.session == session && started + tick >= l.asked)
}

/// A message from a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `DROVE-TEMPLATE <version>`
    Hello(u32),
    /// `pid <n>`: the worker of the oldest unanswered `spawn`.
    Pid(Pid),
    /// `error <text>`: that fork failed. The text is the template's, shown
    /// in STATUS=, on D-Bus and in the journal: one line, 200 characters.
    Error(OneLine),
}

/// Why a template's message is garbage.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("the template closed its socket")]
    Closed,
    #[error("unreadable message {0:?}")]
    Garbage(String),
}

/// Parses one datagram of the template's (an optional trailing newline is
/// allowed).
pub fn parse(bytes: &[u8]) -> Result<Message, MessageError> {
    if bytes.is_empty() {
        return Err(MessageError::Closed);
    }
    let garbage = || MessageError::Garbage(one_line(&String::from_utf8_lossy(bytes), 80));
    let text = std::str::from_utf8(bytes).map_err(|_| garbage())?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
    match word {
        "DROVE-TEMPLATE" => rest.parse().map(Message::Hello).map_err(|_| garbage()),
        "pid" => match rest.parse::<i32>() {
            Ok(n) if n > 1 => Ok(Message::Pid(Pid::from_raw(n))),
            _ => Err(garbage()),
        },
        "error" => Ok(Message::Error(OneLine::capped(rest, 200))),
        _ => Err(garbage()),
    }
}

/// What came out of turn and what droved expected instead, for the log:
/// `shown` is the message made one line ([`shown`]); `owed` the slot of
/// the oldest spawn this template has not answered.
pub fn unexpected(template: Pid, shown: &str, state: TemplateState, owed: Option<u32>) -> String {
    let expected = match (state, owed) {
        (TemplateState::Starting, _) => {
            format!("expected its hello \"DROVE-TEMPLATE {PROTOCOL_VERSION}\"")
        }
        (_, Some(slot)) => {
            format!("expected \"pid N\" or \"error TEXT\" answering spawn of slot {slot}")
        }
        (_, None) => "expected nothing (no spawn is unanswered)".into(),
    };
    format!("template {template} sent \"{shown}\", {expected}")
}

/// A template's message as the log shows it: one line, 80 characters.
pub fn shown(bytes: &[u8]) -> String {
    one_line(String::from_utf8_lossy(bytes).trim_end_matches('\n'), 80)
}

/// A message on `template`'s socket that `sender` sent: refused (with the
/// log's explanation and the kill's reason) unless the template sent it.
/// Its forks inherit the socket; only the template may speak on it. A
/// hello from elsewhere means droved did not start the template itself
/// but a wrapper (a shell without `exec`): then the template's parent is
/// not droved, and its workers wait for the wrong parent. Pure.
pub fn judge_sender(
    template: Pid,
    state: TemplateState,
    sender: Option<Pid>,
) -> Result<(), (String, &'static str)> {
    match sender {
        Some(s) if s != template && state == TemplateState::Starting => Err((
            format!(
                "template {template}: its hello came from pid {s}, not from pid {template} that \
                 droved started; the template must be droved's own child: exec it \
                 (sh -c 'exec …') or drop the shell"
            ),
            "is not droved's own child (its hello came from another process)",
        )),
        Some(s) if s != template => Err((
            format!(
                "template {template}: a message came from pid {s}, not from the template; \
                 only the template itself may write to its socket (a worker closes it)"
            ),
            "let another process write to its socket",
        )),
        _ => Ok(()),
    }
}

/// droved's request for one worker.
pub fn spawn_request(slot: u32, generation: u64) -> Vec<u8> {
    format!("spawn {slot} {generation}").into_bytes()
}

/// What to do about templates now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateAction {
    /// Start a template for the current generation.
    Start,
    /// Ask a template to go (an older generation's).
    Stop(Pid),
    /// Kill a template at once: broken, or past its stop grace.
    Kill(Pid, &'static str),
    /// Say once that droved waits for this template's hello.
    NoteWaiting(Pid),
}

/// Decisions about templates: one active template of the current
/// generation, started when the spawn gate allows; older ones stopped; one
/// that is not ready within `ready_timeout`, or leaves a `spawn`
/// unanswered past [`ANSWER_TIMEOUT`], killed (its exit is then judged a
/// failed start, which backs off).
///
/// `generation` is `None` once droved stops: every template goes.
pub fn plan_templates(
    t: &Templates,
    generation: Option<u64>,
    now: Instant,
    ready_timeout: Duration,
    spawn_budget: u32,
) -> Vec<TemplateAction> {
    let mut actions = Vec::new();
    for tpl in &t.all {
        match tpl.state {
            TemplateState::Stopping { since, killed } => {
                if !killed && now.duration_since(since) >= TEMPLATE_STOP_TIMEOUT {
                    actions.push(TemplateAction::Kill(tpl.pid, "did not stop in time"));
                }
            }
            _ if Some(tpl.generation) != generation => actions.push(TemplateAction::Stop(tpl.pid)),
            _ if tpl.closed.is_some() => {
                if tpl
                    .closed
                    .is_some_and(|at| now.duration_since(at) >= CLOSED_GRACE)
                {
                    actions.push(TemplateAction::Kill(
                        tpl.pid,
                        "closed its socket but did not exit",
                    ));
                }
            }
            TemplateState::Starting => {
                let waited = now.duration_since(tpl.started);
                if waited > ready_timeout {
                    actions.push(TemplateAction::Kill(
                        tpl.pid,
                        "sent no hello within ready_timeout",
                    ));
                } else if !tpl.hello_noted && waited >= HELLO_NOTE_AFTER {
                    actions.push(TemplateAction::NoteWaiting(tpl.pid));
                }
            }
            TemplateState::Ready => {
                if t.forks
                    .iter()
                    .any(|f| f.template == tpl.pid && now.duration_since(f.asked) > ANSWER_TIMEOUT)
                {
                    actions.push(TemplateAction::Kill(tpl.pid, "left a spawn unanswered"));
                }
            }
        }
    }
    if let Some(generation) = generation
        && t.current(generation).is_none()
        && spawn_budget > 0
    {
        actions.push(TemplateAction::Start);
    }
    actions
}

/// How a template's exit is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemplateExit {
    /// droved asked it to go.
    Stopped,
    /// It never got ready, or died soon after: back off before the next.
    Failed,
    /// It served, then died (killed from outside, a crash after a while):
    /// start the next at once.
    Ended,
}

pub fn judge_exit(
    t: &Template,
    status: ExitStatus,
    uptime: Duration,
    min_uptime: Duration,
    killed_as_broken: bool,
) -> TemplateExit {
    if killed_as_broken {
        return TemplateExit::Failed;
    }
    if matches!(t.state, TemplateState::Stopping { .. }) {
        return TemplateExit::Stopped;
    }
    let from_outside = matches!(
        status,
        ExitStatus::Signaled(Signal::SIGKILL | Signal::SIGTERM | Signal::SIGINT, _)
    );
    if t.state == TemplateState::Starting || (uptime < min_uptime && !from_outside) {
        TemplateExit::Failed
    } else {
        TemplateExit::Ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(n: i32) -> Pid {
        Pid::from_raw(n)
    }

    #[test]
    fn parses_the_protocol() {
        assert_eq!(parse(b"DROVE-TEMPLATE 1"), Ok(Message::Hello(1)));
        assert_eq!(parse(b"DROVE-TEMPLATE 2\n"), Ok(Message::Hello(2)));
        assert_eq!(parse(b"pid 4242"), Ok(Message::Pid(pid(4242))));
        assert_eq!(parse(b"pid 4242\n"), Ok(Message::Pid(pid(4242))));
        assert_eq!(
            parse(b"error fork: EAGAIN"),
            Ok(Message::Error("fork: EAGAIN".into()))
        );
        // Its text cannot add lines to droved's STATUS= (or anywhere).
        assert_eq!(
            parse(b"error boom\nMAINPID=1\r\nWATCHDOG_USEC=1\x1b[2J\n"),
            Ok(Message::Error("boom MAINPID=1 WATCHDOG_USEC=1[2J".into()))
        );
        let Ok(Message::Error(long)) = parse(format!("error {}", "x".repeat(999)).as_bytes())
        else {
            panic!("not an error message")
        };
        assert_eq!(long.len(), 200);
        assert_eq!(
            parse(b"bad\nMAINPID=1"),
            Err(MessageError::Garbage("bad MAINPID=1".into()))
        );
        assert_eq!(parse(b""), Err(MessageError::Closed));
        for bad in [
            &b"pid"[..],
            b"pid 1",
            b"pid -5",
            b"pid 12x",
            b"hello",
            b"DROVE-TEMPLATE one",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse(bad), Err(MessageError::Garbage(_))),
                "{bad:?}"
            );
        }
        assert_eq!(spawn_request(3, 7), b"spawn 3 7".to_vec());
    }

    #[test]
    fn adopts_only_a_fork_of_the_answering_template() {
        let (droved, template, other_template) = (pid(100), pid(200), pid(300));
        let fork = |p: i32, parent: Pid, session: Pid| Answered {
            pid: pid(p),
            lineage: Some((parent, session)),
            is_template: false,
            is_worker: false,
            is_held: false,
        };
        assert_eq!(
            judge_answer(&fork(201, droved, template), template, droved),
            Ok(())
        );
        // The template's own pid: droved's child, and in its session.
        let own = Answered {
            is_template: true,
            ..fork(200, droved, template)
        };
        assert_eq!(judge_answer(&own, template, droved), Err(Refusal::Template));
        // Even if droved's books missed it, its own pid is never a worker.
        let own_unbooked = fork(200, droved, template);
        assert_eq!(
            judge_answer(&own_unbooked, template, droved),
            Err(Refusal::Template)
        );
        // Another generation's template, and that template's fork.
        let other = Answered {
            is_template: true,
            ..fork(300, droved, other_template)
        };
        assert_eq!(
            judge_answer(&other, template, droved),
            Err(Refusal::Template)
        );
        assert_eq!(
            judge_answer(&fork(301, droved, other_template), template, droved),
            Err(Refusal::NotItsFork)
        );
        // The upgrade's preflight: droved's child, held by its waiter.
        let preflight = Answered {
            is_held: true,
            ..fork(400, droved, pid(99))
        };
        assert_eq!(
            judge_answer(&preflight, template, droved),
            Err(Refusal::Held)
        );
        // Held even if it were in the template's session.
        let held_fork = Answered {
            is_held: true,
            ..fork(202, droved, template)
        };
        assert_eq!(
            judge_answer(&held_fork, template, droved),
            Err(Refusal::Held)
        );
        // A worker already booked (a second answer naming it).
        let worker = Answered {
            is_worker: true,
            ..fork(203, droved, template)
        };
        assert_eq!(
            judge_answer(&worker, template, droved),
            Err(Refusal::Worker)
        );
        // Its fork before the intermediate exited: not droved's child yet.
        assert_eq!(
            judge_answer(&fork(204, pid(205), template), template, droved),
            Err(Refusal::NotOurChild)
        );
        // A pid that is gone or never was, and a process elsewhere (pid 1).
        let gone = Answered {
            lineage: None,
            ..fork(206, droved, template)
        };
        assert_eq!(
            judge_answer(&gone, template, droved),
            Err(Refusal::NotOurChild)
        );
        assert_eq!(
            judge_answer(&fork(1, pid(0), pid(1)), template, droved),
            Err(Refusal::NotOurChild)
        );
        // A fork that left the template's session (setsid): not provably
        // its fork.
        assert_eq!(
            judge_answer(&fork(207, droved, pid(207)), template, droved),
            Err(Refusal::NotItsFork)
        );
    }

    #[test]
    fn strays_are_the_lost_templates_forks_since_the_first_unanswered_ask() {
        let tick = Duration::from_millis(10);
        let lost = [LostTemplate {
            session: pid(200),
            asked: Duration::from_millis(5_003),
        }];
        // Forked after the ask; or in the same tick (start times are
        // truncated to whole ticks).
        assert!(is_stray(
            pid(200),
            Duration::from_millis(6_000),
            &lost,
            tick
        ));
        assert!(is_stray(
            pid(200),
            Duration::from_millis(5_000),
            &lost,
            tick
        ));
        // Left behind by its workers before droved asked anything.
        assert!(!is_stray(
            pid(200),
            Duration::from_millis(4_990),
            &lost,
            tick
        ));
        // Another session: an orphan from elsewhere, another template's.
        assert!(!is_stray(
            pid(300),
            Duration::from_millis(6_000),
            &lost,
            tick
        ));
        assert!(!is_stray(pid(200), Duration::from_millis(6_000), &[], tick));
    }

    fn templates(list: &[(i32, u64, TemplateState, u64)], now: Instant) -> Templates {
        Templates {
            all: list
                .iter()
                .map(|&(p, generation, state, age_ms)| Template {
                    pid: pid(p),
                    generation,
                    state,
                    started: now - Duration::from_millis(age_ms),
                    broken: None,
                    hello_noted: false,
                    closed: None,
                })
                .collect(),
            forks: VecDeque::new(),
        }
    }

    #[test]
    fn plans_templates() {
        use TemplateAction::*;
        let now = Instant::now();
        let rt = Duration::from_secs(2);
        let stopping = |ms| TemplateState::Stopping {
            since: now - Duration::from_millis(ms),
            killed: false,
        };
        let cases: Vec<(&str, Templates, u32, Vec<TemplateAction>)> = vec![
            ("none yet: start", templates(&[], now), 1, vec![Start]),
            (
                "none yet, backing off: wait",
                templates(&[], now),
                0,
                vec![],
            ),
            (
                "starting, in time",
                templates(&[(10, 1, TemplateState::Starting, 100)], now),
                1,
                vec![],
            ),
            (
                "starting too long: kill (no new one until it is reaped)",
                templates(&[(10, 1, TemplateState::Starting, 3000)], now),
                1,
                vec![Kill(pid(10), "sent no hello within ready_timeout")],
            ),
            (
                "ready: nothing",
                templates(&[(10, 1, TemplateState::Ready, 9000)], now),
                1,
                vec![],
            ),
            (
                "old generation: stop it, start the new one",
                templates(&[(10, 1, TemplateState::Ready, 9000)], now),
                0,
                vec![Stop(pid(10))],
            ),
            (
                "stopping past its grace: kill; a current one is ready",
                templates(
                    &[
                        (10, 1, stopping(6000), 9000),
                        (11, 2, TemplateState::Ready, 10),
                    ],
                    now,
                ),
                1,
                vec![Kill(pid(10), "did not stop in time")],
            ),
        ];
        for (what, t, budget, want) in cases {
            let generation = if what.starts_with("old") { 2 } else { 1 };
            let generation = if what.starts_with("stopping") {
                2
            } else {
                generation
            };
            let mut got = plan_templates(&t, Some(generation), now, rt, budget);
            if what.starts_with("old") {
                // budget 0: no Start
                assert_eq!(got, want, "{what}");
                got = plan_templates(&t, Some(generation), now, rt, 1);
                assert_eq!(got, vec![Stop(pid(10)), Start], "{what}, with budget");
            } else {
                assert_eq!(got, want, "{what}");
            }
        }
    }

    #[test]
    fn notes_the_hello_wait_once() {
        let now = Instant::now();
        let rt = Duration::from_secs(30);
        let mut t = templates(&[(10, 1, TemplateState::Starting, 4_000)], now);
        assert!(plan_templates(&t, Some(1), now, rt, 1).is_empty());
        t.all[0].started = now - HELLO_NOTE_AFTER;
        assert_eq!(
            plan_templates(&t, Some(1), now, rt, 1),
            vec![TemplateAction::NoteWaiting(pid(10))]
        );
        t.all[0].hello_noted = true;
        assert!(plan_templates(&t, Some(1), now, rt, 1).is_empty());
        t.all[0].started = now - rt - Duration::from_millis(1);
        assert_eq!(
            plan_templates(&t, Some(1), now, rt, 1),
            vec![TemplateAction::Kill(
                pid(10),
                "sent no hello within ready_timeout"
            )]
        );
    }

    #[test]
    fn a_closed_socket_gets_a_moment_to_show_the_exit() {
        let now = Instant::now();
        let rt = Duration::from_secs(30);
        for state in [TemplateState::Starting, TemplateState::Ready] {
            let mut t = templates(&[(10, 1, state, 9_000)], now);
            t.all[0].closed = Some(now - Duration::from_millis(100));
            assert!(
                plan_templates(&t, Some(1), now, rt, 1).is_empty(),
                "{state:?}"
            );
            t.all[0].closed = Some(now - CLOSED_GRACE);
            assert_eq!(
                plan_templates(&t, Some(1), now, rt, 1),
                vec![TemplateAction::Kill(
                    pid(10),
                    "closed its socket but did not exit"
                )],
                "{state:?}"
            );
        }
    }

    #[test]
    fn says_what_came_and_what_was_expected() {
        assert_eq!(
            unexpected(
                pid(123),
                &shown(b"ok 30706\n"),
                TemplateState::Ready,
                Some(2)
            ),
            "template 123 sent \"ok 30706\", expected \"pid N\" or \"error TEXT\" \
             answering spawn of slot 2"
        );
        assert_eq!(
            unexpected(pid(123), &shown(b"pid 5"), TemplateState::Starting, None),
            "template 123 sent \"pid 5\", expected its hello \"DROVE-TEMPLATE 1\""
        );
        assert_eq!(
            unexpected(
                pid(123),
                &shown(b"DROVE-TEMPLATE 1"),
                TemplateState::Ready,
                None
            ),
            "template 123 sent \"DROVE-TEMPLATE 1\", expected nothing (no spawn is unanswered)"
        );
        assert_eq!(shown(b"a\nb\x1b\xff"), "a b\u{fffd}");
    }

    #[test]
    fn only_the_template_may_speak() {
        let (t, other) = (pid(10), pid(11));
        for state in [TemplateState::Starting, TemplateState::Ready] {
            assert_eq!(judge_sender(t, state, Some(t)), Ok(()));
            assert_eq!(judge_sender(t, state, None), Ok(()));
        }
        let (log, why) = judge_sender(t, TemplateState::Starting, Some(other)).unwrap_err();
        assert!(log.contains("pid 11") && log.contains("pid 10"), "{log}");
        assert!(log.contains("sh -c 'exec"), "{log}");
        assert!(why.contains("droved's own child"), "{why}");
        let (log, why) = judge_sender(t, TemplateState::Ready, Some(other)).unwrap_err();
        assert!(log.contains("pid 11"), "{log}");
        assert_eq!(why, "let another process write to its socket");
    }

    #[test]
    fn unanswered_spawn_kills_the_template() {
        let now = Instant::now();
        let mut t = templates(&[(10, 1, TemplateState::Ready, 9000)], now);
        t.forks.push_back(PendingFork {
            template: pid(10),
            slot: 0,
            generation: 1,
            asked: now - Duration::from_millis(100),
        });
        assert!(plan_templates(&t, Some(1), now, Duration::from_secs(2), 1).is_empty());
        t.forks[0].asked = now - ANSWER_TIMEOUT - Duration::from_millis(1);
        assert_eq!(
            plan_templates(&t, Some(1), now, Duration::from_secs(2), 1),
            vec![TemplateAction::Kill(pid(10), "left a spawn unanswered")]
        );
        assert_eq!(
            plan_templates(&t, None, now, Duration::from_secs(2), 1),
            vec![TemplateAction::Stop(pid(10))],
            "droved stops: every template goes, none starts"
        );
        assert_eq!(t.forks_of(1), 1);
        assert_eq!(t.forks_of(2), 0);
    }

    #[test]
    fn judges_template_exits() {
        let now = Instant::now();
        let min = Duration::from_secs(1);
        let mut t = Template::new(pid(10), 1, now);
        let killed = ExitStatus::Signaled(Signal::SIGKILL, false);
        let crashed = ExitStatus::Exited(1);
        let long = Duration::from_secs(5);
        let short = Duration::from_millis(100);
        assert_eq!(
            judge_exit(&t, crashed, short, min, false),
            TemplateExit::Failed
        );
        assert_eq!(
            judge_exit(&t, killed, long, min, false),
            TemplateExit::Failed
        );
        t.state = TemplateState::Ready;
        assert_eq!(
            judge_exit(&t, killed, short, min, false),
            TemplateExit::Ended
        );
        assert_eq!(
            judge_exit(&t, crashed, short, min, false),
            TemplateExit::Failed
        );
        assert_eq!(
            judge_exit(&t, crashed, long, min, false),
            TemplateExit::Ended
        );
        assert_eq!(
            judge_exit(&t, killed, long, min, true),
            TemplateExit::Failed
        );
        t.state = TemplateState::Stopping {
            since: now,
            killed: false,
        };
        assert_eq!(
            judge_exit(&t, crashed, long, min, false),
            TemplateExit::Stopped
        );
    }
}
