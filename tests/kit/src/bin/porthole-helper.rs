//! The programs the tests and benchmarks run inside a container:
//!
//! - `listen tcp|udp ADDR PORT [1|0|-]`: binds one socket (TCP: listens;
//!   for IPv6 the last argument sets IPV6_V6ONLY, `-` leaves the default),
//!   prints `ready`, and holds it until stdin closes.
//! - `serve ADDR PORT LABEL`: a TCP server (`::` is dual-stack) whose
//!   connections start with a command line: `ping` → `pong LABEL`; `echo` →
//!   every byte back as it comes, then after the client's half-close
//!   `END <count>`; `source N` → `N CRC32`, then N random bytes; `hold` →
//!   `holding`, then nothing until the client goes; `stall` → `stalled`,
//!   then it never reads again; `flood` → bytes until the client goes.
//!   Prints `ready` once it listens.
//! - `ports`: opens and closes echo listeners on request, one command per
//!   stdin line: `open PORT ADDR` → `ok NANOS` (the time `listen()`
//!   returned, in ns since the epoch); `close PORT` → `ok` (its connections
//!   are closed too); anything else → `err ...`.
//! - `udp-echo ADDR PORT`: sends every datagram back to where it came
//!   from; prints `ready` once bound.
//! - `hold ADDR BASE COUNT [PADDING...]`: listens on COUNT TCP ports of
//!   ADDR from BASE (0: any free ones), prints `ready`, then per stdin
//!   line closes the port the previous line opened and opens another
//!   (churn), until stdin closes. The padding only lengthens its command
//!   line.
//! - `trickle SRC DST PORT COUNT FIRST`: keeps COUNT connections from
//!   address SRC to DST:PORT open, each having sent FIRST (a first line
//!   never finished), opening a new one whenever one is closed; prints
//!   `ready` once COUNT are started, and a line `closed N` per 50 closes,
//!   until killed. A peer holding a server's connection slots.
//! - `flip ADDR PORT`: a TCP server that answers every byte with its
//!   complement (255 - b) and half-closes when the client does.
//! - `greet-then-count ADDR PORT`: greets each connection with `hello, and
//!   that is all`, half-closes at once, counts what the client still sends
//!   and prints `heard N` when the client ends.
//! - `greet ADDR PORT TEXT [ARGS...]`: sends TEXT to each connection and
//!   closes it (the extra arguments only stand in its command line).
//! - `backlog ADDR PORT`: listens with a backlog of one and never accepts.
//! - `transfer download|upload ADDR PORT TOTAL`: serves one connection:
//!   sends TOTAL bytes of a fixed pattern then half-closes and reads to the
//!   end (`DONE N SHA256`), or reads to the end (`EOF N SHA256`); a
//!   failure prints `ERR N WHY`.
//! - `read-line ADDR PORT`: a client: connects, reads to the first line
//!   or EOF, prints `LINE <text>`, `EOF` or `ERR <why>`, then the seconds
//!   from connect to that.
//!
//! Every server prints `ready` once it listens.

use porthole_testkit::{crc32, XorShift};
use socket2::{Domain, Socket, Type};
use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let result = rt.block_on(async {
        match args.as_slice() {
            ["listen", proto, addr, port, rest @ ..] => {
                let v6only = match rest.first() {
                    Some(&"1") => Some(true),
                    Some(&"0") => Some(false),
                    _ => None,
                };
                listen(proto, sockaddr(addr, port)?, v6only).await
            }
            ["serve", addr, port, label] => serve(sockaddr(addr, port)?, label.to_string()).await,
            ["ports"] => ports().await,
            ["udp-echo", addr, port] => udp_echo(sockaddr(addr, port)?).await,
            ["hold", addr, base, count, ..] => hold(addr, base, count).await,
            ["trickle", src, dst, port, count, first] => {
                let src: IpAddr = src.parse().map_err(|_| format!("bad address {src:?}"))?;
                let count: usize = count.parse().map_err(|_| format!("bad count {count:?}"))?;
                trickle(src, sockaddr(dst, port)?, count, first.as_bytes()).await
            }
            ["flip", addr, port] => flip(sockaddr(addr, port)?).await,
            ["greet-then-count", addr, port] => greet_then_count(sockaddr(addr, port)?).await,
            ["greet", addr, port, text, ..] => greet(sockaddr(addr, port)?, text).await,
            ["backlog", addr, port] => backlog(sockaddr(addr, port)?).await,
            ["transfer", mode, addr, port, total] => {
                let total: u64 = total.parse().map_err(|_| format!("bad total {total:?}"))?;
                transfer(mode, sockaddr(addr, port)?, total).await
            }
            ["read-line", addr, port] => read_line(sockaddr(addr, port)?).await,
            _ => Err(
                "usage: porthole-helper listen|serve|ports|hold|flip|greet|... (see its doc)"
                    .to_string(),
            ),
        }
    });
    if let Err(e) = result {
        eprintln!("porthole-helper: {e}");
        std::process::exit(2);
    }
}

fn sockaddr(addr: &str, port: &str) -> Result<SocketAddr, String> {
    let ip: IpAddr = addr.parse().map_err(|_| format!("bad address {addr:?}"))?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    Ok(SocketAddr::new(ip, port))
}

fn ready(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A socket bound to `addr` with SO_REUSEADDR, and IPV6_V6ONLY as asked.
fn socket(addr: SocketAddr, kind: Type, v6only: Option<bool>) -> Result<Socket, String> {
    let s = Socket::new(Domain::for_address(addr), kind, None).map_err(|e| e.to_string())?;
    s.set_reuse_address(true).map_err(|e| e.to_string())?;
    if let (true, Some(only)) = (addr.is_ipv6(), v6only) {
        s.set_only_v6(only).map_err(|e| e.to_string())?;
    }
    s.bind(&addr.into())
        .map_err(|e| format!("bind {addr}: {e}"))?;
    Ok(s)
}

fn tcp_listener(addr: SocketAddr, v6only: Option<bool>) -> Result<TcpListener, String> {
    let s = socket(addr, Type::STREAM, v6only)?;
    s.listen(1024).map_err(|e| e.to_string())?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    TcpListener::from_std(s.into()).map_err(|e| e.to_string())
}

async fn listen(proto: &str, addr: SocketAddr, v6only: Option<bool>) -> Result<(), String> {
    let _held: Socket = match proto {
        "tcp" => {
            let s = socket(addr, Type::STREAM, v6only)?;
            s.listen(16).map_err(|e| e.to_string())?;
            s
        }
        "udp" => socket(addr, Type::DGRAM, v6only)?,
        other => return Err(format!("unknown protocol {other:?}")),
    };
    ready("ready");
    // Held until stdin closes.
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}

async fn serve(addr: SocketAddr, label: String) -> Result<(), String> {
    let listener = tcp_listener(addr, addr.is_ipv6().then_some(false))?;
    ready("ready");
    let label: std::sync::Arc<str> = label.into();
    loop {
        let (conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
        tokio::spawn(command(conn, label.clone()));
    }
}

/// One connection of `serve`: its first line says what to do.
async fn command(conn: TcpStream, label: std::sync::Arc<str>) -> std::io::Result<()> {
    let mut conn = BufReader::new(conn);
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        return Ok(());
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["ping"] => conn.write_all(format!("pong {label}\n").as_bytes()).await,
        ["GET", _, version] if version.starts_with("HTTP/1.") => {
            // The headers, then `LABEL` as the body; the connection closes.
            loop {
                line.clear();
                if conn.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                    break;
                }
            }
            let body = format!("{label}\n");
            let answer = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            conn.write_all(answer.as_bytes()).await
        }
        ["echo"] => {
            // Bytes already read past the line go back first.
            let mut n = 0u64;
            let mut buf = vec![0u8; 1 << 18];
            loop {
                let got = conn.read(&mut buf).await?;
                if got == 0 {
                    break;
                }
                conn.get_mut().write_all(&buf[..got]).await?;
                n += got as u64;
            }
            conn.get_mut()
                .write_all(format!("END {n}\n").as_bytes())
                .await
        }
        ["source", n] => {
            let n: usize = n.parse().map_err(std::io::Error::other)?;
            let mut rng = XorShift::seeded();
            let data: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            let head = format!("{} {}\n", data.len(), crc32(&data));
            conn.write_all(head.as_bytes()).await?;
            conn.write_all(&data).await
        }
        ["stall"] => {
            // Never reads again: the client's bytes pile up in front of it.
            conn.write_all(b"stalled\n").await?;
            std::future::pending::<()>().await;
            Ok(())
        }
        ["flood"] => {
            // Writes until the client goes, however slowly it reads.
            let block = vec![0x5a; 65536];
            loop {
                conn.write_all(&block).await?;
            }
        }
        ["hold"] => {
            conn.write_all(b"holding\n").await?;
            let mut buf = [0u8; 65536];
            while conn.read(&mut buf).await? != 0 {}
            Ok(())
        }
        _ => Ok(()),
    }
}

/// `ports`: echo listeners opened and closed on request.
async fn ports() -> Result<(), String> {
    let mut open: HashMap<u16, (CancellationToken, JoinHandle<()>)> = HashMap::new();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    ready("ready");
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["open", port, addr] => {
                match sockaddr(addr, port).and_then(|a| tcp_listener(a, None)) {
                    Ok(listener) => {
                        let at = SystemTime::now()
                            .duration_since(UNIX_EPOCH)
                            .unwrap_or_default();
                        let cancel = CancellationToken::new();
                        let task = tokio::spawn(echo_all(listener, cancel.clone()));
                        open.insert(listener_port(port), (cancel, task));
                        format!("ok {}", at.as_nanos())
                    }
                    Err(e) => format!("err {e}"),
                }
            }
            ["close", port] => match open.remove(&listener_port(port)) {
                Some((cancel, task)) => {
                    // The listener and its connections are closed when the
                    // task ends.
                    cancel.cancel();
                    let _ = task.await;
                    "ok".to_string()
                }
                None => format!("err port {port} is not open"),
            },
            _ => "err unknown command".to_string(),
        };
        ready(&reply);
    }
    Ok(())
}

fn listener_port(port: &str) -> u16 {
    port.parse().unwrap_or(0)
}

/// Accepts on `listener` and echoes every connection until `cancel`.
async fn echo_all(listener: TcpListener, cancel: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            accepted = listener.accept() => {
                if let Ok((mut conn, _)) = accepted {
                    let cancel = cancel.clone();
                    conns.spawn(async move {
                        let (mut r, mut w) = conn.split();
                        tokio::select! {
                            _ = cancel.cancelled() => {}
                            _ = tokio::io::copy(&mut r, &mut w) => {}
                        }
                    });
                }
            }
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// `hold`: many listening ports at once, and churn on request.
async fn hold(addr: &str, base: &str, count: &str) -> Result<(), String> {
    let base: u16 = base.parse().map_err(|_| format!("bad port {base:?}"))?;
    let count: u16 = count.parse().map_err(|_| format!("bad count {count:?}"))?;
    let at = |port: u16| sockaddr(addr, &port.to_string());
    let mut held = Vec::with_capacity(count.into());
    for i in 0..count {
        let port = if base == 0 { 0 } else { base + i };
        held.push(tcp_listener(at(port)?, None)?);
    }
    ready("ready");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut churned: Option<TcpListener> = None;
    while lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .is_some()
    {
        drop(churned.take());
        churned = Some(tcp_listener(at(0)?, None)?);
    }
    drop((held, churned));
    Ok(())
}

/// `udp-echo`: every datagram back to its sender, boundaries kept.
async fn udp_echo(addr: SocketAddr) -> Result<(), String> {
    let s = socket(addr, Type::DGRAM, addr.is_ipv6().then_some(false))?;
    // Room for bursts of large datagrams (best effort: rmem_max caps it).
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    let udp = tokio::net::UdpSocket::from_std(s.into()).map_err(|e| e.to_string())?;
    ready("ready");
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = udp.recv_from(&mut buf).await.map_err(|e| e.to_string())?;
        let _ = udp.send_to(&buf[..n], from).await;
    }
}

/// See `trickle` in the module's documentation.
async fn trickle(src: IpAddr, dst: SocketAddr, count: usize, first: &[u8]) -> Result<(), String> {
    let first = first.to_vec();
    let open = || {
        let first = first.clone();
        async move {
            let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| format!("bind {src}: {e}"))?;
            let mut conn = socket
                .connect(dst)
                .await
                .map_err(|e| format!("connect {dst}: {e}"))?;
            conn.write_all(&first).await.map_err(|e| e.to_string())?;
            // Held until the server closes it.
            let mut byte = [0u8; 1];
            let _ = conn.read(&mut byte).await;
            Ok::<(), String>(())
        }
    };
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let spawn = |closed: tokio::sync::mpsc::UnboundedSender<()>| {
        let held = open();
        tokio::spawn(async move {
            let _ = held.await;
            let _ = closed.send(());
        })
    };
    for _ in 0..count {
        spawn(closed_tx.clone());
    }
    ready("ready");
    let mut closes = 0u64;
    while let Some(()) = closed_rx.recv().await {
        closes += 1;
        if closes.is_multiple_of(50) {
            ready(&format!("closed {closes}"));
        }
        // A moment's pause: a refused connect is not a busy loop.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        spawn(closed_tx.clone());
    }
    Ok(())
}

/// A listener on `addr` (address reuse on, as servers set it); prints
/// `ready`.
async fn server(addr: SocketAddr) -> Result<TcpListener, String> {
    let listener = reusable(addr, 64)?;
    say("ready");
    Ok(listener)
}

/// A bound, listening socket with SO_REUSEADDR and `backlog`.
fn reusable(addr: SocketAddr, backlog: i32) -> Result<TcpListener, String> {
    let fail = |e: std::io::Error| format!("cannot listen on {addr}: {e}");
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).map_err(fail)?;
    socket.set_reuse_address(true).map_err(fail)?;
    socket.bind(&addr.into()).map_err(fail)?;
    socket.listen(backlog).map_err(fail)?;
    socket.set_nonblocking(true).map_err(fail)?;
    TcpListener::from_std(socket.into()).map_err(fail)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn flip(addr: SocketAddr) -> Result<(), String> {
    let listener = server(addr).await?;
    loop {
        let (mut conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            loop {
                let n = match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf[..n].iter_mut().for_each(|b| *b = 255 - *b);
                if conn.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            let _ = conn.shutdown().await;
        });
    }
}

async fn greet_then_count(addr: SocketAddr) -> Result<(), String> {
    let listener = server(addr).await?;
    loop {
        let (mut conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let _ = conn.write_all(b"hello, and that is all").await;
        let _ = conn.shutdown().await;
        let mut heard = 0u64;
        let mut buf = vec![0u8; 65536];
        while let Ok(n @ 1..) = conn.read(&mut buf).await {
            heard += n as u64;
        }
        say(&format!("heard {heard}"));
    }
}

async fn greet(addr: SocketAddr, text: &str) -> Result<(), String> {
    let listener = server(addr).await?;
    loop {
        let (mut conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let _ = conn.write_all(text.as_bytes()).await;
    }
}

async fn backlog(addr: SocketAddr) -> Result<(), String> {
    let _listener = reusable(addr, 0)?;
    say("ready");
    std::future::pending::<()>().await;
    Ok(())
}

async fn transfer(mode: &str, addr: SocketAddr, total: u64) -> Result<(), String> {
    use sha2::{Digest, Sha256};
    let listener = reusable(addr, 4)?;
    say("ready");
    let (mut conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
    let (mut hash, mut n) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 1 << 20];
    let result: std::io::Result<&str> = async {
        if mode == "download" {
            let block: Vec<u8> = (0..=255u8).cycle().take(65536).collect();
            while n < total {
                let part = &block[..block.len().min((total - n) as usize)];
                conn.write_all(part).await?;
                hash.update(part);
                n += part.len() as u64;
            }
            conn.shutdown().await?;
            while conn.read(&mut buf).await? > 0 {}
            Ok("DONE")
        } else {
            loop {
                let got = conn.read(&mut buf).await?;
                if got == 0 {
                    break Ok("EOF");
                }
                hash.update(&buf[..got]);
                n += got as u64;
            }
        }
    }
    .await;
    match result {
        Ok(word) => say(&format!("{word} {n} {:x}", hash.finalize())),
        Err(e) => say(&format!("ERR {n} {:?} {e}", e.kind())),
    }
    Ok(())
}

async fn read_line(addr: SocketAddr) -> Result<(), String> {
    let connected =
        tokio::time::timeout(std::time::Duration::from_secs(15), TcpStream::connect(addr)).await;
    let mut conn = match connected {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            say(&format!("ERR {e}\n0"));
            return Ok(());
        }
        Err(_) => {
            say("ERR timed out\n0");
            return Ok(());
        }
    };
    let started = std::time::Instant::now();
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            if data.contains(&b'\n') {
                return Ok(());
            }
            match conn.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(n) => data.extend_from_slice(&buf[..n]),
                Err(e) => return Err(e),
            }
        }
    };
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(15), read)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    let took = started.elapsed().as_secs_f64();
    match outcome {
        Err(e) => say(&format!("ERR {e}\n0")),
        Ok(()) if data.is_empty() => say(&format!("EOF\n{took}")),
        Ok(()) => {
            let line = data.split(|b| *b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            say(&format!("LINE {}\n{took}", line.trim()));
        }
    }
    Ok(())
}
