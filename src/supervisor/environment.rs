//! The environment a worker starts with: built, not inherited.
//!
//! droved's own environment holds what its unit gave it (`Environment=`,
//! `EnvironmentFile=` secrets, `CREDENTIALS_DIRECTORY`, the bus address,
//! `INVOCATION_ID`) and root's `HOME`; none of that is the application's.
//! A worker gets, in this order (later wins):
//! 1. from droved's environment: `PATH`, `LANG`, `LANGUAGE`, `LC_*`, `TZ`,
//!    and the names in `worker.inherit_environment`;
//! 2. `HOME`, `USER`, `LOGNAME`, `SHELL` of the user it runs as (as
//!    systemd's `User=` sets them);
//! 3. `worker.environment`;
//! 4. the contract variables droved adds itself (LISTEN_*, NOTIFY_SOCKET, …;
//!    see [`listen_variables`] for the LISTEN_* part).
//!
//! Pure: the caller passes droved's environment and the account.

use std::collections::BTreeMap;

use crate::config::WorkerSocket;

/// `PATH` when droved has none (systemd's default for services).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The account a worker runs as, from the user database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub home: String,
    pub shell: String,
}

/// Whether droved passes its own `key` on to every worker.
fn always_passed(key: &str) -> bool {
    matches!(key, "PATH" | "LANG" | "LANGUAGE" | "TZ") || key.starts_with("LC_")
}

/// Steps 1–3 above; the caller appends the contract variables.
pub fn build(
    parent: impl IntoIterator<Item = (String, String)>,
    account: Option<&Account>,
    inherit: &[String],
    configured: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = parent
        .into_iter()
        .filter(|(k, _)| always_passed(k) || inherit.iter().any(|i| i == k))
        .collect();
    env.sort();
    let mut set = |k: &str, v: &str| {
        env.retain(|(key, _)| key != k);
        env.push((k.to_string(), v.to_string()));
    };
    if let Some(a) = account {
        set("HOME", &a.home);
        set("USER", &a.name);
        set("LOGNAME", &a.name);
        set("SHELL", &a.shell);
    }
    for (k, v) in configured {
        set(k, v);
    }
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    env
}

/// The socket-activation variables for listeners named `names`:
/// `LISTEN_FDS` and `LISTEN_FDNAMES` the systemd way (spawn adds
/// `LISTEN_PID`, which only the child knows), none at all for
/// [`WorkerSocket::Stdin`]: a FastCGI server finds its socket on fd 0, and a
/// library that reads `LISTEN_FDS` in the same process must not look for
/// one at fd 3.
pub fn listen_variables(socket: WorkerSocket, names: &[&str]) -> Vec<(String, String)> {
    match socket {
        WorkerSocket::Systemd => vec![
            ("LISTEN_FDS".into(), names.len().to_string()),
            ("LISTEN_FDNAMES".into(), names.join(":")),
        ],
        WorkerSocket::Stdin => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
        env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn only_the_locale_path_and_inherited_names_pass() {
        let parent = vars(&[
            ("PATH", "/usr/bin:/bin"),
            ("LANG", "C.UTF-8"),
            ("LC_TIME", "de_DE.UTF-8"),
            ("TZ", "Europe/Berlin"),
            ("HOME", "/root"),
            ("DB_PASSWORD", "hunter2"),
            (
                "CREDENTIALS_DIRECTORY",
                "/run/credentials/drove@app.service",
            ),
            (
                "DBUS_SYSTEM_BUS_ADDRESS",
                "unix:path=/run/dbus/system_bus_socket",
            ),
            ("INVOCATION_ID", "abc"),
            ("HTTP_PROXY", "http://proxy:3128"),
        ]);
        let account = Account {
            name: "app".into(),
            home: "/srv/app".into(),
            shell: "/usr/sbin/nologin".into(),
        };
        let configured = BTreeMap::from([("RELEASE".to_string(), "7".to_string())]);
        let env = build(parent, Some(&account), &["HTTP_PROXY".into()], &configured);
        assert_eq!(get(&env, "PATH"), Some("/usr/bin:/bin"));
        assert_eq!(get(&env, "LANG"), Some("C.UTF-8"));
        assert_eq!(get(&env, "LC_TIME"), Some("de_DE.UTF-8"));
        assert_eq!(get(&env, "TZ"), Some("Europe/Berlin"));
        assert_eq!(get(&env, "HTTP_PROXY"), Some("http://proxy:3128"));
        assert_eq!(get(&env, "HOME"), Some("/srv/app"));
        assert_eq!(get(&env, "USER"), Some("app"));
        assert_eq!(get(&env, "LOGNAME"), Some("app"));
        assert_eq!(get(&env, "SHELL"), Some("/usr/sbin/nologin"));
        assert_eq!(get(&env, "RELEASE"), Some("7"));
        for secret in [
            "DB_PASSWORD",
            "CREDENTIALS_DIRECTORY",
            "DBUS_SYSTEM_BUS_ADDRESS",
            "INVOCATION_ID",
        ] {
            assert_eq!(get(&env, secret), None, "{secret}");
        }
        assert_eq!(env.len(), 10, "{env:?}");
    }

    #[test]
    fn listen_variables_per_socket_convention() {
        assert_eq!(
            listen_variables(WorkerSocket::Systemd, &["web", "admin"]),
            vars(&[("LISTEN_FDS", "2"), ("LISTEN_FDNAMES", "web:admin")])
        );
        assert_eq!(listen_variables(WorkerSocket::Stdin, &["web"]), vec![]);
    }

    #[test]
    fn the_config_wins_and_path_has_a_default() {
        let configured = BTreeMap::from([
            ("HOME".to_string(), "/var/lib/app".to_string()),
            ("TZ".to_string(), "UTC".to_string()),
        ]);
        let account = Account {
            name: "app".into(),
            home: "/srv/app".into(),
            shell: "/bin/sh".into(),
        };
        let env = build(
            vars(&[("TZ", "Europe/Berlin")]),
            Some(&account),
            &[],
            &configured,
        );
        assert_eq!(get(&env, "HOME"), Some("/var/lib/app"));
        assert_eq!(get(&env, "TZ"), Some("UTC"));
        assert_eq!(get(&env, "PATH"), Some(DEFAULT_PATH));
        // Each name once.
        let keys: std::collections::BTreeSet<_> = env.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(keys.len(), env.len());
        // No account: no HOME/USER from droved's own environment either.
        let env = build(
            vars(&[("HOME", "/root"), ("USER", "root")]),
            None,
            &[],
            &BTreeMap::new(),
        );
        assert_eq!(get(&env, "HOME"), None);
        assert_eq!(get(&env, "USER"), None);
    }
}
