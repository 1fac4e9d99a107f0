//! The D-Bus wire format as far as droved checks it before zbus sees a
//! message from the private socket (pure).
//!
//! zbus 5 accepts header fields whose names are invalid (an object path
//! `/a//b`, a member `a-b`) when it parses a message, then panics when it
//! reads them back (`Invalid field reconstruction`, zbus's
//! message/fields.rs): anyone who can reach the socket could make it panic
//! at will. So each message is read whole ([`message_len`] bounds it from
//! its fixed header) and [`check_header`] validates its header fields with
//! the very validators zbus later applies; a message that fails closes the
//! connection. See docs/zbus-upstream.md for the report to zbus.

use zbus::names::{BusName, ErrorName, InterfaceName, MemberName, UniqueName};
use zbus::zvariant::{ObjectPath, Signature};

/// The fixed part of every message's header.
pub const FIXED_HEADER: usize = 16;

fn u32_at(endian: u8, b: &[u8]) -> u32 {
    let b = [b[0], b[1], b[2], b[3]];
    if endian == b'l' {
        u32::from_le_bytes(b)
    } else {
        u32::from_be_bytes(b)
    }
}

fn endianness(first: u8) -> Result<u8, String> {
    match first {
        b'l' | b'B' => Ok(first),
        e => Err(format!("not a D-Bus message (endianness byte {e:#04x})")),
    }
}

/// The length of the whole message whose fixed header is `header`; an
/// error when it is over `max` bytes or not D-Bus.
pub fn message_len(header: &[u8; FIXED_HEADER], max: usize) -> Result<usize, String> {
    let endian = endianness(header[0])?;
    let body = u32_at(endian, &header[4..]) as usize;
    let fields = u32_at(endian, &header[12..]) as usize;
    let total = (FIXED_HEADER + fields)
        .next_multiple_of(8)
        .saturating_add(body);
    if total > max {
        return Err(format!(
            "a message of {total} bytes (at most {max} are accepted here)"
        ));
    }
    Ok(total)
}

/// Reads the header fields array, every read bounded by its end.
struct Cursor<'a> {
    msg: &'a [u8],
    pos: usize,
    end: usize,
    endian: u8,
}

impl<'a> Cursor<'a> {
    fn align(&mut self, n: usize) -> Result<(), String> {
        self.pos = self.pos.next_multiple_of(n);
        if self.pos > self.end {
            return Err("the header fields end inside their padding".into());
        }
        Ok(())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.end);
        let Some(end) = end else {
            return Err("a header field runs past the end of the header".into());
        };
        let bytes = &self.msg[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.align(4)?;
        Ok(u32_at(self.endian, self.take(4)?))
    }

    /// `len` bytes of UTF-8, then the NUL the wire format puts after them.
    fn text(&mut self, len: usize) -> Result<&'a str, String> {
        let bytes = self.take(len)?;
        if self.byte()? != 0 {
            return Err("a header string is not NUL-terminated".into());
        }
        std::str::from_utf8(bytes).map_err(|_| "a header string is not UTF-8".into())
    }
}

/// One header field's value, by its wire type.
enum Value<'a> {
    Str(&'a str),
    Path(&'a str),
    Sig(&'a str),
    U32(u32),
}

/// Which fields a message has, for the ones its type requires.
#[derive(Default)]
struct Seen {
    path: bool,
    interface: bool,
    member: bool,
    error_name: bool,
    reply_serial: bool,
}

/// Validates the header of the complete message `msg` as zbus will read
/// it: the fixed header, then every header field's type and value (names
/// and paths by zbus's own validators), and the fields each message type
/// requires. File descriptors are refused (droved takes none).
pub fn check_header(msg: &[u8]) -> Result<(), String> {
    if msg.len() < FIXED_HEADER {
        return Err("a message shorter than its fixed header".into());
    }
    let endian = endianness(msg[0])?;
    let kind = msg[1];
    if !(1..=4).contains(&kind) {
        return Err(format!("unknown message type {kind}"));
    }
    if msg[3] != 1 {
        return Err(format!("protocol version {}, not 1", msg[3]));
    }
    let fields_len = u32_at(endian, &msg[12..]) as usize;
    let end = FIXED_HEADER
        .checked_add(fields_len)
        .filter(|&e| e <= msg.len())
        .ok_or("the header fields run past the end of the message")?;
    let mut c = Cursor {
        msg,
        pos: FIXED_HEADER,
        end,
        endian,
    };
    let mut seen = Seen::default();
    while c.pos < end {
        c.align(8)?;
        let code = c.byte()?;
        let sig_len = c.byte()? as usize;
        let value = match c.text(sig_len)? {
            "s" => {
                let len = c.u32()? as usize;
                Value::Str(c.text(len)?)
            }
            "o" => {
                let len = c.u32()? as usize;
                Value::Path(c.text(len)?)
            }
            "g" => {
                let len = c.byte()? as usize;
                Value::Sig(c.text(len)?)
            }
            "u" => Value::U32(c.u32()?),
            other => return Err(format!("header field {code} has type {other:?}")),
        };
        check_field(code, value, &mut seen)?;
    }
    let missing = match kind {
        1 if !(seen.path && seen.member) => "a method call without a path or member",
        2 if !seen.reply_serial => "a reply without a reply serial",
        3 if !(seen.error_name && seen.reply_serial) => "an error without a name or reply serial",
        4 if !(seen.path && seen.interface && seen.member) => {
            "a signal without a path, interface or member"
        }
        _ => return Ok(()),
    };
    Err(missing.into())
}

fn check_field(code: u8, value: Value<'_>, seen: &mut Seen) -> Result<(), String> {
    let invalid = |what: &str, v: &str, e: &dyn std::fmt::Display| {
        Err(format!(
            "invalid {what} {:?}: {e}",
            v.escape_debug().to_string()
        ))
    };
    match (code, value) {
        (1, Value::Path(p)) => {
            seen.path = true;
            if let Err(e) = ObjectPath::try_from(p) {
                return invalid("object path", p, &e);
            }
        }
        (2, Value::Str(s)) => {
            seen.interface = true;
            if let Err(e) = InterfaceName::try_from(s) {
                return invalid("interface", s, &e);
            }
        }
        (3, Value::Str(s)) => {
            seen.member = true;
            if let Err(e) = MemberName::try_from(s) {
                return invalid("member", s, &e);
            }
        }
        (4, Value::Str(s)) => {
            seen.error_name = true;
            if let Err(e) = ErrorName::try_from(s) {
                return invalid("error name", s, &e);
            }
        }
        (5, Value::U32(n)) => {
            seen.reply_serial = true;
            if n == 0 {
                return Err("reply serial 0".into());
            }
        }
        (6, Value::Str(s)) => {
            if let Err(e) = BusName::try_from(s) {
                return invalid("destination", s, &e);
            }
        }
        (7, Value::Str(s)) => {
            if let Err(e) = UniqueName::try_from(s) {
                return invalid("sender", s, &e);
            }
        }
        (8, Value::Sig(s)) => {
            if let Err(e) = Signature::try_from(s) {
                return invalid("body signature", s, &e);
            }
        }
        (9, Value::U32(n)) => {
            if n != 0 {
                return Err(format!("{n} file descriptors (none are accepted)"));
            }
        }
        (1..=9, _) => return Err(format!("header field {code} has the wrong type")),
        // The spec says to ignore unknown fields; zbus refuses them, and a
        // client of droved has no reason to send any.
        _ => return Err(format!("unknown header field {code}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pad(b: &mut Vec<u8>, n: usize) {
        while !b.len().is_multiple_of(n) {
            b.push(0);
        }
    }

    /// A little-endian message of `kind` with `fields` (code, type, value)
    /// and no body, as the wire format lays it out.
    fn message(kind: u8, fields: &[(u8, &str, &str)]) -> Vec<u8> {
        let mut f = Vec::new();
        for (code, sig, val) in fields {
            // Offsets in `f` are the message's minus 16: same alignment.
            pad(&mut f, 8);
            f.push(*code);
            f.push(sig.len() as u8);
            f.extend_from_slice(sig.as_bytes());
            f.push(0);
            match *sig {
                "s" | "o" => {
                    pad(&mut f, 4);
                    f.extend_from_slice(&(val.len() as u32).to_le_bytes());
                    f.extend_from_slice(val.as_bytes());
                    f.push(0);
                }
                "g" => {
                    f.push(val.len() as u8);
                    f.extend_from_slice(val.as_bytes());
                    f.push(0);
                }
                "u" => {
                    pad(&mut f, 4);
                    f.extend_from_slice(&val.parse::<u32>().unwrap().to_le_bytes());
                }
                _ => f.extend_from_slice(val.as_bytes()),
            }
        }
        let mut m = vec![b'l', kind, 0, 1];
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&7u32.to_le_bytes());
        m.extend_from_slice(&(f.len() as u32).to_le_bytes());
        m.extend_from_slice(&f);
        pad(&mut m, 8);
        m
    }

    fn call(path: &str, iface: &str, member: &str) -> Vec<u8> {
        message(
            1,
            &[
                (1, "o", path),
                (2, "s", iface),
                (3, "s", member),
                (6, "s", "org.drove.Drove1"),
            ],
        )
    }

    #[test]
    fn well_formed_messages_pass() {
        let m = call("/org/drove/Drove1", "org.drove.Drove1", "ListWorkers");
        check_header(&m).unwrap();
        let head: [u8; 16] = m[..16].try_into().unwrap();
        assert_eq!(message_len(&head, 1 << 16).unwrap(), m.len());
        // A signal, a reply and an error with what they need.
        for m in [
            message(
                4,
                &[
                    (1, "o", "/a"),
                    (2, "s", "a.b"),
                    (3, "s", "C"),
                    (8, "g", "a{sv}"),
                ],
            ),
            message(2, &[(5, "u", "3"), (7, "s", ":1.2")]),
            message(3, &[(4, "s", "org.drove.Error.X"), (5, "u", "1")]),
        ] {
            check_header(&m).unwrap();
        }
    }

    #[test]
    fn invalid_names_that_zbus_would_panic_on_are_refused() {
        for (m, what) in [
            (
                call("/org/drove/Drove1", "org.drove.Drove1", "List-Workers!"),
                "member",
            ),
            (
                call("/org//drove", "org.drove.Drove1", "ListWorkers"),
                "object path",
            ),
            (
                call("/org/drove/Drove1", "org..drove", "ListWorkers"),
                "interface",
            ),
            (call("/a", "a.b", "1x"), "member"),
            (
                message(1, &[(1, "o", "/a"), (3, "s", "M"), (6, "s", "not a name")]),
                "destination",
            ),
            (
                message(
                    1,
                    &[(1, "o", "/a"), (3, "s", "M"), (7, "s", "org.drove.Drove1")],
                ),
                "sender",
            ),
            (
                message(3, &[(4, "s", "NoDots"), (5, "u", "1")]),
                "error name",
            ),
            (
                message(1, &[(1, "o", "/a"), (3, "s", "M"), (8, "g", "a{")]),
                "body signature",
            ),
        ] {
            let e = check_header(&m).unwrap_err();
            assert!(e.contains(&format!("invalid {what}")), "{what}: {e}");
        }
    }

    #[test]
    fn wrong_types_missing_fields_and_broken_layout_are_refused() {
        let cases = [
            (message(1, &[(1, "s", "/a"), (3, "s", "M")]), "wrong type"),
            (message(1, &[(1, "o", "/a"), (3, "v", "")]), "has type"),
            (message(1, &[(3, "s", "M")]), "without a path"),
            (message(2, &[]), "without a reply serial"),
            (message(2, &[(5, "u", "0")]), "reply serial 0"),
            (
                message(4, &[(1, "o", "/a"), (3, "s", "M")]),
                "signal without",
            ),
            (
                message(1, &[(1, "o", "/a"), (3, "s", "M"), (9, "u", "1")]),
                "file descriptors",
            ),
            (
                message(1, &[(1, "o", "/a"), (3, "s", "M"), (42, "u", "1")]),
                "unknown header field",
            ),
            (message(7, &[]), "unknown message type"),
        ];
        for (m, what) in cases {
            let e = check_header(&m).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        }
        // Lengths that point outside the header, a missing NUL, not UTF-8.
        let good = call("/a", "a.b", "M");
        let mut long = good.clone();
        long[12] = 0xff;
        assert!(check_header(&long).unwrap_err().contains("past the end"));
        let mut string_len = good.clone();
        string_len[20] = 0xf0; // the path's length
        assert!(
            check_header(&string_len)
                .unwrap_err()
                .contains("past the end")
        );
        let mut no_nul = good.clone();
        no_nul[26] = b'x'; // the NUL after "/a"
        assert!(check_header(&no_nul).is_err());
        let mut not_utf8 = good;
        not_utf8[25] = 0xff; // the "a" of "/a"
        assert!(check_header(&not_utf8).unwrap_err().contains("UTF-8"));
        assert!(check_header(b"GET / HTTP/1.1\r\n").is_err());
        assert!(check_header(b"l\x01").is_err());
    }

    #[test]
    fn lengths_come_from_the_fixed_header_and_big_ones_are_refused() {
        let mut h = [0u8; 16];
        h[0] = b'B';
        h[4..8].copy_from_slice(&10u32.to_be_bytes());
        h[12..16].copy_from_slice(&20u32.to_be_bytes());
        // 16 + 20 = 36, padded to 40, + 10.
        assert_eq!(message_len(&h, 1000).unwrap(), 50);
        h[4..8].copy_from_slice(&(128u32 << 20).to_be_bytes());
        assert!(message_len(&h, 1 << 16).unwrap_err().contains("at most"));
        assert!(message_len(b"GET / HTTP/1.1\r\n", 1 << 16).is_err());
    }
}
