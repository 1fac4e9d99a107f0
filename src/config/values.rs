// SPDX-License-Identifier: MIT OR Apache-2.0
//! Value syntax shared by the config file and the command line: durations,
//! sizes and signal names (see the module documentation of
//! [`crate::config`] for the accepted forms). Pure.

use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

/// Why a string is not a duration. Each message quotes the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "`{0}` is not a duration; expected a number and a unit, e.g. \"100ms\", \"30s\", \"2m\""
    )]
    NoNumber(String),
    #[error("`{text}` is not a duration: malformed number `{number}`")]
    Malformed { text: String, number: String },
    #[error("`{0}` has more than 9 decimal places; durations are precise to the nanosecond")]
    TooPrecise(String),
    #[error("`{text}` has no unit; write e.g. \"{number}s\" or \"{number}ms\"")]
    NoUnit { text: String, number: String },
    #[error("`{text}` has an unknown unit `{unit}`; expected one of ms, s, m, min, h, d")]
    UnknownUnit { text: String, unit: String },
    /// The whole number alone does not fit in 128 bits.
    #[error("`{0}` is too large for a duration")]
    NumberTooLarge(String),
    #[error("`{0}` is too large for a duration (at most about 584 years)")]
    TooLarge(String),
}

/// Why a string is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size; expected bytes or a number with a unit, e.g. \"512MiB\", \"1G\"")]
    NoNumber(String),
    /// `KB`, `MB`…: decimal or binary? `binary` is the unit to write instead
    /// (`MiB`), `letter` systemd's spelling of it (`M`).
    #[error(
        "`{text}`: `{unit}` is ambiguous; write `{binary}` (1024-based, like systemd's `{letter}`)"
    )]
    Ambiguous {
        text: String,
        unit: String,
        binary: String,
        letter: String,
    },
    #[error(
        "`{text}` has an unknown unit `{unit}`; expected one of K, M, G, T, KiB, MiB, GiB, TiB"
    )]
    UnknownUnit { text: String, unit: String },
    #[error("`{0}` is too large (at most 16 EiB)")]
    TooLarge(String),
}

/// Why a string is not a signal name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignalError {
    #[error("`{0}`: give the signal by name, e.g. \"SIGTERM\" or \"SIGQUIT\"")]
    Number(String),
    #[error("`{0}` is not a signal name; expected e.g. \"SIGTERM\", \"SIGINT\", \"SIGQUIT\"")]
    Unknown(String),
}

const NANOS: [(&str, u128); 6] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("min", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("d", 86_400_000_000_000),
];

/// Parse a duration: `"100ms"`, `"30s"`, `"1.5s"`, `"2m"`, `"2min"`, `"1h"`,
/// `"1d"`, or `"0"`. Whitespace around the number and unit is allowed.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim_start());
    if number.is_empty() {
        return Err(DurationError::NoNumber(text.to_owned()));
    }
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if whole.is_empty() || (number.contains('.') && frac.is_empty()) || frac.contains('.') {
        return Err(DurationError::Malformed {
            text: text.to_owned(),
            number: number.to_owned(),
        });
    }
    if frac.len() > 9 {
        return Err(DurationError::TooPrecise(text.to_owned()));
    }
    let whole: u128 = whole
        .parse()
        .map_err(|_| DurationError::NumberTooLarge(text.to_owned()))?;
    let frac_value: u128 = if frac.is_empty() {
        0
    } else {
        frac.parse().unwrap_or(0)
    };
    if unit.is_empty() {
        if whole == 0 && frac_value == 0 {
            return Ok(Duration::ZERO);
        }
        return Err(DurationError::NoUnit {
            text: text.to_owned(),
            number: number.to_owned(),
        });
    }
    let Some(&(_, per_unit)) = NANOS.iter().find(|(u, _)| *u == unit) else {
        return Err(DurationError::UnknownUnit {
            text: text.to_owned(),
            unit: unit.to_owned(),
        });
    };
    let frac_nanos = frac_value * per_unit / 10u128.pow(frac.len() as u32);
    let total = whole
        .checked_mul(per_unit)
        .and_then(|n| n.checked_add(frac_nanos))
        .filter(|n| *n <= u128::from(u64::MAX))
        .ok_or_else(|| DurationError::TooLarge(text.to_owned()))?;
    Ok(Duration::from_nanos(total as u64))
}

/// Format a duration so that [`parse_duration`] reads it back exactly:
/// the largest unit that divides it (`"2m"`, `"100ms"`), else fractional
/// seconds (`"1.5s"`).
pub fn format_duration(d: Duration) -> String {
    let n = d.as_nanos();
    if n == 0 {
        return "0".to_owned();
    }
    for (unit, per) in [
        ("d", 86_400_000_000_000u128),
        ("h", 3_600_000_000_000),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
    ] {
        if n.is_multiple_of(per) {
            return format!("{}{unit}", n / per);
        }
    }
    let frac = format!("{:09}", n % 1_000_000_000);
    format!("{}.{}s", n / 1_000_000_000, frac.trim_end_matches('0'))
}

/// Parse a size in bytes: `"1048576"`, `"512K"`, `"512KiB"`, `"100M"`,
/// `"1GiB"`, `"2T"`; units are 1024-based and case-insensitive.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim_start());
    if number.is_empty() {
        return Err(SizeError::NoNumber(text.to_owned()));
    }
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            let letter = unit[..1].to_ascii_uppercase();
            return Err(SizeError::Ambiguous {
                text: text.to_owned(),
                unit: unit.to_owned(),
                binary: format!("{letter}iB"),
                letter,
            });
        }
        _ => {
            return Err(SizeError::UnknownUnit {
                text: text.to_owned(),
                unit: unit.to_owned(),
            });
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| SizeError::TooLarge(text.to_owned()))
}

/// Parse a signal name: `"SIGTERM"`, `"TERM"`, `"sigquit"`, `"hup"`.
pub fn parse_signal(text: &str) -> Result<Signal, SignalError> {
    let upper = text.trim().to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).map_err(|_| {
        if text.trim().parse::<i32>().is_ok() {
            SignalError::Number(text.to_owned())
        } else {
            SignalError::Unknown(text.to_owned())
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("100ms"), Duration::from_millis(100));
        assert_eq!(ok("30s"), Duration::from_secs(30));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("2min"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("1d"), Duration::from_secs(86400));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("0.25h"), Duration::from_secs(900));
        assert_eq!(ok("0.000000001s"), Duration::from_nanos(1));
        assert_eq!(ok("1.5ms"), Duration::from_micros(1500));
        assert_eq!(ok(" 10 s "), Duration::from_secs(10));
        assert_eq!(ok("0"), Duration::ZERO);
        assert_eq!(ok("0.0"), Duration::ZERO);
        assert_eq!(ok("0s"), Duration::ZERO);
        assert_eq!(ok("18446744073.709551615s"), Duration::from_nanos(u64::MAX));
        for bad in [
            "",
            "s",
            "10",
            "1.5",
            "-1s",
            "1.s",
            ".5s",
            "1..5s",
            "1.2.3s",
            "10 sec",
            "10S",
            "1e3s",
            "5us",
            "1.0000000001s",
            "18446744073.709551616s",
            "213503982336d",
            "99999999999999999999999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            parse_duration("213503982336d").unwrap_err().to_string(),
            "`213503982336d` is too large for a duration (at most about 584 years)"
        );
        assert_eq!(
            parse_duration("10 sec").unwrap_err().to_string(),
            "`10 sec` has an unknown unit `sec`; expected one of ms, s, m, min, h, d"
        );
        assert_eq!(
            parse_duration("1.0000000001s").unwrap_err().to_string(),
            "`1.0000000001s` has more than 9 decimal places; durations are precise to the nanosecond"
        );
    }

    #[test]
    fn format_duration_round_trips() {
        for (d, s) in [
            (Duration::ZERO, "0"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(86400), "1d"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_micros(1500), "0.0015s"),
            (Duration::from_nanos(1), "0.000000001s"),
        ] {
            assert_eq!(format_duration(d), s);
            assert_eq!(parse_duration(s), Ok(d));
        }
        let max = Duration::from_nanos(u64::MAX);
        assert_eq!(parse_duration(&format_duration(max)), Ok(max));
    }

    #[test]
    fn sizes() {
        let ok = |s: &str| parse_size(s).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ok("1048576"), 1 << 20);
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("100B"), 100);
        assert_eq!(ok("1K"), 1024);
        assert_eq!(ok("1kib"), 1024);
        assert_eq!(ok("512MiB"), 512 << 20);
        assert_eq!(ok("100M"), 100 << 20);
        assert_eq!(ok("1GiB"), 1 << 30);
        assert_eq!(ok("1 G"), 1 << 30);
        assert_eq!(ok("2T"), 2 << 40);
        assert_eq!(ok("16777215TiB"), 16777215 << 40);
        assert_eq!(ok("18446744073709551615"), u64::MAX);
        for bad in [
            "",
            "M",
            "1.5G",
            "-1",
            "1PiB",
            "1MB",
            "1kb",
            "16777216TiB",
            "18446744073709551616",
            "1 2M",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            parse_size("16777216TiB").unwrap_err().to_string(),
            "`16777216TiB` is too large (at most 16 EiB)"
        );
        assert_eq!(
            parse_size("1gb").unwrap_err().to_string(),
            "`1gb`: `gb` is ambiguous; write `GiB` (1024-based, like systemd's `G`)"
        );
    }

    #[test]
    fn signals() {
        assert_eq!(parse_signal("SIGTERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("TERM"), Ok(Signal::SIGTERM));
        assert_eq!(parse_signal("sigquit"), Ok(Signal::SIGQUIT));
        assert_eq!(parse_signal("int"), Ok(Signal::SIGINT));
        assert_eq!(parse_signal("SIGKILL"), Ok(Signal::SIGKILL));
        assert!(parse_signal("").is_err());
        assert!(parse_signal("SIG").is_err());
        assert!(parse_signal("15").is_err());
        assert!(parse_signal("SIGTERMX").is_err());
    }
}
