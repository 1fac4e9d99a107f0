// SPDX-License-Identifier: MIT OR Apache-2.0
//! Text from workers and templates, made safe to show: one printable
//! line of bounded length. Pure.
//!
//! A worker's `STATUS=` and a template's `error <text>` end up in droved's
//! own `STATUS=` to systemd (a datagram of `VAR=value` lines, where an
//! embedded newline would add assignments such as `MAINPID=` in root's
//! name), in D-Bus properties any local user may read, in the journal and
//! on operators' terminals. [`OneLine`] holds text that has been through
//! [`one_line`]: line breaks and other whitespace controls become a single
//! space, every other control character (C0, DEL, C1) and the Unicode
//! bidirectional formatting characters are removed, and the result is cut
//! to a number of characters. The only ways to build one sanitize, so an
//! API that takes a `OneLine` cannot be handed raw worker text.

use std::fmt;

/// Characters kept when no other cap is given.
pub const MAX_CHARS: usize = 512;

/// Text that is one printable line of at most a given number of
/// characters (see the module documentation).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct OneLine(String);

impl OneLine {
    /// `text` made one line, cut to [`MAX_CHARS`] characters.
    pub fn new(text: &str) -> OneLine {
        OneLine::capped(text, MAX_CHARS)
    }

    /// `text` made one line, cut to `max_chars` characters.
    pub fn capped(text: &str, max_chars: usize) -> OneLine {
        OneLine(one_line(text, max_chars))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for OneLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::ops::Deref for OneLine {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<&str> for OneLine {
    fn from(text: &str) -> OneLine {
        OneLine::new(text)
    }
}

impl From<String> for OneLine {
    fn from(text: String) -> OneLine {
        OneLine::new(&text)
    }
}

/// Whether `c` breaks a line or is whitespace as a control character:
/// replaced by a space, so words on either side stay apart.
fn is_break(c: char) -> bool {
    matches!(
        c,
        '\n' | '\r' | '\t' | '\u{0B}' | '\u{0C}' | '\u{85}' | '\u{2028}' | '\u{2029}'
    )
}

/// Whether `c` is removed: other control characters, and the bidirectional
/// formatting characters that make a terminal show text in another order
/// than it is (CVE-2021-42574).
fn is_dropped(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200E}' | '\u{200F}' | '\u{061C}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `text` as one printable line of at most `max_chars` characters: each
/// run of line breaks and whitespace controls becomes one space, other
/// control and bidirectional formatting characters are removed (before
/// the cut, so they do not use up the budget).
pub fn one_line(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars * 4));
    let mut kept = 0;
    let mut in_break = false;
    for c in text.chars() {
        if kept == max_chars {
            break;
        }
        if is_break(c) {
            if !in_break {
                out.push(' ');
                kept += 1;
                in_break = true;
            }
            continue;
        }
        if is_dropped(c) {
            continue;
        }
        in_break = false;
        out.push(c);
        kept += 1;
    }
    out
}

impl serde::Serialize for OneLine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for OneLine {
    /// Sanitizes what it reads: a `OneLine` is one line wherever it came from.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<OneLine, D::Error> {
        let s = String::deserialize(d)?;
        Ok(OneLine::new(&s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_become_one_space() {
        assert_eq!(
            one_line("boom\nMAINPID=1\nWATCHDOG_USEC=1", 100),
            "boom MAINPID=1 WATCHDOG_USEC=1"
        );
        assert_eq!(one_line("a\r\n\r\nb", 100), "a b");
        assert_eq!(one_line("a\tb\u{0B}c\u{0C}d", 100), "a b c d");
        assert_eq!(one_line("a\u{2028}b\u{2029}c\u{85}d", 100), "a b c d");
        assert_eq!(one_line("\nlead and trail\n", 100), " lead and trail ");
    }

    #[test]
    fn other_controls_and_bidi_overrides_are_removed() {
        assert_eq!(
            one_line("\x1b[31mred\x1b[0m\x07bell\x7f\0nul\u{9b}c1", 100),
            "[31mred[0mbellnulc1"
        );
        assert_eq!(
            one_line("user\u{202E}txt.exe\u{2066}x\u{2069}\u{200F}", 100),
            "usertxt.exex"
        );
        // Removed characters do not join a break run: "a\n\x01\nb" keeps
        // one space.
        assert_eq!(one_line("a\n\x01\nb", 100), "a b");
        assert_eq!(one_line("héllo wörld ✓ 日本", 100), "héllo wörld ✓ 日本");
    }

    #[test]
    fn cut_on_a_character_boundary_after_cleaning() {
        assert_eq!(one_line(&"é".repeat(1000), 10), "é".repeat(10));
        assert_eq!(one_line("abc", 3), "abc");
        assert_eq!(one_line("abcd", 3), "abc");
        assert_eq!(one_line("abc", 0), "");
        let padded = format!("{}{}", "\x01".repeat(500), "y".repeat(300));
        assert_eq!(one_line(&padded, 256), "y".repeat(256));
        let breaks = format!("{}{}", "\n".repeat(500), "y".repeat(300));
        assert_eq!(one_line(&breaks, 4), " yyy");
    }

    #[test]
    fn every_way_to_build_one_sanitizes() {
        let raw = "boom\nMAINPID=1";
        assert_eq!(OneLine::new(raw).as_str(), "boom MAINPID=1");
        assert_eq!(OneLine::from(raw).as_str(), "boom MAINPID=1");
        assert_eq!(OneLine::from(raw.to_string()).as_str(), "boom MAINPID=1");
        assert_eq!(OneLine::capped(raw, 4).to_string(), "boom");
        assert_eq!(OneLine::new(&"x".repeat(2000)).chars().count(), MAX_CHARS);
        let json: OneLine = serde_json::from_str("\"a\\nSTATUS=b\"").unwrap();
        assert_eq!(json.as_str(), "a STATUS=b");
        assert_eq!(serde_json::to_string(&json).unwrap(), "\"a STATUS=b\"");
    }

    #[test]
    fn garbage_never_yields_a_control_character() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..2000 {
            let text: String = (0..40)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    char::from_u32((seed % 0x3000) as u32).unwrap_or('\u{202E}')
                })
                .collect();
            let line = one_line(&text, 32);
            assert!(line.chars().count() <= 32);
            assert!(
                !line
                    .chars()
                    .any(|c| c.is_control() || is_break(c) || is_dropped(c))
            );
        }
    }
}
