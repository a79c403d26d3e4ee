//! Reading a JSON body, the same way on every route of both front-ends: a body not declared as
//! JSON is a 415, one over `--payload-limit` a 413, one that is not JSON a 400, and JSON that
//! does not fit the route's request a 422. Handlers take `Result<Json<T>, JsonRejection>` so that
//! each answers these in its own error shape.

use axum::extract::rejection::{BytesRejection, FailedToBufferBody, JsonRejection};
use axum::Json;
use serde::de::DeserializeOwned;

use super::error::ApiError;

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => Self::BadRequest(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => Self::MalformedJson(e.body_text()),
            JsonRejection::MissingJsonContentType(e) => Self::UnsupportedMediaType(e.body_text()),
            JsonRejection::BytesRejection(BytesRejection::FailedToBufferBody(
                FailedToBufferBody::LengthLimitError(_),
            )) => Self::PayloadTooLarge,
            // The body could not be read (the client went away mid-body, ...).
            other => Self::MalformedJson(other.body_text()),
        }
    }
}

/// The request a route's JSON extractor produced, or the error to answer.
pub fn parse<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(request)| request).map_err(ApiError::from)
}

/// A request out of JSON already read (a body whose kind is decided by its fields): JSON that
/// does not fit is a 422, as from `parse`.
pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    serde_json::from_value(value).map_err(|e| ApiError::BadRequest(e.to_string()))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::extract::{DefaultBodyLimit, FromRequest};
    use axum::http::{header, Request, StatusCode};
    use axum::routing::post;
    use axum::Router;
    use serde::Deserialize;
    use tower::ServiceExt;

    use super::*;

    /// Only its shape matters here.
    #[derive(Debug, Deserialize)]
    struct Inputs {
        #[serde(rename = "inputs")]
        _inputs: String,
    }

    async fn extract(content_type: Option<&str>, body: &str) -> Result<Inputs, ApiError> {
        let mut request = Request::post("/");
        if let Some(content_type) = content_type {
            request = request.header(header::CONTENT_TYPE, content_type);
        }
        let request = request.body(Body::from(body.to_string())).unwrap();
        parse(Json::<Inputs>::from_request(request, &()).await)
    }

    const JSON: Option<&str> = Some("application/json");

    #[tokio::test]
    async fn each_parse_failure_has_its_status() {
        let status = |result: Result<Inputs, ApiError>| result.unwrap_err().status().as_u16();
        assert!(extract(JSON, r#"{"inputs": "a"}"#).await.is_ok());
        assert_eq!(status(extract(None, r#"{"inputs": "a"}"#).await), 415);
        assert_eq!(
            status(extract(Some("text/plain"), r#"{"inputs": "a"}"#).await),
            415
        );
        assert_eq!(status(extract(JSON, "{bad json").await), 400);
        assert_eq!(status(extract(JSON, r#"{"inputs": "a""#).await), 400);
        assert_eq!(status(extract(JSON, r#"{"inputs": 5}"#).await), 422);
        assert_eq!(status(extract(JSON, "{}").await), 422);
        let value = serde_json::json!({"inputs": 5});
        assert_eq!(
            from_value::<Inputs>(value).unwrap_err().status().as_u16(),
            422
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_a_413() {
        async fn route(body: Result<Json<Inputs>, JsonRejection>) -> StatusCode {
            match parse(body) {
                Ok(_) => StatusCode::OK,
                Err(error) => error.status(),
            }
        }
        let app = Router::new()
            .route("/", post(route))
            .layer(DefaultBodyLimit::max(32));
        let send = |inputs: String| {
            let body = serde_json::json!({ "inputs": inputs }).to_string();
            let request = Request::post("/")
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(body))
                .unwrap();
            app.clone().oneshot(request)
        };
        assert_eq!(send("a".repeat(8)).await.unwrap().status(), StatusCode::OK);
        assert_eq!(
            send("a".repeat(64)).await.unwrap().status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
