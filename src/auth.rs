//! Bearer tokens (`--token-file`), and who may call what without one.
//!
//! Every request passes [`check`]: a caller with the token gets
//! [`Access::Full`]; a caller without it gets [`Access::Anonymous`] on the
//! paths the service declares public, and `UNAUTHENTICATED` / `401`
//! everywhere else. Handlers read the [`Access`] from the request's
//! extensions to leave out what anonymous callers must not see.

use axum::{body::Body, extract::Request, middleware::Next, response::Response};
use http::{header, HeaderValue, StatusCode};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::{path::Path, sync::Arc};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write token file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path} is empty")]
    Empty { path: String },
    #[error("token file {path} holds characters that cannot go in an HTTP header")]
    Invalid { path: String },
    #[error(
        "token file {path} can be read by other users (mode {mode:o}); \
         make it private with `chmod 600 {path}`"
    )]
    Exposed { path: String, mode: u32 },
    #[error("token file {path} belongs to uid {owner}, not to this user")]
    NotOwned { path: String, owner: u32 },
    #[error(
        "token file {path} is in {dir}, which other users may write to (mode {mode:o}); \
         keep it in a directory only you can change"
    )]
    OpenDirectory {
        path: String,
        dir: String,
        mode: u32,
    },
}

/// A token file is at most this big.
const MAX_TOKEN_FILE: u64 = 4096;

/// A shared secret. Clients send `authorization: Bearer TOKEN`.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Bytes of randomness in a generated token (256 bits).
const GENERATED_BYTES: usize = 32;

impl Token {
    /// Reads the token from a file that only its owner can read; surrounding
    /// whitespace (a trailing newline) is ignored.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let shown = path.display().to_string();
        let read = |source| TokenError::Read {
            path: shown.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenError::Exposed { path: shown, mode });
        }
        // Someone else's file, or one in a directory others may write to
        // (where it could be swapped), is not this user's secret.
        use std::os::unix::fs::MetadataExt;
        let me = rustix::process::geteuid().as_raw();
        if meta.uid() != me {
            return Err(TokenError::NotOwned {
                path: shown,
                owner: meta.uid(),
            });
        }
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let dir_meta = std::fs::metadata(dir).map_err(read)?;
        let dir_mode = dir_meta.permissions().mode();
        if dir_mode & 0o022 != 0 && dir_mode & 0o1000 == 0 {
            return Err(TokenError::OpenDirectory {
                path: shown,
                dir: dir.display().to_string(),
                mode: dir_mode & 0o7777,
            });
        }
        let text = crate::text::read_small_file(path, MAX_TOKEN_FILE).map_err(read)?;
        Token::new(text.trim()).map_err(|e| match e {
            TokenError::Empty { .. } => TokenError::Empty { path: shown },
            _ => TokenError::Invalid { path: shown },
        })
    }

    /// The token in `path`, or a new random one written there (mode 0600,
    /// its directory created 0700) when the file does not exist. Returns
    /// whether it was created. Two processes racing for the same path end
    /// up with the same token.
    pub fn load_or_create(path: &Path) -> Result<(Token, bool), TokenError> {
        match Token::from_file(path) {
            Err(TokenError::Read { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other.map(|t| (t, false)),
        }
        let shown = path.display().to_string();
        let write = |source| TokenError::Write {
            path: shown.clone(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(write)?;
        }
        let token = Token::generate().map_err(write)?;
        // Written whole under a private name, then linked into place: the
        // link fails if another process got there first, and nobody ever
        // reads a half-written file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            writeln!(f, "{}", token.0)?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, path)
        })();
        let _ = std::fs::remove_file(&tmp);
        match result {
            Ok(()) => Ok((token, true)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Token::from_file(path).map(|t| (t, false))
            }
            Err(e) => Err(write(e)),
        }
    }

    /// A new random token: 256 bits from the kernel, as hex.
    pub fn generate() -> std::io::Result<Token> {
        let bytes: [u8; GENERATED_BYTES] = random_bytes()?;
        Ok(Token(hex(&bytes).into()))
    }

    pub fn new(secret: &str) -> Result<Token, TokenError> {
        if secret.is_empty() {
            return Err(TokenError::Empty {
                path: String::new(),
            });
        }
        if HeaderValue::from_str(&format!("Bearer {secret}")).is_err() {
            return Err(TokenError::Invalid {
                path: String::new(),
            });
        }
        Ok(Token(secret.into()))
    }

    /// The secret itself, for handing it to a process over a private
    /// channel (a pipe). Never log it or put it on a command line.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// The `authorization` header value a client sends.
    pub fn header_value(&self) -> HeaderValue {
        let mut v = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .expect("checked when the token was made");
        v.set_sensitive(true);
        v
    }

    /// The same, as gRPC request metadata.
    pub fn metadata_value(&self) -> tonic::metadata::AsciiMetadataValue {
        let mut v: tonic::metadata::AsciiMetadataValue = format!("Bearer {}", self.0)
            .parse()
            .expect("checked when the token was made");
        v.set_sensitive(true);
        v
    }

    /// Adds the token to an outgoing gRPC request.
    pub fn authorize<T>(&self, req: &mut tonic::Request<T>) {
        req.metadata_mut()
            .insert("authorization", self.metadata_value());
    }

    /// Whether an `authorization` header carries this token (the scheme
    /// `Bearer` in any case). The comparison takes the same time wherever
    /// the first difference is and whatever the two lengths are.
    pub fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(given) = header.map(HeaderValue::as_bytes) else {
            return false;
        };
        let Some(given) = given
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
            .map(|_| &given[7..])
        else {
            return false;
        };
        self.matches(given)
    }

    /// `TS.NONCE.MAC` for a call on `what` (a request path, or a raw relay
    /// request): the time in Unix seconds, 16 random bytes, and
    /// HMAC-SHA256 keyed with the token over all three, in hex.
    pub fn signed(&self, what: &str) -> String {
        let nonce: [u8; 16] = random_bytes()
            .map(|b| b[..16].try_into().expect("16 of 32"))
            .unwrap_or_else(|_| {
                // No randomness: the time's nanoseconds, which the nonce
                // cache still keeps from being used twice.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos());
                t.to_le_bytes()
            });
        let ts = unix_now().to_string();
        let mac = self.signed_mac(what, &ts, &nonce);
        format!("{ts}.{}.{}", hex(&nonce), hex(&mac))
    }

    fn signed_mac(&self, what: &str, ts: &str, nonce: &[u8]) -> [u8; 32] {
        let parts: [&[u8]; 7] = [
            b"porthole-signed-v1",
            b"\0",
            what.as_bytes(),
            b"\0",
            ts.as_bytes(),
            b"\0",
            nonce,
        ];
        hmac_sha256(self.0.as_bytes(), &parts)
    }

    /// Whether `value` (`TS.NONCE.MAC`) is this token's signature of a call
    /// on `what`, made within a minute of now and not seen before.
    pub fn verifies(&self, what: &str, value: &str) -> bool {
        let mut parts = value.split('.');
        let (Some(ts), Some(nonce), Some(mac), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        let (Ok(at), Some(nonce), Some(mac)) =
            (ts.parse::<u64>(), unhex::<16>(nonce), unhex::<32>(mac))
        else {
            return false;
        };
        let now = unix_now();
        if now.abs_diff(at) > SIGNED_WINDOW {
            return false;
        }
        let want = self.signed_mac(what, ts, &nonce);
        if !same_mac(&want, &mac) {
            return false;
        }
        let mut seen = NONCES.lock().unwrap_or_else(|e| e.into_inner());
        seen.take(u128::from_le_bytes(nonce), at, now)
    }

    /// Whether an `authorization` header proves this token for a call on
    /// `path`: a signature ([`SIGNED`]) or the token itself (`Bearer`).
    pub fn admits(&self, path: &str, header: Option<&HeaderValue>) -> bool {
        let signed = header
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix(SIGNED))
            .and_then(|h| h.strip_prefix(' '));
        match signed {
            Some(value) => self.verifies(path, value),
            None => self.accepts(header),
        }
    }

    /// A secret made from this token for `context` (e.g. the panel's
    /// session cookie): HMAC-SHA256 keyed with the token over
    /// `porthole-derived-v1`, a NUL and `context`, in hex. It proves the
    /// token was known without being it.
    pub fn derived(&self, context: &str) -> String {
        hex(&self.derived_mac(context))
    }

    fn derived_mac(&self, context: &str) -> [u8; 32] {
        hmac_sha256(
            self.0.as_bytes(),
            &[b"porthole-derived-v1\0", context.as_bytes()],
        )
    }

    /// Whether `given` is [`Token::derived`] for `context`, compared in
    /// constant time.
    pub fn is_derived(&self, context: &str, given: &str) -> bool {
        unhex::<32>(given).is_some_and(|g| same_mac(&self.derived_mac(context), &g))
    }

    /// What a server holding this token answers to `nonce` in
    /// `TunnelAdmin.Prove`: HMAC-SHA256 keyed with the token over
    /// [`PROOF_CONTEXT`] then the nonce. It shows the server holds the
    /// token without revealing it.
    pub fn proof(&self, nonce: &[u8]) -> [u8; 32] {
        hmac_sha256(self.0.as_bytes(), &[PROOF_CONTEXT, nonce])
    }

    /// Whether `proof` is [`Token::proof`] of `nonce`, compared in constant
    /// time.
    pub fn proves(&self, nonce: &[u8], proof: &[u8]) -> bool {
        same_mac(&self.proof(nonce), proof)
    }

    /// Whether `given` is this token, in the same time wherever the first
    /// difference is and whatever the two lengths are.
    pub fn matches(&self, given: &[u8]) -> bool {
        let want = self.0.as_bytes();
        // Every given byte is compared with some byte of the token, so the
        // time depends on the caller's input only.
        let mut diff = u8::from(given.len() != want.len());
        for (i, g) in given.iter().enumerate() {
            diff |= g ^ want[i % want.len()];
        }
        diff == 0
    }
}

/// What `TunnelAdmin.Prove` answers are computed over, before the nonce.
pub const PROOF_CONTEXT: &[u8] = b"porthole-admin-proof-v1";

/// HMAC-SHA256 (RFC 2104) of the concatenated `parts`.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let mut inner = Sha256::new();
    inner.update(pad(0x36));
    for part in parts {
        inner.update(part);
    }
    let mut outer = Sha256::new();
    outer.update(pad(0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// 32 random bytes from the kernel (`getrandom`, one system call).
pub fn random_bytes() -> std::io::Result<[u8; 32]> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        let flags = rustix::rand::GetRandomFlags::empty();
        filled += rustix::rand::getrandom(&mut bytes[filled..], flags)?;
    }
    Ok(bytes)
}

/// A channel whose every call shows the token without sending it: an
/// `authorization: Porthole-HMAC TS.NONCE.MAC` header made for that call's
/// path ([`Token::signed`]). Whatever answers at the address — the
/// service, or a process that took its port — learns nothing it could
/// use for another call.
#[derive(Clone, Debug)]
pub struct AuthChannel {
    inner: tonic::transport::Channel,
    token: Option<Token>,
}

/// `channel` with `token` on every call.
pub fn with_token(channel: tonic::transport::Channel, token: Option<Token>) -> AuthChannel {
    AuthChannel {
        inner: channel,
        token,
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for AuthChannel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(token) = &self.token {
            let value = format!("{SIGNED} {}", token.signed(req.uri().path()));
            let mut value = HeaderValue::from_str(&value).expect("hex, digits and dots");
            value.set_sensitive(true);
            req.headers_mut().insert(header::AUTHORIZATION, value);
        }
        self.inner.call(req)
    }
}

/// The `authorization` scheme of a signed call.
pub const SIGNED: &str = "Porthole-HMAC";

/// How far a signed call's time may be from the server's, in seconds.
const SIGNED_WINDOW: u64 = 30;

/// The nonces of signed calls still within [`SIGNED_WINDOW`], by their
/// second, so none is taken twice: at most [`MAX_NONCES`] (about 4,000
/// signed calls a second; past that new ones are refused until old ones
/// age out, rather than a replay let through).
static NONCES: std::sync::Mutex<Nonces> = std::sync::Mutex::new(Nonces {
    by_second: std::collections::VecDeque::new(),
    count: 0,
});
const MAX_NONCES: usize = 1 << 18;

struct Nonces {
    by_second: std::collections::VecDeque<(u64, std::collections::HashSet<u128>)>,
    count: usize,
}

impl Nonces {
    /// Takes `nonce` of a call signed at `at`; false when it was seen.
    fn take(&mut self, nonce: u128, at: u64, now: u64) -> bool {
        while let Some((second, set)) = self.by_second.front() {
            if *second + SIGNED_WINDOW >= now {
                break;
            }
            self.count -= set.len();
            self.by_second.pop_front();
        }
        if self.count >= MAX_NONCES {
            return false;
        }
        let i = match self.by_second.iter().position(|(s, _)| *s == at) {
            Some(i) => i,
            None => {
                let i = self.by_second.partition_point(|(s, _)| *s < at);
                self.by_second.insert(i, (at, Default::default()));
                i
            }
        };
        if self.seen_elsewhere(i, nonce) || !self.by_second[i].1.insert(nonce) {
            return false;
        }
        self.count += 1;
        true
    }

    /// A nonce is one call's whatever second it claims.
    fn seen_elsewhere(&self, except: usize, nonce: u128) -> bool {
        self.by_second
            .iter()
            .enumerate()
            .any(|(i, (_, set))| i != except && set.contains(&nonce))
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `given` is the MAC `want`, in the same time wherever they
/// differ (a shorter or longer `given` is compared in full too).
fn same_mac(want: &[u8; 32], given: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != want.len());
    for (i, g) in given.iter().enumerate() {
        diff |= g ^ want[i % want.len()];
    }
    diff == 0
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What a caller may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Carried the token, or the service has none.
    Full,
    /// No token, on a path the service serves anonymously.
    Anonymous,
}

impl Access {
    /// The access of a request that went through [`check`] (full when the
    /// service runs without a token).
    pub fn of<T>(req: &tonic::Request<T>) -> Access {
        req.extensions()
            .get::<Access>()
            .copied()
            .unwrap_or(Access::Full)
    }
}

/// Who may call a service.
#[derive(Clone)]
pub struct Policy {
    /// `None`: everyone gets everything (only when no token is configured).
    pub token: Option<Token>,
    /// Paths served to callers without the token, e.g. `/healthz`.
    pub public: fn(&str) -> bool,
}

/// Whether a request is gRPC (`content-type: application/grpc*`).
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// axum middleware: tags each request with its [`Access`], or rejects it.
/// gRPC callers get `UNAUTHENTICATED`, HTTP callers `401`.
pub async fn check(policy: Policy, mut req: Request, next: Next) -> Response {
    // The stdio connection (see `server::Listen`) is the one process that
    // started this one; only network connections have a peer address.
    let stdio = req
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .is_some_and(|c| c.remote_addr.is_none());
    let access = match &policy.token {
        None => Some(Access::Full),
        Some(_) if stdio => Some(Access::Full),
        Some(token) if token.admits(req.uri().path(), req.headers().get(header::AUTHORIZATION)) => {
            Some(Access::Full)
        }
        Some(_) if (policy.public)(req.uri().path()) => Some(Access::Anonymous),
        Some(_) => None,
    };
    if let Some(access) = access {
        req.extensions_mut().insert(access);
        return next.run(req).await;
    }
    if is_grpc(&req) {
        let (parts, ()) = tonic::Status::unauthenticated("missing or wrong bearer token")
            .into_http::<()>()
            .into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    Response::builder()
        .status(StatusCode::UNAUTHORIZED)
        .header(header::WWW_AUTHENTICATE, "Bearer")
        .body(Body::from("missing or wrong bearer token\n"))
        .expect("static response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_call_proves_the_token_once_for_its_path_only() {
        let token = Token::new("secret").unwrap();
        let signed = token.signed("/porthole.v1.Relay/Dial");
        assert!(!signed.contains("secret"));
        assert!(!token.verifies("/porthole.v1.PortEvents/ListPorts", &signed));
        assert!(!Token::new("other")
            .unwrap()
            .verifies("/porthole.v1.Relay/Dial", &signed));
        assert!(token.verifies("/porthole.v1.Relay/Dial", &signed));
        assert!(
            !token.verifies("/porthole.v1.Relay/Dial", &signed),
            "a replay"
        );
        // Out of the window, or malformed: refused.
        let (_, rest) = token
            .signed("/x")
            .split_once('.')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap();
        assert!(!token.verifies("/x", &format!("{}.{rest}", unix_now() - 600)));
        for bad in ["", "1.2", "x.y.z", "1.00.00.00"] {
            assert!(!token.verifies("/x", bad), "{bad:?}");
        }
        // In a header, with the scheme; Bearer still works.
        let header = HeaderValue::from_str(&format!("{SIGNED} {}", token.signed("/p"))).unwrap();
        assert!(token.admits("/p", Some(&header)));
        assert!(token.admits("/p", Some(&HeaderValue::from_static("Bearer secret"))));
        assert!(!token.admits("/p", None));
    }

    #[test]
    fn the_proof_is_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let mac = hmac_sha256(b"Jefe", &[b"what do ya want ", b"for nothing?"]);
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        let mac = hmac_sha256(
            &[0xaa; 131],
            &[b"Test Using Larger Than Block-Size Key - Hash Key First"],
        );
        assert_eq!(
            hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let token = Token::new("secret").unwrap();
        let proof = token.proof(b"nonce");
        assert!(token.proves(b"nonce", &proof));
        assert!(!token.proves(b"other", &proof));
        assert!(!Token::new("secreT").unwrap().proves(b"nonce", &proof));
        assert!(!token.proves(b"nonce", &proof[..31]));
    }

    #[test]
    fn a_token_file_must_be_this_users_in_a_directory_others_cannot_change() {
        let dir = std::env::temp_dir().join(format!("porthole-auth-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let path = dir.join("token");
        let (t, _) = Token::load_or_create(&path).unwrap();
        assert_eq!(Token::from_file(&path).unwrap().secret(), t.secret());
        // A directory anyone may write to (no sticky bit): refused.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Token::from_file(&path).unwrap_err();
        assert!(matches!(e, TokenError::OpenDirectory { .. }), "{e}");
        // With the sticky bit (as /tmp), only the owner may swap it: fine.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(Token::from_file(&path).is_ok());
        // Another user's file.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            let e = Token::from_file(&path).unwrap_err();
            assert!(
                matches!(e, TokenError::NotOwned { owner: 65534, .. }),
                "{e}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn accepts_only_the_exact_bearer_token() {
        let t = Token::new("s3cret").unwrap();
        assert!(t.accepts(Some(&HeaderValue::from_static("Bearer s3cret"))));
        assert!(t.accepts(Some(&HeaderValue::from_static("bearer s3cret"))));
        assert!(t.accepts(Some(&HeaderValue::from_static("BEARER s3cret"))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("Bearer s3cre"))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("Bearer s3cret2"))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("Bearer s3cret3cret"))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("Bearer "))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("s3cret"))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("Basic s3cret"))));
        assert!(!t.accepts(None));
        assert_eq!(t.header_value(), "Bearer s3cret");
    }

    #[test]
    fn rejects_empty_and_unprintable_tokens() {
        assert!(matches!(Token::new(""), Err(TokenError::Empty { .. })));
        assert!(matches!(
            Token::new("a\nb"),
            Err(TokenError::Invalid { .. })
        ));
        let err = Token::from_file(Path::new("/nonexistent/porthole-token")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/porthole-token"),
            "{err}"
        );
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("porthole-auth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn creates_a_private_token_once_and_reuses_it() {
        let dir = temp_dir("create");
        let path = dir.join("sub/monitor.token");
        let (first, created) = Token::load_or_create(&path).unwrap();
        assert!(created);
        assert_eq!(first.0.len(), GENERATED_BYTES * 2, "256 bits as hex");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dir_mode, 0o700);
        let (again, created) = Token::load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(again.0, first.0);
        assert_ne!(Token::generate().unwrap().0, first.0);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn refuses_a_token_file_others_can_read() {
        let dir = temp_dir("exposed");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Token::load_or_create(&path).unwrap_err();
        assert!(
            matches!(err, TokenError::Exposed { mode: 0o644, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(Token::from_file(&path).unwrap().0.as_ref(), "s3cret");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
