//! The Relay's raw data path: one TCP connection to the monitor's port per
//! relayed connection. It opens with one request line; once the monitor
//! has connected the container port, the connection carries that port's
//! bytes as they are, spliced by the kernel at both ends, with no HTTP/2
//! framing and no copy through userspace. It keeps every rule of
//! `Relay.Dial`: the monitor's token, only a TCP port the monitor sees
//! listening (on that listener's own address), and a reset, never a clean
//! close, when either side fails.
//!
//! ```text
//! → PORTHOLE-RELAY/1 tcp PORT PROOF\n      (PROOF: signed:TS.NONCE.MAC, the token's
//!                                          signature of "relay tcp PORT"; the token
//!                                          itself from older clients; "-" without one)
//! ← OK ADDRESS\n                            then the port's bytes both ways
//! ← ERR CODE MESSAGE\n                      and the connection closes
//! ```
//!
//! The request goes in one write; the monitor's server tells it from
//! HTTP/1 and HTTP/2 by its first bytes ([`MAGIC`]). CODE is a gRPC status
//! code name (`FAILED_PRECONDITION`, `UNAUTHENTICATED`, ...).

use std::io;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How a raw relay request starts.
pub const MAGIC: &[u8] = b"PORTHOLE-RELAY/1 ";

/// Longest request or answer line.
pub const MAX_LINE: usize = 1024;

/// How long either side waits for the other's line.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads one line (without its `\n`) and not a byte past it, within
/// [`LINE_TIMEOUT`]: the bytes after it belong to the relayed connection.
pub async fn read_line(stream: &mut TcpStream) -> io::Result<String> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let read = async {
        let mut line = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let n = stream.peek(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            // Consume exactly what belongs to the line.
            let (take, done) = match buf[..n].iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (n, false),
            };
            stream.read_exact(&mut buf[..take]).await?;
            line.extend_from_slice(&buf[..take - usize::from(done)]);
            if line.len() > MAX_LINE {
                return Err(bad("line too long"));
            }
            if done {
                return String::from_utf8(line).map_err(|_| bad("line is not UTF-8"));
            }
        }
    };
    match tokio::time::timeout(LINE_TIMEOUT, read).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no line within {}s", LINE_TIMEOUT.as_secs()),
        )),
    }
}

/// The request line for TCP `port`: the token's signature of the request
/// (`signed:TS.NONCE.MAC`, see [`crate::auth::Token::signed`]), never the
/// token itself, or `-` without one.
pub fn request_line(port: u16, token: Option<&crate::auth::Token>) -> Vec<u8> {
    let proof = match token {
        Some(t) => format!("signed:{}", t.signed(&what(port))),
        None => "-".into(),
    };
    let mut line = MAGIC.to_vec();
    line.extend_from_slice(format!("tcp {port} {proof}\n").as_bytes());
    line
}

/// What a raw relay request's signature covers.
pub fn what(port: u16) -> String {
    format!("relay tcp {port}")
}

/// Whether a request's token field proves `token` for `port`: its
/// signature, or the token itself (older clients).
pub fn admits(token: &crate::auth::Token, port: u16, field: Option<&str>) -> bool {
    match field {
        Some(f) => match f.strip_prefix("signed:") {
            Some(signed) => token.verifies(&what(port), signed),
            None => token.matches(f.as_bytes()),
        },
        None => false,
    }
}

/// A request as the monitor reads it.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub port: u16,
    /// `None` when the client sent `-`.
    pub token: Option<String>,
}

/// Parses a request line (without `\n`).
pub fn parse_request(line: &str) -> Result<Request, String> {
    let rest = line
        .strip_prefix(std::str::from_utf8(MAGIC).expect("ASCII"))
        .ok_or("not a raw relay request")?;
    let mut words = rest.split(' ');
    let (Some(proto), Some(port), Some(token), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err("use PORTHOLE-RELAY/1 tcp PORT TOKEN".into());
    };
    if proto != "tcp" {
        return Err(format!(
            "protocol {:?}: the raw path carries TCP only",
            crate::text::clip(proto, 16)
        ));
    }
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("port {:?} is not in 1..65535", crate::text::clip(port, 16)))?;
    let token = (token != "-").then(|| token.to_string());
    Ok(Request { port, token })
}

/// What became of a request, as the client sees it.
#[derive(Debug)]
pub enum Answer {
    /// Connected to this address inside the container.
    Ok(String),
    /// Refused: the gRPC status code and why.
    Err { code: tonic::Code, message: String },
    /// Not a raw relay answer: the server does not speak this protocol (an
    /// older monitor answers as HTTP).
    Unknown(String),
}

/// Sends the request for `port` on `stream` (connected to the monitor)
/// and reads the answer.
pub async fn request(
    stream: &mut TcpStream,
    port: u16,
    token: Option<&crate::auth::Token>,
) -> io::Result<Answer> {
    stream.write_all(&request_line(port, token)).await?;
    // A monitor at its connection limit closes at once (an error here).
    let line = read_line(stream).await?;
    if let Some(addr) = line.strip_prefix("OK ") {
        return Ok(Answer::Ok(addr.to_string()));
    }
    if let Some(rest) = line.strip_prefix("ERR ") {
        let (code, message) = rest.split_once(' ').unwrap_or((rest, ""));
        return Ok(Answer::Err {
            code: code_named(code),
            message: message.to_string(),
        });
    }
    Ok(Answer::Unknown(crate::text::clip(&line, 80).into_owned()))
}

/// A status code's name on the wire: `FAILED_PRECONDITION`.
fn code_name(code: tonic::Code) -> String {
    let code = format!("{code:?}");
    let mut name = String::new();
    for (i, c) in code.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

/// The status code `name` names (UNKNOWN for a name it does not know).
fn code_named(name: &str) -> tonic::Code {
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| code_name(*c) == name)
        .unwrap_or(tonic::Code::Unknown)
}

/// The refusal line for `code` and `message` (kept to one line).
pub fn error_line(code: tonic::Code, message: &str) -> Vec<u8> {
    let name = code_name(code);
    let message: String = crate::text::clip(message, 400)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("ERR {name} {message}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_keep_their_names_both_ways() {
        for n in 0..=16 {
            let code = tonic::Code::from_i32(n);
            assert_eq!(code_named(&code_name(code)), code);
        }
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        assert_eq!(code_named("NO_SUCH_CODE"), tonic::Code::Unknown);
    }

    #[test]
    fn requests_parse_and_refuse_what_they_must() {
        let token = crate::auth::Token::new("s3cret").unwrap();
        let line = String::from_utf8(request_line(8080, Some(&token))).unwrap();
        assert!(!line.contains("s3cret"), "the token is never sent: {line}");
        let req = parse_request(line.trim_end()).unwrap();
        assert_eq!(req.port, 8080);
        // Its signature holds for this port, once.
        assert!(!admits(&token, 8081, req.token.as_deref()));
        assert!(admits(&token, 8080, req.token.as_deref()));
        assert!(!admits(&token, 8080, req.token.as_deref()), "a replay");
        // Older clients send the token itself.
        assert!(admits(&token, 8080, Some("s3cret")));
        assert!(!admits(&token, 8080, Some("s3creT")));
        let line = String::from_utf8(request_line(22, None)).unwrap();
        assert_eq!(parse_request(line.trim_end()).unwrap().token, None);
        for bad in [
            "GET / HTTP/1.1",
            "PORTHOLE-RELAY/1 udp 53 -",
            "PORTHOLE-RELAY/1 tcp 0 -",
            "PORTHOLE-RELAY/1 tcp 70000 -",
            "PORTHOLE-RELAY/1 tcp 80",
            "PORTHOLE-RELAY/1 tcp 80 - extra",
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
        assert_eq!(
            error_line(tonic::Code::FailedPrecondition, "no\nlistener"),
            b"ERR FAILED_PRECONDITION no listener\n"
        );
    }

    #[tokio::test]
    async fn a_line_is_read_without_the_bytes_after_it() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, _) = l.accept().await.unwrap();
        c.write_all(b"OK 127.0.0.1:80\nbanner").await.unwrap();
        assert_eq!(read_line(&mut s).await.unwrap(), "OK 127.0.0.1:80");
        let mut rest = [0u8; 6];
        s.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"banner");
    }
}
