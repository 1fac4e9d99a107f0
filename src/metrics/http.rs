// SPDX-License-Identifier: MIT OR Apache-2.0
//! The little HTTP/1.x a scraper needs (RFC 9112), pure: find the end of a
//! request head, parse it, and build responses. Every response closes the
//! connection, so there is no keep-alive state and no request body to
//! read; a scraper simply connects again.

use super::render::Format;

/// Longest request head accepted; a scraper's is a few hundred bytes.
pub const MAX_HEAD: usize = 8 * 1024;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Metrics {
        format: Format,
        head_only: bool,
    },
    /// `/`: a pointer to /metrics.
    Index {
        head_only: bool,
    },
    /// `/livez`: droved's loop turns (see `health`).
    Livez {
        head_only: bool,
    },
    /// `/readyz`: the pool takes traffic (see `health`).
    Readyz {
        head_only: bool,
    },
}

/// Why a request gets an error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
    VersionNotSupported,
}

impl Refusal {
    pub fn status(self) -> &'static str {
        match self {
            Refusal::BadRequest => "400 Bad Request",
            Refusal::NotFound => "404 Not Found",
            Refusal::MethodNotAllowed => "405 Method Not Allowed",
            Refusal::HeadTooLarge => "431 Request Header Fields Too Large",
            Refusal::VersionNotSupported => "505 HTTP Version Not Supported",
        }
    }
}

/// Length of the request head in `buf` (through the blank line), once it
/// is all there. A bare LF ends lines too (RFC 9112 section 2.2).
pub fn head_len(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let next = &buf[nl + 1..];
        if next.starts_with(b"\r\n") {
            return Some(nl + 3);
        }
        if next.starts_with(b"\n") {
            return Some(nl + 2);
        }
        i = nl + 1;
    }
    None
}

/// Parses a complete request head.
pub fn parse(head: &[u8]) -> Result<Route, Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| Refusal::BadRequest)?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or(Refusal::BadRequest)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::BadRequest);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Refusal::BadRequest);
    }
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") && v.len() == 8 => return Err(Refusal::VersionNotSupported),
        _ => return Err(Refusal::BadRequest),
    }
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(Refusal::BadRequest);
    }
    let mut accept = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').ok_or(Refusal::BadRequest)?;
        if name.is_empty() || name.bytes().any(|b| !is_token(b)) {
            return Err(Refusal::BadRequest);
        }
        if name.eq_ignore_ascii_case("accept") {
            accept.push(value.trim());
        }
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Refusal::MethodNotAllowed),
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    match path {
        "/metrics" => Ok(Route::Metrics {
            format: negotiate(&accept),
            head_only,
        }),
        "/" => Ok(Route::Index { head_only }),
        "/livez" => Ok(Route::Livez { head_only }),
        "/readyz" => Ok(Route::Readyz { head_only }),
        _ => Err(Refusal::NotFound),
    }
}

/// tchar of RFC 9110 section 5.6.2.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// OpenMetrics when an Accept header asks for it with a q above 0 (as
/// Prometheus does); the Prometheus text format otherwise.
pub fn negotiate(accept: &[&str]) -> Format {
    let wants_openmetrics = accept.iter().flat_map(|v| v.split(',')).any(|range| {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or("");
        if !media.eq_ignore_ascii_case("application/openmetrics-text") {
            return false;
        }
        let q = params
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .map_or(Some(1.0), |(_, v)| v.trim().parse::<f64>().ok());
        q.is_some_and(|q| q > 0.0)
    });
    if wants_openmetrics {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

/// A complete response that closes the connection.
pub fn response(status: &str, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
        body.len(),
        if status.starts_with("405") {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        }
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

/// The response to a refused request.
pub fn refusal(r: Refusal) -> Vec<u8> {
    let body = format!("{}\n", r.status());
    response(
        r.status(),
        "text/plain; charset=utf-8",
        body.as_bytes(),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Prometheus 2.x sends.
    const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nrest"), Some(27));
        assert_eq!(head_len(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_len(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_len(b""), None);
    }

    #[test]
    fn routes_requests() {
        let get = |head: &str| parse(head.as_bytes());
        assert_eq!(
            get("GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"),
            Ok(Route::Metrics {
                format: Format::Text,
                head_only: false
            })
        );
        assert_eq!(
            get(&format!(
                "GET /metrics?x=1 HTTP/1.1\r\nAccept: {PROMETHEUS_ACCEPT}\r\n\r\n"
            )),
            Ok(Route::Metrics {
                format: Format::OpenMetrics,
                head_only: false
            })
        );
        assert_eq!(
            get("HEAD /metrics HTTP/1.0\n\n"),
            Ok(Route::Metrics {
                format: Format::Text,
                head_only: true
            })
        );
        assert_eq!(
            get("GET / HTTP/1.1\r\n\r\n"),
            Ok(Route::Index { head_only: false })
        );
        assert_eq!(
            get("GET /livez HTTP/1.1\r\nHost: 10.0.0.7:9464\r\n\r\n"),
            Ok(Route::Livez { head_only: false })
        );
        assert_eq!(
            get("GET /readyz?verbose HTTP/1.1\r\nUser-Agent: kube-probe/1.31\r\n\r\n"),
            Ok(Route::Readyz { head_only: false })
        );
        assert_eq!(
            get("HEAD /readyz HTTP/1.1\r\n\r\n"),
            Ok(Route::Readyz { head_only: true })
        );
        assert_eq!(get("GET /readyz/ HTTP/1.1\r\n\r\n"), Err(Refusal::NotFound));
        assert_eq!(get("GET /x HTTP/1.1\r\n\r\n"), Err(Refusal::NotFound));
        assert_eq!(
            get("POST /metrics HTTP/1.1\r\n\r\n"),
            Err(Refusal::MethodNotAllowed)
        );
        assert_eq!(
            get("GET /metrics HTTP/2.0\r\n\r\n"),
            Err(Refusal::VersionNotSupported)
        );
    }

    #[test]
    fn garbage_is_a_bad_request() {
        for head in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n"[..], // a TLS hello
            b"hello\r\n\r\n",
            b"GET /metrics\r\n\r\n",
            b"GET  /metrics HTTP/1.1\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1 extra\r\n\r\n",
            b"GET /metrics FTP/1.1\r\n\r\n",
            b"get /metrics HTTP/1.1\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
            b"GET /met\x01rics HTTP/1.1\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(parse(head), Err(Refusal::BadRequest), "{head:?}");
        }
    }

    #[test]
    fn negotiates_the_format() {
        assert_eq!(negotiate(&[]), Format::Text);
        assert_eq!(negotiate(&["*/*"]), Format::Text);
        assert_eq!(negotiate(&["text/plain;version=0.0.4"]), Format::Text);
        assert_eq!(negotiate(&[PROMETHEUS_ACCEPT]), Format::OpenMetrics);
        assert_eq!(
            negotiate(&["Application/OpenMetrics-Text; version=1.0.0"]),
            Format::OpenMetrics
        );
        assert_eq!(
            negotiate(&["application/openmetrics-text;q=0, text/plain"]),
            Format::Text
        );
        assert_eq!(
            negotiate(&["text/plain", "application/openmetrics-text;q=0.2"]),
            Format::OpenMetrics
        );
    }

    #[test]
    fn builds_responses() {
        let r = String::from_utf8(response("200 OK", "text/plain", b"abc", false)).unwrap();
        assert_eq!(
            r,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc"
        );
        let r = String::from_utf8(response("200 OK", "text/plain", b"abc", true)).unwrap();
        assert!(
            r.ends_with("Content-Length: 3\r\nConnection: close\r\n\r\n"),
            "{r}"
        );
        let r = String::from_utf8(refusal(Refusal::MethodNotAllowed)).unwrap();
        assert!(r.contains("Allow: GET, HEAD\r\n"), "{r}");
    }
}
