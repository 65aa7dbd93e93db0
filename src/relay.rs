//! Moving bytes between a socket and a `Relay.Dial` stream (`pump`; between
//! two sockets see [`crate::splice`]). It keeps TCP half-close semantics:
//! when one side stops sending, the other side's write half is shut down
//! and the opposite direction carries on until it ends too. It returns an
//! error the moment either direction fails; the caller then resets its
//! sockets (see [`crate::net::ResetOnDrop`]) so no peer mistakes a broken
//! path for a clean end.

use crate::pb::v1::{relay_frame::Kind, RelayFrame};
use prost::bytes::BytesMut;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Read size per hop. Large enough for multi-Gbit/s on loopback, small
/// enough that a few thousand idle connections cost little.
pub const CHUNK: usize = 64 * 1024;

/// Why a relay stream ended badly.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("stream: {0}")]
    Stream(#[from] tonic::Status),
    #[error("peer went away")]
    PeerGone,
    #[error("unexpected frame: {0}")]
    Protocol(&'static str),
}

/// Carries a socket over a relay stream: bytes read from `sock` go out as
/// `data` frames (then `close_write` at EOF); `data` frames coming in are
/// written to `sock` (and its write half shut at `close_write`). Returns once
/// both directions have ended, or as soon as either fails: then the caller
/// resets `sock` and ends the stream with an error status, never cleanly. `sent` /
/// `received` count payload bytes.
/// `wrap` shapes an outgoing frame for the channel (`Ok` on the server side,
/// where the channel carries `Result<RelayFrame, Status>`).
pub async fn pump<S, I, T>(
    sock: &mut S,
    inbound: &mut I,
    outbound: &mpsc::Sender<T>,
    wrap: fn(RelayFrame) -> T,
    sent: &AtomicU64,
    received: &AtomicU64,
) -> Result<(), PumpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    I: futures_util::Stream<Item = Result<RelayFrame, tonic::Status>> + Unpin,
{
    use futures_util::StreamExt;
    let (mut r, mut w) = tokio::io::split(sock);
    let up = async {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            let n = r.read_buf(&mut buf).await?;
            let frame = if n == 0 {
                Kind::CloseWrite(true)
            } else {
                sent.fetch_add(n as u64, Relaxed);
                Kind::Data(buf.split().freeze())
            };
            outbound
                .send(wrap(RelayFrame { kind: Some(frame) }))
                .await
                .map_err(|_| PumpError::PeerGone)?;
            if n == 0 {
                return Ok::<_, PumpError>(());
            }
        }
    };
    let down = async {
        while let Some(frame) = inbound.next().await {
            match frame?.kind {
                Some(Kind::Data(data)) => {
                    w.write_all(&data).await?;
                    received.fetch_add(data.len() as u64, Relaxed);
                }
                Some(Kind::CloseWrite(_)) => {
                    w.shutdown().await?;
                    return Ok(());
                }
                Some(Kind::Dial(_) | Kind::Dialed(_)) => {
                    return Err(PumpError::Protocol("dial after start"))
                }
                None => return Err(PumpError::Protocol("empty frame")),
            }
        }
        // The stream ended without close_write: the peer went away.
        Err(PumpError::PeerGone)
    };
    // Either side failing ends both: nothing waits on a dead peer.
    tokio::try_join!(up, down).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn data(bytes: &'static [u8]) -> Result<RelayFrame, tonic::Status> {
        Ok(RelayFrame {
            kind: Some(Kind::Data(prost::bytes::Bytes::from_static(bytes))),
        })
    }

    #[tokio::test]
    async fn pump_ends_cleanly_only_after_close_write_both_ways() {
        let (mut sock, mut peer) = duplex(1024);
        let (tx, mut rx) = mpsc::channel(8);
        let close = Ok(RelayFrame {
            kind: Some(Kind::CloseWrite(true)),
        });
        let mut inbound = futures_util::stream::iter(vec![data(b"hello"), close]);
        let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
        let ends = async {
            let mut got = Vec::new();
            peer.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello", "data, then EOF after close_write");
            peer.write_all(b"bye").await.unwrap();
            peer.shutdown().await.unwrap();
        };
        let pumped = pump(&mut sock, &mut inbound, &tx, |f| f, &sent, &received);
        let (result, ()) = tokio::join!(pumped, ends);
        result.unwrap();
        let frames: Vec<_> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert!(matches!(&frames[0].kind, Some(Kind::Data(d)) if d.as_ref() == b"bye"));
        assert!(matches!(frames[1].kind, Some(Kind::CloseWrite(true))));
        assert_eq!((sent.load(Relaxed), received.load(Relaxed)), (3, 5));
    }

    #[tokio::test]
    async fn pump_fails_when_the_stream_ends_or_breaks_without_close_write() {
        for ending in [None, Some(tonic::Status::unavailable("connection lost"))] {
            let (mut sock, _peer) = duplex(1024);
            let (tx, _rx) = mpsc::channel(8);
            let mut frames = vec![data(b"partial")];
            if let Some(status) = ending.clone() {
                frames.push(Err(status));
            }
            let mut inbound = futures_util::stream::iter(frames);
            let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
            let err = pump(&mut sock, &mut inbound, &tx, |f| f, &sent, &received)
                .await
                .expect_err("a stream that stops without close_write is a failure");
            match ending {
                None => assert!(matches!(err, PumpError::PeerGone), "{err}"),
                Some(_) => assert!(matches!(err, PumpError::Stream(_)), "{err}"),
            }
        }
    }
}
