//! Connection workloads against an echo server (every byte back, as the
//! kit's `ports` helper serves them), for the benchmarks: many short
//! connections one after another, many concurrent ones moving a megabyte,
//! request/response round trips on kept-alive connections, and idle
//! connections held open. Each is bounded in count and in time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What [`short_connections`] saw.
pub struct Short {
    pub done: usize,
    pub failed: usize,
    pub per_second: f64,
    /// From starting to connect to the first byte echoed, sorted.
    pub first_byte: Vec<Duration>,
}

/// Up to `n` connect–one-byte-echo–close cycles one after another, for
/// at most `budget`.
pub async fn short_connections(addr: SocketAddr, n: usize, budget: Duration) -> Short {
    let started = Instant::now();
    let mut first_byte = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        if started.elapsed() > budget {
            break;
        }
        let t0 = Instant::now();
        let cycle = async {
            let mut s = TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            let at = t0.elapsed();
            s.shutdown().await?;
            // The far end closes too: the cycle is whole.
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await?;
            std::io::Result::Ok(at)
        };
        match tokio::time::timeout(Duration::from_secs(5), cycle).await {
            Ok(Ok(at)) => first_byte.push(at),
            _ => failed += 1,
        }
    }
    let took = started.elapsed();
    first_byte.sort();
    Short {
        done: first_byte.len(),
        failed,
        per_second: first_byte.len() as f64 / took.as_secs_f64(),
        first_byte,
    }
}

/// What [`concurrent`] saw.
pub struct Concurrent {
    pub done: usize,
    pub failed: usize,
    /// Why the first failed connection failed.
    pub first_error: Option<String>,
    pub took: Duration,
    /// Payload each way, all connections, per second.
    pub gbits: f64,
}

/// `n` connections at once, each sending `size` bytes and reading them
/// back; at most `budget` in all.
pub async fn concurrent(addr: SocketAddr, n: usize, size: usize, budget: Duration) -> Concurrent {
    let started = Instant::now();
    let data = std::sync::Arc::new(vec![0x6bu8; size]);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let data = data.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                let (mut r, mut w) = s.split();
                let send = async {
                    w.write_all(&data).await?;
                    w.shutdown().await
                };
                let receive = async {
                    let mut got = 0;
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match r.read(&mut buf).await? {
                            0 => return std::io::Result::Ok(got),
                            k => got += k,
                        }
                    }
                };
                let ((), got) = tokio::try_join!(send, receive)?;
                if got == data.len() {
                    Ok(())
                } else {
                    Err(std::io::Error::other(format!(
                        "{got} of {} bytes back",
                        data.len()
                    )))
                }
            })
        })
        .collect();
    let mut done = 0;
    let mut failed = 0;
    let mut first_error = None;
    let deadline = started + budget;
    for t in tasks {
        let why = match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), t).await {
            Ok(Ok(Ok(()))) => {
                done += 1;
                continue;
            }
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "not done within the budget".to_string(),
        };
        failed += 1;
        first_error.get_or_insert(why);
    }
    let took = started.elapsed();
    Concurrent {
        done,
        failed,
        first_error,
        took,
        gbits: (done * size) as f64 * 8.0 / took.as_secs_f64() / 1e9,
    }
}

/// What [`kept_alive`] saw.
pub struct KeptAlive {
    pub exchanges: usize,
    pub failed: usize,
    pub took: Duration,
}

/// `conns` connections at once, each doing `exchanges` 64-byte request /
/// echo round trips before it closes.
pub async fn kept_alive(addr: SocketAddr, conns: usize, exchanges: usize) -> KeptAlive {
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let request = [b'r'; 64];
                let mut reply = [0u8; 64];
                for _ in 0..exchanges {
                    s.write_all(&request).await?;
                    s.read_exact(&mut reply).await?;
                }
                s.shutdown().await?;
                let mut rest = Vec::new();
                s.read_to_end(&mut rest).await?;
                std::io::Result::Ok(exchanges)
            })
        })
        .collect();
    let mut done = 0;
    let mut failed = 0;
    for t in tasks {
        match tokio::time::timeout(Duration::from_secs(60), t).await {
            Ok(Ok(Ok(n))) => done += n,
            _ => failed += 1,
        }
    }
    KeptAlive {
        exchanges: done,
        failed,
        took: started.elapsed(),
    }
}

/// `n` connections that each echo one byte and then stay open, idle,
/// until the returned vector is dropped; stops at the first that cannot
/// (then the second value is 1).
pub async fn idle(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut held = Vec::with_capacity(n);
    let mut failed = 0;
    while held.len() < n && failed == 0 {
        let open = async {
            let mut s = TcpStream::connect(addr).await?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            std::io::Result::Ok(s)
        };
        match tokio::time::timeout(Duration::from_secs(5), open).await {
            Ok(Ok(s)) => held.push(s),
            _ => failed += 1,
        }
    }
    (held, failed)
}

/// Open file descriptors of `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}
