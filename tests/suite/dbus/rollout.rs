//! `drovectl rollout` and a guarded reload over D-Bus: the reload's caller
//! hears a rollback's reason, the Rollout method shows, pauses, resumes and
//! aborts, and only privileged callers may change a rollout.

use super::*;

const GUARDED: &str = "[rollout]\ncanary = 1\nobserve = \"60s\"\nmax_failures = 1";

/// A reload that changes the worker settings, run in the background:
/// drovectl waits until the rollout ends.
fn reload_in_background(bus: &Bus, d: &Droved, release: &str) -> std::process::Child {
    let path = d.dir.join("drove.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = match text.find("[worker]\n") {
        Some(_) if text.contains("environment") => {
            let start = text.find("environment").unwrap();
            let end = start + text[start..].find('\n').unwrap();
            format!(
                "{}environment = {{ RELEASE = \"{release}\" }}{}",
                &text[..start],
                &text[end..]
            )
        }
        _ => text.replace(
            "[worker]\n",
            &format!("[worker]\nenvironment = {{ RELEASE = \"{release}\" }}\n"),
        ),
    };
    std::fs::write(&path, text).unwrap();
    bus.command(&[], &["reload"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn rollout_line(bus: &Bus) -> String {
    let v = bus.json(&["rollout", "status"]);
    v["rollout"].as_str().unwrap().to_string()
}

/// The pids of workers of `generation`, from drovectl list.
fn of_generation(bus: &Bus, generation: u64) -> Vec<i32> {
    bus.json(&["list"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["generation"] == generation && w["state"] != "template")
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect()
}

#[test]
fn a_crashing_canary_rolls_back_and_the_reload_fails_with_the_reason() {
    let bus = Bus::start();
    let d = bus.droved_with("canary", &config(2, 2, GUARDED));
    let old: BTreeSet<i32> = d.workers().into_iter().collect();
    let reload = reload_in_background(&bus, &d, "2");
    let canary = eventually("the canary ready and observed", 20 * SEC, || {
        rollout_line(&bus)
            .contains("observing")
            .then(|| of_generation(&bus, 2))
            .filter(|c| c.len() == 1)
    })[0];
    // The canary dies under traffic (here: killed, as the OOM killer would).
    kill(Pid::from_raw(canary), Signal::SIGKILL).unwrap();
    let out = reload.wait_with_output().unwrap();
    assert_exit(
        &out,
        1,
        &[
            "rolled back",
            "1 failure(s) of the new generation",
            "[org.drove.Error.RolloutFailed]",
        ],
    );
    eventually("the rollback done", 20 * SEC, || {
        rollout_line(&bus).starts_with("no rollout").then_some(())
    });
    // The old workers serve on (one made room for the canary when it got
    // ready; the rollback replaced that one, not the others).
    let now: BTreeSet<i32> = d.workers().into_iter().collect();
    assert!(!old.is_disjoint(&now), "{old:?} -> {now:?}");
    let status = bus.status("canary");
    assert_eq!(status["generation"], 3, "the rollback is a new generation");
    for pid in &now {
        assert_ne!(
            env_of(*pid, "RELEASE").as_deref(),
            Some("2"),
            "pid {pid} runs the failed release"
        );
    }
}

#[test]
fn rollout_pause_resume_abort_and_who_may() {
    let bus = Bus::start();
    let d = bus.droved_with("ctl-rollout", &config(2, 2, GUARDED));
    assert!(
        rollout_line(&bus).starts_with("no rollout"),
        "{}",
        rollout_line(&bus)
    );
    assert_exit(
        &bus.ctl(&["rollout", "pause"]),
        1,
        &["no rollout in progress"],
    );
    let reload = reload_in_background(&bus, &d, "2");
    eventually("observing the canary", 20 * SEC, || {
        rollout_line(&bus).contains("observing").then_some(())
    });
    // Anyone may look; only root, droved's user or control.group may change.
    let seen = bus.ctl_as_nobody(&["rollout", "status"]);
    assert_ok(&seen, &["rollout", "status"]);
    assert!(
        text(&seen.stdout).contains("observing"),
        "{}",
        text(&seen.stdout)
    );
    assert_exit(
        &bus.ctl_as_nobody(&["rollout", "abort"]),
        1,
        &["AccessDenied"],
    );

    assert_ok(&bus.ctl(&["rollout", "pause"]), &["rollout", "pause"]);
    assert!(
        rollout_line(&bus).contains("paused"),
        "{}",
        rollout_line(&bus)
    );
    assert_ok(&bus.ctl(&["rollout", "resume"]), &["rollout", "resume"]);
    assert!(
        !rollout_line(&bus).contains("paused"),
        "{}",
        rollout_line(&bus)
    );

    let abort = bus.ctl(&["rollout", "abort"]);
    assert_ok(&abort, &["rollout", "abort"]);
    assert!(
        text(&abort.stdout).contains("rolling back"),
        "{}",
        text(&abort.stdout)
    );
    let out = reload.wait_with_output().unwrap();
    assert_exit(&out, 1, &["rolled back: aborted by request"]);
    eventually("the rollback done", 20 * SEC, || {
        rollout_line(&bus).starts_with("no rollout").then_some(())
    });
    assert!(
        of_generation(&bus, 2).is_empty(),
        "no worker of the aborted release"
    );
}
