//! The OpenAPI document of both front-ends, generated from the code: each route handler's
//! `#[utoipa::path]` and each body's `ToSchema` derive. It is served at `/api-doc/openapi.json`,
//! browsed at `/docs`, printed by `sluice-router print-schema`, and committed as
//! `docs/openapi.json` (a test fails when that copy is out of date).
//!
//! `/docs` is a Swagger UI page whose scripts and styles come from a public CDN (pinned in
//! `swagger-ui.html`): bundling them would mean downloading them at build time. Without internet
//! access the page stays blank, and the JSON document is still there.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::Router;
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{IntoResponses, OpenApi, PartialSchema, ToSchema};

use super::openai::types as openai;
use super::types as tgi;
use super::{handlers, invocations, openai::handlers as openai_handlers, tokenize};

pub const DOCUMENT_PATH: &str = "/api-doc/openapi.json";
pub const SWAGGER_UI_PATH: &str = "/docs";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        description = "A TGI-compatible LLM server: TGI's routes and OpenAI's (`/v1`) over the same \
                       generation engine."
    ),
    paths(
        handlers::compat_generate,
        handlers::generate,
        handlers::generate_stream,
        tokenize::tokenize,
        tokenize::chat_tokenize,
        invocations::invocations,
        handlers::health,
        handlers::info,
        handlers::metrics,
        openai_handlers::models,
        openai_handlers::completions,
        openai_handlers::chat_completions,
    ),
    components(schemas(
        tgi::GenerateRequest,
        tgi::GenerateParameters,
        tgi::GenerateResponse,
        tgi::Details,
        tgi::StreamResponse,
        tgi::StreamDetails,
        tgi::Token,
        tgi::FinishReason,
        tgi::ErrorResponse,
        tgi::Info,
        tgi::BestOfSequence,
        tokenize::SimpleToken,
        tokenize::ChatTokenizeResponse,
        InvocationRequest,
        InvocationError,
        InvocationStreamEvent,
        openai::CompletionRequest,
        openai::ChatCompletionRequest,
        openai::Completion<openai::CompletionChoice>,
        openai::Completion<openai::ChatChoice>,
        openai::Completion<openai::ChatChunkChoice>,
        openai::ModelList,
        openai::OpenAiErrorResponse,
        TgiStreamEvent,
        CompletionStreamEvent,
        ChatStreamEvent,
    )),
    tags(
        (name = "TGI", description = "Text Generation Inference's API"),
        (name = "OpenAI", description = "OpenAI's API: completions, chat completions, models"),
    )
)]
struct ApiDoc;

/// The OpenAPI document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The document as `print-schema` prints it and `docs/openapi.json` holds it.
pub fn document_json() -> Result<String, serde_json::Error> {
    document().to_pretty_json()
}

/// `/api-doc/openapi.json` and `/docs`. The document is built once, here.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Result<Router<S>, serde_json::Error> {
    let json = Bytes::from(document_json()?);
    let serve_document = move || {
        let json = json.clone();
        async move { ([(header::CONTENT_TYPE, "application/json")], json).into_response() }
    };
    Ok(Router::new()
        .route(DOCUMENT_PATH, get(serve_document))
        .route(
            SWAGGER_UI_PATH,
            get(|| async { Html(include_str!("swagger-ui.html")) }),
        ))
}

/// Every error a generation route can answer instead of its answer, by status
/// (`ApiError::status`, and the request checks in front of the routes).
const GENERATION_ERRORS: [(u16, &str); 7] = [
    (400, "The body is not valid JSON."),
    (
        401,
        "The server requires an API key and the request's `Authorization: Bearer` is missing or \
         wrong.",
    ),
    (413, "The body is larger than the server accepts."),
    (415, "The body is not `application/json`."),
    (
        422,
        "The body does not fit the route's request, or a parameter is invalid or not supported.",
    ),
    (424, "Generation failed."),
    (
        429,
        "The server is at its limit of requests in flight (`--max-concurrent-requests`).",
    ),
];

fn error_responses<Body: ToSchema>() -> BTreeMap<String, RefOr<Response>> {
    GENERATION_ERRORS
        .iter()
        .map(|(status, description)| {
            let body = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(Body::name())))
                .build();
            let response = ResponseBuilder::new()
                .description(*description)
                .content("application/json", body)
                .build();
            (status.to_string(), response.into())
        })
        .collect()
}

/// The errors of TGI's generation routes, in TGI's body.
pub struct TgiErrors;

impl IntoResponses for TgiErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        error_responses::<tgi::ErrorResponse>()
    }
}

/// The errors of OpenAI's generation routes, in OpenAI's body.
pub struct OpenAiErrors;

impl IntoResponses for OpenAiErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        error_responses::<openai::OpenAiErrorResponse>()
    }
}

/// The errors of a route that answers in either API's body (`/invocations`).
pub struct EitherErrors;

impl IntoResponses for EitherErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        error_responses::<InvocationError>()
    }
}

/// A body of `/invocations`: TGI's (with `inputs`), a chat (with `messages`) or a completion
/// (with `prompt`).
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Describes the bodies; each is read as its own type.
pub enum InvocationRequest {
    Generate(tgi::GenerateRequest),
    Chat(openai::ChatCompletionRequest),
    Completion(openai::CompletionRequest),
}

/// One server-sent event of a streamed `/invocations`, as the route its body belongs to sends
/// it.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Describes the events; each is encoded from its own type.
pub enum InvocationStreamEvent {
    Tgi(TgiStreamEvent),
    Completion(CompletionStreamEvent),
    Chat(ChatStreamEvent),
}

/// An error of `/invocations`, in the body of the API its request belongs to.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Describes the bodies; each is encoded from its own type.
pub enum InvocationError {
    Tgi(tgi::ErrorResponse),
    OpenAi(openai::OpenAiErrorResponse),
}

/// What one server-sent event of `/generate_stream` (and of `/` when it streams) holds: a token,
/// or the error that ended the stream after it had started (its status already sent as 200).
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Describes the events; each is encoded from its own type.
pub enum TgiStreamEvent {
    Token(tgi::StreamResponse),
    Error(tgi::ErrorResponse),
}

/// What one server-sent event of a streamed `/v1/completions` holds: a chunk, or the error that
/// ended the stream.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Describes the events; each is encoded from its own type.
pub enum CompletionStreamEvent {
    Chunk(openai::Completion<openai::CompletionChoice>),
    Error(openai::OpenAiErrorResponse),
}

/// What one server-sent event of a streamed `/v1/chat/completions` holds: a chunk, or the error
/// that ended the stream.
#[derive(ToSchema)]
#[serde(untagged)]
#[allow(dead_code)] // Describes the events; each is encoded from its own type.
pub enum ChatStreamEvent {
    Chunk(openai::Completion<openai::ChatChunkChoice>),
    Error(openai::OpenAiErrorResponse),
}

/// One server-sent event whose `data` is a `Payload` in JSON, or `[DONE]` after the last one on
/// OpenAI's streams. The schema of a `text/event-stream` describes one event (its fields), as
/// OpenAPI 3.2 spells it; JSON Schema cannot say which schema a JSON string holds, so the
/// description names it.
fn event_schema<Payload: ToSchema>(ends_with_done: bool) -> Schema {
    let json = ObjectBuilder::new()
        .schema_type(Type::String)
        .content_media_type("application/json")
        .description(Some(format!("A `{}` in JSON", Payload::name())));
    let data: Schema = if ends_with_done {
        let done = ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(["[DONE]"]))
            .description(Some("The stream's last event"));
        AnyOfBuilder::new().item(json).item(done).into()
    } else {
        json.into()
    };
    ObjectBuilder::new()
        .property("data", data)
        .required("data")
        .into()
}

/// Declares a unit type for the events of one kind of stream, for a route's `content(...)`.
macro_rules! event_stream {
    ($(#[$doc:meta])* $name:ident, $payload:ty, ends_with_done: $done:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                event_schema::<$payload>($done).into()
            }
        }

        impl ToSchema for $name {}
    };
}

event_stream!(
    /// The events of TGI's streams.
    TgiEvents, TgiStreamEvent, ends_with_done: false
);
event_stream!(
    /// The events of a streamed `/v1/completions`.
    CompletionEvents, CompletionStreamEvent, ends_with_done: true
);
event_stream!(
    /// The events of a streamed `/v1/chat/completions`.
    ChatEvents, ChatStreamEvent, ends_with_done: true
);
event_stream!(
    /// The events of a streamed `/invocations`: those of the route its body belongs to.
    InvocationEvents, InvocationStreamEvent, ends_with_done: true
);

/// Why an OpenAI answer ended: at an end-of-sequence token or a stop sequence (`stop`), or at
/// its token limit (`length`).
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // Describes the strings the answers hold; never built itself.
pub enum OpenAiFinishReason {
    Stop,
    Length,
}

/// The role of an OpenAI chat answer's message.
#[derive(ToSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)] // Describes the string the answers hold; never built itself.
pub enum AssistantRole {
    Assistant,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::FinishReason;

    #[test]
    fn the_committed_document_is_the_generated_one() {
        let committed = include_str!("../../../docs/openapi.json");
        let generated = document_json().expect("the document serializes");
        assert!(
            committed.trim_end() == generated.trim_end(),
            "docs/openapi.json is not what the code generates: run `make openapi` \
             (or `sluice-router print-schema > docs/openapi.json`) and commit the result"
        );
    }

    #[test]
    fn every_finish_reason_openai_sends_is_in_the_schema() {
        let schema =
            serde_json::to_value(<OpenAiFinishReason as utoipa::PartialSchema>::schema()).unwrap();
        let names = &schema["enum"];
        for reason in [
            FinishReason::Length,
            FinishReason::EosToken,
            FinishReason::StopSequence,
        ] {
            let name = openai::finish_reason(reason);
            assert!(
                names.as_array().unwrap().contains(&name.into()),
                "{name} missing from {names}"
            );
        }
    }

    #[test]
    fn the_document_describes_every_route_with_its_bodies() {
        let document = serde_json::to_value(document()).unwrap();
        let paths = document["paths"].as_object().unwrap();
        let mut routes: Vec<&str> = paths.keys().map(String::as_str).collect();
        routes.sort_unstable();
        assert_eq!(
            routes,
            [
                "/",
                "/chat_tokenize",
                "/generate",
                "/generate_stream",
                "/health",
                "/info",
                "/invocations",
                "/metrics",
                "/tokenize",
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/models",
            ]
        );
        let stream = &paths["/generate_stream"]["post"]["responses"]["200"]["content"];
        assert!(stream.get("text/event-stream").is_some(), "{stream}");
        let chat_error = &paths["/v1/chat/completions"]["post"]["responses"]["422"];
        assert_eq!(
            chat_error["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/OpenAiErrorResponse"
        );
    }
}
