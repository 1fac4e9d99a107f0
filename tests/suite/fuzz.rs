//! Property tests of the parsers that read untrusted input: the config
//! file, notify datagrams from workers, and the upgrade handover state.
//! Whatever the bytes, they return a value or an error: no panic, no hang.

use std::path::Path;

use drove::config::Config;
use drove::{handover, notify};
use proptest::prelude::*;

/// TOML-ish text built from config-shaped fragments, so the generator
/// reaches deep into validation instead of failing at the first byte.
fn config_text() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "addresses",
        "backlog",
        "socket_mode",
        "command",
        "ready",
        "ready_timeout",
        "stop_signal",
        "stop_timeout",
        "watchdog",
        "min",
        "max",
        "initial",
        "spawn_rate",
        "interval",
        "cooldown",
        "window",
        "cpu_guard",
        "max_rss",
        "max_lifetime",
        "environment",
        "user",
        "group",
        "bogus",
    ]);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "\"[0-9]{0,6}(ms|s|m|h|d|MiB|G|x)?\"",
        "\"(127.0.0.1|\\[::1\\]|unix:/tmp/x|localhost)?:?[0-9]{0,6}\"",
        "\"(SIG)?(TERM|KILL|QUIT|HUP|NOPE|)\"",
        Just("true".to_string()),
        Just("[\"a\", 1, {x = 2}]".to_string()),
        Just("{ A = \"b\", \"=\" = \"\" }".to_string()),
        "\"(notify|exec|\\x00|\\u{202e})\"",
    ];
    let table = prop::sample::select(vec![
        "[listen]",
        "[worker]",
        "[pool]",
        "[scale]",
        "[control]",
        "[nope]",
        "",
    ]);
    prop::collection::vec((table, key, value), 0..12).prop_map(|items| {
        items
            .into_iter()
            .map(|(t, k, v)| format!("{t}\n{k} = {v}\n"))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn config_parser_never_panics(text in config_text()) {
        if let Err(e) = Config::from_toml_str(&text, Path::new("fuzz.toml")) {
            // Every error names the file.
            prop_assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
        }
    }

    #[test]
    fn config_parser_survives_arbitrary_text(text in ".{0,400}") {
        let _ = Config::from_toml_str(&text, Path::new("fuzz.toml"));
    }

    #[test]
    fn notify_parser_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..5000)) {
        if let Ok(n) = notify::parse(&bytes)
            && let Some(s) = n.status
        {
            prop_assert!(!s.chars().any(char::is_control));
        }
    }

    #[test]
    fn notify_parser_on_assignment_soup(lines in prop::collection::vec("(READY|STATUS|WATCHDOG|STOPPING|ERRNO|EXTEND_TIMEOUT_USEC|X)=[ -~]{0,20}", 0..20)) {
        let _ = notify::parse(lines.join("\n").as_bytes());
    }

    #[test]
    fn handover_decoder_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = handover::decode(&bytes);
    }

    #[test]
    fn handover_decoder_on_corrupted_state(flip in 0usize..400, to in any::<u8>(), cut in 0usize..400) {
        let state = handover::State {
            from_version: "0.1.0 (dev)".into(),
            instance: "x".into(),
            generation: 1,
            target: 2,
            listeners: vec![],
            notify: handover::NotifyState { fd: 4, address: "@a".into() },
            workers: vec![],
            counters: handover::Counters::default(),
            uptime_ms: 1,
            consecutive_failures: 0,
            resume: handover::Resume::Running,
            template: None,
            socket_activated: false,
            event_counts: [("upgrades{result=done}".to_string(), 3)].into(),
        };
        let mut bytes = handover::encode(&state);
        let i = flip % bytes.len();
        bytes[i] = to;
        bytes.truncate(bytes.len() - cut.min(bytes.len()));
        let _ = handover::decode(&bytes);
    }
}
