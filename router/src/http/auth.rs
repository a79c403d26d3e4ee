//! `--api-key`: when set, a request must carry `Authorization: Bearer <key>`, except on the
//! routes monitoring and documentation need (`is_open`). A missing or wrong key is a 401 in the
//! route's error shape (OpenAI's on `/v1/`, TGI's elsewhere).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;

/// The key clients must present.
pub struct ApiKey(Vec<u8>);

impl ApiKey {
    pub fn new(key: &str) -> Self {
        Self(key.as_bytes().to_vec())
    }

    /// Whether an `Authorization` header carries the key as a bearer token. The comparison
    /// takes as long wherever the first wrong byte is, so timing does not reveal a prefix of
    /// the key (only whether the length matches).
    pub fn accepts(&self, authorization: Option<&HeaderValue>) -> bool {
        authorization
            .and_then(bearer_token)
            .is_some_and(|token| token.ct_eq(&self.0).into())
    }
}

/// The credentials of a `Bearer` authorization (the scheme's name is case-insensitive).
fn bearer_token(authorization: &HeaderValue) -> Option<&[u8]> {
    let value = authorization.as_bytes();
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = value.split_at(space);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

/// Routes anyone may call: health checks, monitoring, and the API's documentation.
pub fn is_open(path: &str) -> bool {
    matches!(path, "/health" | "/info" | "/metrics")
        || path.starts_with("/docs")
        || path.starts_with("/api-doc/")
}

/// The middleware in front of every route.
pub async fn require_api_key(
    State(key): State<Arc<ApiKey>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if is_open(path) || key.accepts(request.headers().get(header::AUTHORIZATION)) {
        return next.run(request).await;
    }
    let mut response = if path.starts_with("/v1/") {
        ApiError::Unauthorized.into_openai_response()
    } else {
        ApiError::Unauthorized.into_response()
    };
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(value: &str) -> HeaderValue {
        HeaderValue::from_str(value).unwrap()
    }

    #[test]
    fn accepts_only_the_key_as_a_bearer_token() {
        let key = ApiKey::new("s3cret");
        assert!(key.accepts(Some(&header("Bearer s3cret"))));
        assert!(key.accepts(Some(&header("bearer s3cret"))));
        assert!(!key.accepts(None));
        assert!(!key.accepts(Some(&header("s3cret"))));
        assert!(!key.accepts(Some(&header("Bearer"))));
        assert!(!key.accepts(Some(&header("Bearer "))));
        assert!(!key.accepts(Some(&header("Basic s3cret"))));
        assert!(!key.accepts(Some(&header("Bearer s3cre"))));
        assert!(!key.accepts(Some(&header("Bearer s3cret2"))));
        assert!(!key.accepts(Some(&header("Bearer S3CRET"))));
    }

    #[test]
    fn monitoring_and_docs_stay_open() {
        for path in [
            "/health",
            "/info",
            "/metrics",
            "/docs",
            "/docs/",
            "/api-doc/openapi.json",
        ] {
            assert!(is_open(path), "{path}");
        }
        for path in [
            "/",
            "/generate",
            "/tokenize",
            "/v1/models",
            "/invocations",
            "/healthz",
        ] {
            assert!(!is_open(path), "{path}");
        }
    }
}
