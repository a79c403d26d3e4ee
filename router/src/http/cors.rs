//! `--cors-allow-origin`: the origins a browser may call the API from. Without any, responses
//! carry no CORS headers and browsers keep other origins out.

use axum::http::header::InvalidHeaderValue;
use axum::http::{HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

/// The CORS layer for these origins, or none when there are none.
pub fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, InvalidHeaderValue> {
    if origins.is_empty() {
        return Ok(None);
    }
    let origins = origins
        .iter()
        .map(|origin| HeaderValue::from_str(origin))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([Method::GET, Method::POST])
            // Any header, by echoing what the preflight asks for: browsers do not count
            // `Authorization` under a `*` answer, and `--api-key` needs it.
            .allow_headers(AllowHeaders::mirror_request()),
    ))
}
