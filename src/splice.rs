//! Zero-copy relaying between two sockets: each direction moves bytes with
//! `splice(2)` from one socket into a pipe and from the pipe into the other
//! socket, so they never enter userspace. Same semantics as
//! [`crate::relay::copy_verified`]: half-close passes on, either direction
//! failing ends both (the caller then resets its sockets), and the counters
//! advance as bytes are delivered. A direction holds a pipe only while
//! bytes are in flight: it takes one from a small process-wide pool when
//! bytes come and gives it back, empty, once nothing more waits, so an idle
//! connection holds no pipe at all (HAProxy keeps its pipes the same way).
//! When no pipe can be had (out of file descriptors) a direction copies
//! through userspace instead.

use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::io::Interest;
use tokio::net::{TcpStream, UnixStream};

/// Pipe size asked for: fewer, larger moves. Pages are taken only while
/// bytes are in flight, so a pooled pipe costs none of it.
const PIPE_SIZE: usize = 1 << 20;
/// Every splice: never blocks (the sockets are non-blocking too).
const FLAGS: SpliceFlags = SpliceFlags::MOVE.union(SpliceFlags::NONBLOCK);
/// Empty pipes kept for the next burst; more are closed.
const POOL_MAX: usize = 64;

/// Empty pipes, ready to be taken.
static POOL: std::sync::Mutex<Vec<Pipe>> = std::sync::Mutex::new(Vec::new());

/// A tokio socket whose readiness can be awaited and whose descriptor
/// `splice` can use.
pub trait Socket: AsFd {
    fn ready(&self, interest: Interest) -> impl std::future::Future<Output = io::Result<()>>;
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            async fn ready(&self, interest: Interest) -> io::Result<()> {
                <$t>::ready(self, interest).await.map(drop)
            }
            fn try_io<R>(
                &self,
                interest: Interest,
                f: impl FnOnce() -> io::Result<R>,
            ) -> io::Result<R> {
                <$t>::try_io(self, interest, f)
            }
        }
    };
}
socket!(TcpStream);
socket!(UnixStream);

/// One direction's pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// A pooled pipe, or a new one.
    fn take() -> io::Result<Pipe> {
        let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
        pooled.map_or_else(Pipe::new, Ok)
    }

    /// Back to the pool; only an empty pipe may be given back.
    fn give_back(self) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(self);
        }
    }

    fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)?;
        // Best effort: the system's pipe-max-size may be lower.
        let _ = fcntl_setpipe_size(&write, PIPE_SIZE);
        Ok(Pipe { read, write })
    }
}

/// `f` until it stops saying "would block", awaiting `interest` on `sock`
/// between tries.
async fn retry<S: Socket>(
    sock: &S,
    interest: Interest,
    mut f: impl FnMut() -> io::Result<usize>,
) -> io::Result<usize> {
    loop {
        sock.ready(interest).await?;
        match sock.try_io(interest, &mut f) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return other,
        }
    }
}

/// Moves `r`'s bytes to `w` until `r` ends, then shuts `w`'s write half
/// (if `ended_cleanly` agrees). A pipe (or, out of file descriptors, a
/// buffer) is held from the moment bytes come until they are all written
/// and `r` has no more: an idle direction holds none.
async fn one_way<R: Socket, W: Socket>(
    r: &R,
    w: &W,
    counter: &AtomicU64,
    ended_cleanly: &(dyn Fn() -> io::Result<()> + Sync),
) -> io::Result<()> {
    let mut held: Option<Way> = None;
    loop {
        // Nothing is in flight here, so "would block" can only be the
        // socket's: the empty pipe goes back while `r` has nothing.
        let n = loop {
            r.ready(Interest::READABLE).await?;
            let way = held.get_or_insert_with(Way::take);
            match r.try_io(Interest::READABLE, || way.fill(r)) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Way::give_back(held.take()),
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            Way::give_back(held.take());
            ended_cleanly()?;
            return socket2::SockRef::from(w).shutdown(std::net::Shutdown::Write);
        }
        let way = held.as_ref().expect("taken before reading");
        let mut done = 0;
        while done < n {
            // The pipe or buffer holds bytes: "would block" is the socket's.
            done += retry(w, Interest::WRITABLE, || way.drain(w, done, n)).await?;
        }
        counter.fetch_add(n as u64, Relaxed);
    }
}

/// How one direction moves its bytes.
enum Way {
    Pipe(Pipe),
    Buffer(Vec<u8>),
}

impl Way {
    fn take() -> Way {
        match Pipe::take() {
            Ok(pipe) => Way::Pipe(pipe),
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splice; copying through userspace");
                Way::Buffer(vec![0; crate::relay::CHUNK])
            }
        }
    }

    /// Only when empty: everything read was written.
    fn give_back(way: Option<Way>) {
        if let Some(Way::Pipe(pipe)) = way {
            pipe.give_back();
        }
    }

    /// Reads what `r` has into the (empty) pipe or buffer.
    fn fill(&mut self, r: &impl AsFd) -> io::Result<usize> {
        Ok(match self {
            Way::Pipe(pipe) => splice(r, None, &pipe.write, None, PIPE_SIZE, FLAGS)?,
            Way::Buffer(buf) => rustix::io::read(r, &mut buf[..])?,
        })
    }

    /// Writes bytes `done..n` of what [`Way::fill`] read to `w`.
    fn drain(&self, w: &impl AsFd, done: usize, n: usize) -> io::Result<usize> {
        Ok(match self {
            Way::Pipe(pipe) => splice(&pipe.read, None, w, None, n - done, FLAGS)?,
            Way::Buffer(buf) => rustix::io::write(w, &buf[done..n])?,
        })
    }
}

/// Relays `a` ↔ `b` until both directions ended, counting bytes each way;
/// an end of `b` counts as clean only if `b_ended_cleanly` agrees (see
/// [`crate::relay::copy_verified`]).
pub async fn copy_verified<A: Socket, B: Socket>(
    a: &mut A,
    b: &mut B,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
    b_ended_cleanly: &(dyn Fn() -> io::Result<()> + Sync),
) -> io::Result<()> {
    let (a, b) = (&*a, &*b);
    let up = one_way(a, b, a_to_b, &|| Ok(()));
    let down = one_way(b, a, b_to_a, b_ended_cleanly);
    tokio::try_join!(up, down).map(drop)
}

/// [`copy_verified`] where every end is clean.
pub async fn copy<A: Socket, B: Socket>(
    a: &mut A,
    b: &mut B,
    a_to_b: &AtomicU64,
    b_to_a: &AtomicU64,
) -> io::Result<()> {
    copy_verified(a, b, a_to_b, b_to_a, &|| Ok(())).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair of TCP sockets on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// client ⇄ (a | relay | b) ⇄ server: the client sends `size` bytes
    /// and half-closes; the server reads them to the end, then answers with
    /// the first `answer` of them (its half still open) and half-closes.
    /// Both ends get every byte in order, and the counts say so.
    async fn relay_and_check(
        (mut client, mut a): (TcpStream, TcpStream),
        (mut b, mut server): (TcpStream, TcpStream),
        size: u32,
        answer: usize,
    ) {
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let sent = data.clone();
        let client_side = async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        };
        let server_side = async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            server.write_all(&got[..answer]).await.unwrap();
            server.shutdown().await.unwrap();
            got
        };
        let relay = copy(&mut a, &mut b, &up, &down);
        let (back, got, relayed) = tokio::join!(client_side, server_side, relay);
        relayed.unwrap();
        assert!(got == data, "the server got every byte in order");
        assert!(back == data[..answer], "the client got the answer in order");
        assert_eq!(up.load(Relaxed), data.len() as u64);
        assert_eq!(down.load(Relaxed), answer as u64);
    }

    #[tokio::test]
    async fn megabytes_both_ways_with_half_close_and_counts() {
        relay_and_check(pair().await, pair().await, 8 << 20, 1000).await;
    }

    /// Out of file descriptors, a direction that cannot have a pipe copies
    /// through a buffer: every byte arrives all the same. Exhausting
    /// descriptors would fail the other tests running beside it, so the
    /// test runs itself again alone in a child process.
    #[tokio::test]
    async fn out_of_descriptors_it_copies_through_a_buffer() {
        const NAME: &str = "splice::tests::out_of_descriptors_it_copies_through_a_buffer";
        const CHILD: &str = "PORTHOLE_SPLICE_TEST_CHILD";
        if std::env::var_os(CHILD).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .output()
                .unwrap();
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success() && said.contains("1 passed"), "{said}");
            return;
        }
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let (near, far) = (pair().await, pair().await);
        let limit = getrlimit(Resource::Nofile);
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(64),
                maximum: limit.maximum,
            },
        )
        .unwrap();
        let mut hog = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hog.push(f);
        }
        assert!(Pipe::new().is_err(), "no pipe can be made now");
        relay_and_check(near, far, 1 << 20, 1 << 20).await;
        drop(hog);
    }

    #[tokio::test]
    async fn an_end_it_cannot_vouch_for_is_an_error() {
        let (_client, mut a) = pair().await;
        let (mut b, far) = pair().await;
        drop(far); // EOF from b
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let gone = || Err(io::Error::new(io::ErrorKind::ConnectionAborted, "gone"));
        let err = copy_verified(&mut a, &mut b, &up, &down, &gone)
            .await
            .expect_err("an EOF from a dead peer is an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }

    #[tokio::test]
    async fn a_reset_on_one_side_fails_the_relay() {
        let (client, mut a) = pair().await;
        let (mut b, _server) = pair().await;
        let _ = client.set_zero_linger();
        drop(client);
        let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
        let err = copy(&mut a, &mut b, &up, &down).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }
}
