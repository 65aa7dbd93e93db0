//! The one request tunnel-svc makes of an OpenSSH ControlMaster per
//! connection: a stdio forward (`MUX_C_NEW_STDIO_FWD` of the master's
//! control protocol, `PROTOCOL.mux` in OpenSSH's sources; what `ssh -W`
//! asks a master for). The master is handed two pipe ends over the control
//! socket (SCM_RIGHTS) and carries what goes into one to `localhost:PORT`
//! in the container, and what comes back into the other, over its ssh
//! connection. No ssh process is started and no socket is bound for it.
//!
//! Packets are `uint32 length` then `uint32 type`, then the body, in SSH
//! wire format (big-endian integers, strings as `uint32 length` + bytes).
//! The master answers a stdio forward only once the container side has
//! accepted or refused the channel, so a refused port is an error here,
//! not a connection that closes at once.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;

const MUX_MSG_HELLO: u32 = 0x0000_0001;
const MUX_C_NEW_STDIO_FWD: u32 = 0x1000_0008;
const MUX_S_PERMISSION_DENIED: u32 = 0x8000_0002;
const MUX_S_FAILURE: u32 = 0x8000_0003;
const MUX_S_SESSION_OPENED: u32 = 0x8000_0006;
/// The protocol version OpenSSH speaks (and has since 5.x).
const VERSION: u32 = 4;
/// A master's packets are a few words; anything longer is not one.
const MAX_PACKET: u32 = 64 * 1024;
/// Pipe size asked for, as for the relay's own pipes.
const PIPE_SIZE: usize = 1 << 20;

/// An open stdio forward: bytes written to `to_master` reach the container
/// port, what it sends comes out of `from_master`. The master ends the
/// channel when `control` closes, so it is held as long as the forward is
/// used. Closing `to_master` is the half-close (EOF to the container side);
/// `from_master` ends when the container side closed or the master died.
pub struct StdioForward {
    pub control: UnixStream,
    pub to_master: pipe::Sender,
    pub from_master: pipe::Receiver,
}

/// Why a stdio forward could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// No master answers on the control socket (not up, or gone).
    #[error("cannot reach the ssh master: {0}")]
    Unreachable(io::Error),
    /// The master answered and said no: sshd refused the channel (nothing
    /// listens on the port, or forwarding is not allowed).
    #[error("{0}")]
    Refused(String),
    /// The master broke the protocol or went away mid-request.
    #[error("ssh master: {0}")]
    Protocol(String),
}

/// Asks the master on control socket `ctl` for a stdio forward to
/// `localhost:port` on the far side.
pub async fn stdio_forward(ctl: &Path, port: u16) -> Result<StdioForward, MuxError> {
    let mut control = UnixStream::connect(ctl)
        .await
        .map_err(MuxError::Unreachable)?;
    let protocol = |e: io::Error| MuxError::Protocol(e.to_string());
    // Both sides say hello first; the master's may carry extensions, which
    // are ignored (none is defined).
    let mut hello = Packet::new(MUX_MSG_HELLO);
    hello.u32(VERSION);
    control.write_all(&hello.0).await.map_err(protocol)?;
    let mut theirs = read_packet(&mut control).await.map_err(protocol)?;
    if theirs.u32()? != MUX_MSG_HELLO {
        return Err(MuxError::Protocol("did not say hello".into()));
    }
    let version = theirs.u32()?;
    if version != VERSION {
        return Err(MuxError::Protocol(format!(
            "speaks control protocol version {version}, not {VERSION}"
        )));
    }

    // The master reads from `to`'s other end and writes into `from`'s.
    let (to_master, master_in) = pipe_pair().map_err(protocol)?;
    let (master_out, from_master) = pipe_pair().map_err(protocol)?;
    const REQUEST: u32 = 1;
    let mut request = Packet::new(MUX_C_NEW_STDIO_FWD);
    request.u32(REQUEST);
    request.string(b""); // reserved
    request.string(b"localhost");
    request.u32(u32::from(port));
    control.write_all(&request.0).await.map_err(protocol)?;
    // The master reads exactly the packet, then each descriptor with its
    // one byte: they must be separate messages, "stdin" first.
    send_fd(&control, master_in).await.map_err(protocol)?;
    send_fd(&control, master_out).await.map_err(protocol)?;

    let mut reply = read_packet(&mut control).await.map_err(protocol)?;
    let kind = reply.u32()?;
    let id = reply.u32()?;
    if id != REQUEST {
        return Err(MuxError::Protocol(format!(
            "answered request {id}, not {REQUEST}"
        )));
    }
    match kind {
        MUX_S_SESSION_OPENED => Ok(StdioForward {
            control,
            to_master: pipe::Sender::from_owned_fd(to_master).map_err(protocol)?,
            from_master: pipe::Receiver::from_owned_fd(from_master).map_err(protocol)?,
        }),
        MUX_S_FAILURE | MUX_S_PERMISSION_DENIED => {
            let why = reply.string()?;
            Err(MuxError::Refused(format!(
                "ssh could not open a channel to localhost:{port} in the container ({why}); \
                 nothing listens there, or sshd does not allow TCP forwarding"
            )))
        }
        other => Err(MuxError::Protocol(format!(
            "unexpected answer {other:#010x} to a stdio forward"
        ))),
    }
}

/// A pipe as `(write end, read end)`, both close-on-exec, the larger size
/// asked for. The ends tunnel-svc keeps are made non-blocking by tokio.
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::pipe::{fcntl_setpipe_size, pipe_with, PipeFlags};
    let (read, write) = pipe_with(PipeFlags::CLOEXEC)?;
    // Best effort: the system's pipe-max-size may be lower.
    let _ = fcntl_setpipe_size(&write, PIPE_SIZE);
    Ok((write, read))
}

/// Sends `fd` as OpenSSH's `mm_send_fd` does: one byte with the descriptor
/// attached. Our copy closes once it is sent.
async fn send_fd(control: &UnixStream, fd: OwnedFd) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    loop {
        control.writable().await?;
        let sent = control.try_io(Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut ancillary = SendAncillaryBuffer::new(&mut space);
            let fds = [fd.as_fd()];
            ancillary.push(SendAncillaryMessage::ScmRights(&fds));
            let byte = [0u8];
            Ok(sendmsg(
                control,
                &[IoSlice::new(&byte)],
                &mut ancillary,
                SendFlags::NOSIGNAL,
            )?)
        });
        match sent {
            Ok(1) => return Ok(()),
            Ok(n) => return Err(io::Error::other(format!("sent {n} bytes, not 1"))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads one packet (without its length).
async fn read_packet(control: &mut UnixStream) -> io::Result<Reader> {
    let len = control.read_u32().await.map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(e.kind(), "closed the control connection")
        } else {
            e
        }
    })?;
    if len > MAX_PACKET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sent a {len}-byte packet"),
        ));
    }
    let mut body = vec![0; len as usize];
    control.read_exact(&mut body).await?;
    Ok(Reader(body, 0))
}

/// A packet being written, its length first.
struct Packet(Vec<u8>);

impl Packet {
    fn new(kind: u32) -> Packet {
        let mut p = Packet(vec![0; 4]);
        p.u32(kind);
        p
    }

    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_be_bytes());
    }

    fn string(&mut self, s: &[u8]) {
        self.u32(s.len() as u32);
        self.0.extend_from_slice(s);
        let len = (self.0.len() - 4) as u32;
        self.0[..4].copy_from_slice(&len.to_be_bytes());
    }
}

/// A packet being read.
struct Reader(Vec<u8>, usize);

impl Reader {
    fn take(&mut self, n: usize) -> Result<&[u8], MuxError> {
        let end = self.1 + n;
        let bytes = self
            .0
            .get(self.1..end)
            .ok_or_else(|| MuxError::Protocol("sent a short packet".into()))?;
        self.1 = end;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32, MuxError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self) -> Result<String, MuxError> {
        let len = self.u32()? as usize;
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Receives one descriptor as OpenSSH's `mm_receive_fd` does.
    async fn recv_fd(c: &UnixStream) -> OwnedFd {
        use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        loop {
            c.readable().await.unwrap();
            let got = c.try_io(Interest::READABLE, || {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
                let mut anc = RecvAncillaryBuffer::new(&mut space);
                let mut byte = [0u8; 1];
                let got = recvmsg(
                    c,
                    &mut [io::IoSliceMut::new(&mut byte)],
                    &mut anc,
                    RecvFlags::empty(),
                )?;
                assert_eq!(got.bytes, 1, "one byte per descriptor");
                let mut fds: Vec<OwnedFd> = Vec::new();
                for msg in anc.drain() {
                    if let RecvAncillaryMessage::ScmRights(r) = msg {
                        fds.extend(r);
                    }
                }
                assert_eq!(fds.len(), 1, "one descriptor per message");
                Ok(fds.remove(0))
            });
            match got {
                Ok(fd) => return fd,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("recvmsg: {e}"),
            }
        }
    }

    #[test]
    fn packets_are_length_prefixed_ssh_wire_format() {
        let mut p = Packet::new(MUX_C_NEW_STDIO_FWD);
        p.u32(7);
        p.string(b"");
        p.string(b"localhost");
        p.u32(8080);
        #[rustfmt::skip]
        let want = [
            0, 0, 0, 29,            // length of what follows
            0x10, 0, 0, 8,          // MUX_C_NEW_STDIO_FWD
            0, 0, 0, 7,             // request id
            0, 0, 0, 0,             // reserved ""
            0, 0, 0, 9, b'l', b'o', b'c', b'a', b'l', b'h', b'o', b's', b't',
            0, 0, 0x1f, 0x90,       // port 8080
        ];
        assert_eq!(p.0, want);
        let mut r = Reader(p.0[4..].to_vec(), 0);
        assert_eq!(r.u32().unwrap(), MUX_C_NEW_STDIO_FWD);
        assert_eq!(r.u32().unwrap(), 7);
        assert_eq!(r.string().unwrap(), "");
        assert_eq!(r.string().unwrap(), "localhost");
        assert_eq!(r.u32().unwrap(), 8080);
        assert!(matches!(r.u32(), Err(MuxError::Protocol(_))), "past the end");
    }

    /// A stand-in master (the real one is in the ssh end-to-end tests):
    /// the descriptors arrive one per message, in order, and carry bytes.
    #[tokio::test]
    async fn the_pipe_ends_reach_the_master_and_carry_bytes() {
        let dir = std::env::temp_dir().join(format!("ph-mux-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ctl = dir.join("ctl");
        let listener = tokio::net::UnixListener::bind(&ctl).unwrap();
        let master = async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut hello = Packet::new(MUX_MSG_HELLO);
            hello.u32(VERSION);
            hello.string(b"ext");
            hello.string(b"ignored");
            c.write_all(&hello.0).await.unwrap();
            let mut theirs = read_packet(&mut c).await.unwrap();
            assert_eq!(theirs.u32().unwrap(), MUX_MSG_HELLO);
            let mut req = read_packet(&mut c).await.unwrap();
            assert_eq!(req.u32().unwrap(), MUX_C_NEW_STDIO_FWD);
            let rid = req.u32().unwrap();
            req.string().unwrap();
            assert_eq!(req.string().unwrap(), "localhost");
            assert_eq!(req.u32().unwrap(), 9000);
            let stdin = recv_fd(&c).await;
            let stdout = recv_fd(&c).await;
            let mut opened = Packet::new(MUX_S_SESSION_OPENED);
            opened.u32(rid);
            opened.u32(3);
            c.write_all(&opened.0).await.unwrap();
            (c, stdin, stdout)
        };
        let (fwd, (_master_control, stdin, stdout)) =
            tokio::join!(stdio_forward(&ctl, 9000), master);
        let fwd = fwd.unwrap();
        fwd.to_master.writable().await.unwrap();
        fwd.to_master.try_write(b"hello").unwrap();
        // The "master" echoes it from its stdin to its stdout.
        let mut buf = [0u8; 5];
        rustix::io::read(&stdin, &mut buf).unwrap();
        rustix::io::write(&stdout, &buf).unwrap();
        let mut got = [0u8; 5];
        fwd.from_master.readable().await.unwrap();
        let n = fwd.from_master.try_read(&mut got).unwrap();
        assert_eq!(&got[..n], b"hello");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_refusal_carries_the_masters_words() {
        let dir = std::env::temp_dir().join(format!("ph-mux-refused-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ctl = dir.join("ctl");
        let listener = tokio::net::UnixListener::bind(&ctl).unwrap();
        let master = async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut hello = Packet::new(MUX_MSG_HELLO);
            hello.u32(VERSION);
            c.write_all(&hello.0).await.unwrap();
            read_packet(&mut c).await.unwrap();
            let mut req = read_packet(&mut c).await.unwrap();
            req.u32().unwrap();
            let rid = req.u32().unwrap();
            let mut no = Packet::new(MUX_S_FAILURE);
            no.u32(rid);
            no.string(b"Session open refused by peer");
            c.write_all(&no.0).await.unwrap();
            c
        };
        let (fwd, _c) = tokio::join!(stdio_forward(&ctl, 9000), master);
        match fwd {
            Err(MuxError::Refused(why)) => {
                assert!(why.contains("Session open refused by peer"), "{why}");
                assert!(why.contains("localhost:9000"), "{why}");
            }
            other => panic!("want a refusal, got {:?}", other.err()),
        }
        let gone = stdio_forward(&dir.join("nothing"), 1).await;
        assert!(matches!(gone, Err(MuxError::Unreachable(_))), "{:?}", gone.err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
