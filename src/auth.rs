//! The optional shared bearer token (`--token-file`), checked on every gRPC
//! and HTTP request of both services.

use axum::{body::Body, extract::Request, middleware::Next, response::Response};
use http::{header, HeaderValue, StatusCode};
use std::{path::Path, sync::Arc};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {path} is empty")]
    Empty { path: String },
    #[error("token file {path} holds characters that cannot go in an HTTP header")]
    Invalid { path: String },
}

/// A shared secret. Clients send `authorization: Bearer TOKEN`.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// Reads the token from a file; surrounding whitespace (a trailing
    /// newline) is ignored.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            path: shown.clone(),
            source,
        })?;
        Token::new(text.trim()).map_err(|e| match e {
            TokenError::Empty { .. } => TokenError::Empty { path: shown },
            _ => TokenError::Invalid { path: shown },
        })
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

    /// Whether an `authorization` header carries this token. The comparison
    /// takes the same time wherever the first difference is.
    pub fn accepts(&self, header: Option<&HeaderValue>) -> bool {
        let Some(given) = header.and_then(|h| h.as_bytes().strip_prefix(b"Bearer ")) else {
            return false;
        };
        let want = self.0.as_bytes();
        given.len() == want.len()
            && given
                .iter()
                .zip(want)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Whether a request is gRPC (`content-type: application/grpc*`).
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// axum middleware: rejects requests without the token. gRPC callers get
/// `UNAUTHENTICATED`, HTTP callers `401`.
pub async fn require(token: Token, req: Request, next: Next) -> Response {
    if token.accepts(req.headers().get(header::AUTHORIZATION)) {
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
    fn accepts_only_the_exact_bearer_token() {
        let t = Token::new("s3cret").unwrap();
        assert!(t.accepts(Some(&HeaderValue::from_static("Bearer s3cret"))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("Bearer s3cre"))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("Bearer s3cret2"))));
        assert!(!t.accepts(Some(&HeaderValue::from_static("s3cret"))));
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
}
