//! The server side of D-Bus authentication (SASL EXTERNAL) for droved's
//! private socket, done by droved itself so that nothing a client sends
//! before it is authenticated can cost more than a few hundred bytes:
//! lines are at most [`MAX_LINE`] bytes, at most [`MAX_COMMANDS`] of them,
//! read one byte at a time so that not one byte after `BEGIN\r\n` (the
//! first D-Bus message) is taken from the socket. The caller bounds the
//! time.
//!
//! The identity that counts is the one the kernel reports (SO_PEERCRED);
//! EXTERNAL's claimed uid must merely agree with it. File descriptor
//! passing is refused: drove's interface takes none.

use tokio::net::UnixStream;

/// Longest line accepted (the spec's commands are short).
pub const MAX_LINE: usize = 512;
/// Commands accepted before BEGIN.
pub const MAX_COMMANDS: usize = 16;

/// What the server does after one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this line (without "\r\n") and read the next.
    Reply(String),
    /// Authenticated: the D-Bus messages start after this line.
    Begin,
    /// Give up (the reason is for the debug log).
    Fail(String),
}

/// The server's state between lines.
#[derive(Debug)]
pub struct Server {
    uid: u32,
    guid: String,
    authenticated: bool,
    awaiting_data: bool,
    commands: usize,
}

impl Server {
    /// A server for a peer the kernel says is `uid`, answering OK with `guid`.
    pub fn new(uid: u32, guid: &str) -> Server {
        Server {
            uid,
            guid: guid.to_string(),
            authenticated: false,
            awaiting_data: false,
            commands: 0,
        }
    }

    const REJECTED: &'static str = "REJECTED EXTERNAL";

    /// Whether EXTERNAL's data (hex of the uid in decimal ASCII) names
    /// the peer's uid; no data means "whoever the kernel says I am".
    fn identity_ok(&self, hex: Option<&str>) -> bool {
        let Some(hex) = hex else { return true };
        decode_hex(hex)
            .and_then(|b| String::from_utf8(b).ok())
            .is_some_and(|s| s == self.uid.to_string())
    }

    fn ok(&mut self) -> Step {
        self.authenticated = true;
        self.awaiting_data = false;
        Step::Reply(format!("OK {}", self.guid))
    }

    /// Handles one line (without its "\r\n").
    pub fn line(&mut self, line: &str) -> Step {
        self.commands += 1;
        if self.commands > MAX_COMMANDS {
            return Step::Fail(format!("more than {MAX_COMMANDS} commands before BEGIN"));
        }
        let mut words = line.split(' ');
        let command = words.next().unwrap_or_default();
        let args: Vec<&str> = words.collect();
        match (command, args.as_slice()) {
            ("AUTH", ["EXTERNAL"]) if !self.authenticated => {
                self.awaiting_data = true;
                Step::Reply("DATA".into())
            }
            ("AUTH", ["EXTERNAL", hex]) if !self.authenticated => {
                if self.identity_ok(Some(hex)) {
                    self.ok()
                } else {
                    Step::Reply(Self::REJECTED.into())
                }
            }
            ("DATA", data) if self.awaiting_data && data.len() <= 1 => {
                if self.identity_ok(data.first().copied()) {
                    self.ok()
                } else {
                    self.awaiting_data = false;
                    Step::Reply(Self::REJECTED.into())
                }
            }
            ("AUTH" | "CANCEL" | "ERROR" | "DATA", _) if !self.authenticated => {
                self.awaiting_data = false;
                Step::Reply(Self::REJECTED.into())
            }
            ("NEGOTIATE_UNIX_FD", []) if self.authenticated => {
                Step::Reply("ERROR file descriptor passing is not supported".into())
            }
            ("BEGIN", []) if self.authenticated => Step::Begin,
            ("BEGIN", _) => Step::Fail("BEGIN before authentication".into()),
            _ => Step::Reply("ERROR unexpected command".into()),
        }
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 64 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Why a handshake failed (logged at debug level only: anyone can cause it).
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the connection closed during authentication")]
    Closed,
    #[error("not D-Bus: the first byte is {0:#04x}, not NUL")]
    NotDbus(u8),
    #[error("a line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("{0}")]
    Refused(String),
}

async fn read_byte(stream: &UnixStream) -> Result<u8, HandshakeError> {
    let mut b = [0u8; 1];
    loop {
        stream.readable().await?;
        match stream.try_read(&mut b) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(_) => return Ok(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

async fn write_line(stream: &mut UnixStream, line: &str) -> Result<(), HandshakeError> {
    use tokio::io::AsyncWriteExt;
    let mut bytes = line.as_bytes().to_vec();
    bytes.extend_from_slice(b"\r\n");
    stream.write_all(&bytes).await?;
    Ok(())
}

/// Authenticates the client on `stream` as `uid`; on success the next byte
/// on the socket is the first of its first D-Bus message.
pub async fn accept(stream: &mut UnixStream, uid: u32, guid: &str) -> Result<(), HandshakeError> {
    match read_byte(stream).await? {
        0 => {}
        b => return Err(HandshakeError::NotDbus(b)),
    }
    let mut server = Server::new(uid, guid);
    let mut line = Vec::with_capacity(64);
    loop {
        let b = read_byte(stream).await?;
        if b != b'\n' {
            if line.len() >= MAX_LINE {
                return Err(HandshakeError::LineTooLong);
            }
            line.push(b);
            continue;
        }
        let text = line
            .strip_suffix(b"\r")
            .and_then(|l| std::str::from_utf8(l).ok())
            .unwrap_or("\u{fffd}")
            .to_string();
        line.clear();
        match server.line(&text) {
            Step::Reply(reply) => write_line(stream, &reply).await?,
            Step::Begin => return Ok(()),
            Step::Fail(why) => return Err(HandshakeError::Refused(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> String {
        s.bytes().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn external_with_the_kernels_uid_then_begin() {
        let mut s = Server::new(1000, "g");
        assert_eq!(
            s.line(&format!("AUTH EXTERNAL {}", hex("1000"))),
            Step::Reply("OK g".into())
        );
        assert_eq!(
            s.line("NEGOTIATE_UNIX_FD"),
            Step::Reply("ERROR file descriptor passing is not supported".into())
        );
        assert_eq!(s.line("BEGIN"), Step::Begin);
    }

    #[test]
    fn a_claimed_uid_that_is_not_the_peers_is_rejected() {
        let mut s = Server::new(1000, "g");
        assert_eq!(
            s.line(&format!("AUTH EXTERNAL {}", hex("0"))),
            Step::Reply("REJECTED EXTERNAL".into())
        );
        assert!(matches!(s.line("BEGIN"), Step::Fail(_)));
    }

    #[test]
    fn data_exchange_and_other_mechanisms() {
        let mut s = Server::new(0, "g");
        assert_eq!(s.line("AUTH"), Step::Reply("REJECTED EXTERNAL".into()));
        assert_eq!(
            s.line("AUTH ANONYMOUS 7a627573"),
            Step::Reply("REJECTED EXTERNAL".into())
        );
        assert_eq!(s.line("AUTH EXTERNAL"), Step::Reply("DATA".into()));
        assert_eq!(s.line("DATA"), Step::Reply("OK g".into()));
        assert_eq!(s.line("BEGIN"), Step::Begin);
    }

    #[test]
    fn garbage_gets_errors_then_the_door() {
        let mut s = Server::new(0, "g");
        assert_eq!(
            s.line("GET / HTTP/1.1"),
            Step::Reply("ERROR unexpected command".into())
        );
        assert_eq!(
            s.line(&format!("AUTH EXTERNAL {}", hex("zz"))),
            Step::Reply("REJECTED EXTERNAL".into())
        );
        for _ in 2..MAX_COMMANDS {
            assert!(matches!(s.line("x"), Step::Reply(_)));
        }
        assert!(matches!(s.line("x"), Step::Fail(_)));
    }

    #[test]
    fn hex_decoding() {
        assert_eq!(decode_hex("3130"), Some(b"10".to_vec()));
        assert_eq!(decode_hex("313"), None);
        assert_eq!(decode_hex("zz"), None);
    }
}
