// SPDX-License-Identifier: MIT OR Apache-2.0
//! Why a configuration was rejected, and where: [`ConfigError`] and the
//! [`Position`] (line and column) it points at.

use std::path::{Path, PathBuf};

/// A 1-based line and column (in characters) in the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Why a configuration was rejected. `Display` is one line an operator can
/// act on: `path:line:column: what is wrong and what is expected`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the config file", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrong value.
    #[error("{}", render(path.as_deref(), *position, message))]
    Invalid {
        /// The file; `None` when the values came from elsewhere (the CLI).
        path: Option<PathBuf>,
        /// Where in the file; `None` if the value was not in the file.
        position: Option<Position>,
        /// The dotted key (`pool.min`) when the error concerns one.
        key: Option<String>,
        /// What is wrong and what is expected, including the key.
        message: String,
    },
}

fn render(path: Option<&Path>, position: Option<Position>, message: &str) -> String {
    match (path, position) {
        (Some(p), Some(pos)) => format!("{}:{}:{}: {message}", p.display(), pos.line, pos.column),
        (Some(p), None) => format!("{}: {message}", p.display()),
        (None, _) => message.to_owned(),
    }
}

impl ConfigError {
    /// The config file concerned, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            ConfigError::Read { path, .. } => Some(path),
            ConfigError::Invalid { path, .. } => path.as_deref(),
        }
    }

    /// Line and column of the offending text, if known.
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { position, .. } => *position,
        }
    }

    /// The dotted key concerned (`worker.stop_signal`), if known.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Read { .. } => None,
            ConfigError::Invalid { key, .. } => key.as_deref(),
        }
    }

    /// One line including the cause (for a read error, the OS error), for
    /// callers that show a single string, such as a D-Bus `Reload` reply.
    pub fn full_message(&self) -> String {
        match self {
            ConfigError::Read { source, .. } => format!("{self}: {source}"),
            ConfigError::Invalid { .. } => self.to_string(),
        }
    }

    /// The error without any value from the file, for callers who may not
    /// read the file itself (a D-Bus `Reload` reply to a control.group
    /// member): the file, line and column and the key, but not the message,
    /// which may quote a value (a secret in worker.environment, say).
    pub fn redacted(&self) -> String {
        match self {
            ConfigError::Read { .. } => self.full_message(),
            // Not about the file's text (its owner and mode, say).
            ConfigError::Invalid {
                position: None,
                key: None,
                ..
            } => self.to_string(),
            ConfigError::Invalid {
                path,
                position,
                key,
                ..
            } => {
                let what = match key {
                    Some(k) => format!("invalid {k}"),
                    None => "invalid configuration".to_owned(),
                };
                render(
                    path.as_deref(),
                    *position,
                    &format!("{what} (droved's journal has the details)"),
                )
            }
        }
    }

    pub(super) fn unplaced(key: &str, message: String) -> Self {
        ConfigError::Invalid {
            path: None,
            position: None,
            key: Some(key.to_owned()),
            message,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;
    use crate::config::testing::ORIGIN;

    #[test]
    fn error_accessors() {
        let e = Config::from_toml_str("[pool]\nmin = 10\nmax = 4", Path::new(ORIGIN)).unwrap_err();
        assert_eq!(e.path(), Some(Path::new(ORIGIN)));
        assert_eq!(e.position(), Some(Position { line: 2, column: 7 }));
        assert_eq!(e.key(), Some("pool.min"));
        assert_eq!(e.full_message(), e.to_string());

        let missing = Path::new("/nonexistent/drove.toml");
        let e = Config::load(missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert_eq!(
            e.to_string(),
            "/nonexistent/drove.toml: cannot read the config file"
        );
        assert_eq!(
            e.full_message(),
            "/nonexistent/drove.toml: cannot read the config file: No such file or directory (os error 2)"
        );
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.position(), None);
    }

    #[test]
    fn redacted_errors_name_file_line_and_key_but_no_value() {
        let e = Config::from_toml_str(
            "[worker]\nenvironment = { API_KEY = [\"hunter2\"] }",
            Path::new(ORIGIN),
        )
        .unwrap_err();
        assert!(e.to_string().contains("worker.environment.API_KEY"), "{e}");
        assert_eq!(
            e.redacted(),
            format!(
                "{ORIGIN}:2:27: invalid worker.environment.API_KEY (droved's journal has the details)"
            )
        );
        let e = Config::from_toml_str(
            "[worker]\nuser = \"a\"\nuser = \"s3cret\"",
            Path::new(ORIGIN),
        )
        .unwrap_err();
        assert!(!e.redacted().contains("s3cret"), "{}", e.redacted());
        assert!(
            e.redacted().starts_with(&format!("{ORIGIN}:3:")),
            "{}",
            e.redacted()
        );
    }
}
