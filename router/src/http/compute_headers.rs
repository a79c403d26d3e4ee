//! TGI's response headers on what a generation cost: `x-compute-type` (the model's device),
//! `x-compute-characters` (of the input), `x-prompt-tokens`, `x-generated-tokens`, and the times
//! in milliseconds (`x-total-time`, split into `x-validation-time` until the scheduler had the
//! request, `x-queue-time` until a step first ran it, `x-inference-time` from then on;
//! `x-time-per-token` is the inference time per generated token). `x-compute-time` is the total
//! in seconds, as TGI sends it. A stream's headers go out before any token, with what is known
//! then.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::request::GenerationEnd;

/// What a route knows about a request once it is queued.
pub struct ComputeHeaders {
    compute_type: Option<HeaderValue>,
    characters: usize,
    prompt_tokens: usize,
    /// When the route got the request.
    received: Instant,
}

impl ComputeHeaders {
    pub fn new(compute_type: &str, inputs: &str, prompt_tokens: usize, received: Instant) -> Self {
        Self {
            compute_type: HeaderValue::from_str(compute_type).ok(),
            characters: inputs.chars().count(),
            prompt_tokens,
            received,
        }
    }

    /// The headers of a stream, sent before its first token.
    pub fn at_stream_start(&self) -> HeaderMap {
        let mut headers = self.known_from_the_start();
        insert(
            &mut headers,
            "x-validation-time",
            millis(self.received.elapsed()),
        );
        // Proxies must pass events on as they come.
        headers.insert(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        );
        headers
    }

    /// The headers of a whole answer, now that the request ended.
    pub fn at_end(&self, end: &GenerationEnd) -> HeaderMap {
        self.finished(end, Instant::now())
    }

    fn finished(&self, end: &GenerationEnd, now: Instant) -> HeaderMap {
        let times = Timings::new(
            self.received,
            end.queued,
            end.started,
            now,
            end.generated_tokens,
        );
        let mut headers = self.known_from_the_start();
        if let Ok(seconds) = HeaderValue::try_from(times.total.as_secs_f64().to_string()) {
            headers.insert(HeaderName::from_static("x-compute-time"), seconds);
        }
        insert(&mut headers, "x-total-time", millis(times.total));
        insert(&mut headers, "x-validation-time", millis(times.validation));
        insert(&mut headers, "x-queue-time", millis(times.queue));
        insert(&mut headers, "x-inference-time", millis(times.inference));
        insert(&mut headers, "x-time-per-token", millis(times.per_token));
        insert(
            &mut headers,
            "x-generated-tokens",
            u64::from(end.generated_tokens),
        );
        headers
    }

    fn known_from_the_start(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(compute_type) = &self.compute_type {
            headers.insert(
                HeaderName::from_static("x-compute-type"),
                compute_type.clone(),
            );
        }
        insert(&mut headers, "x-compute-characters", self.characters as u64);
        insert(&mut headers, "x-prompt-tokens", self.prompt_tokens as u64);
        headers
    }
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: u64) {
    headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// How a request's time splits up.
#[derive(Debug, PartialEq)]
struct Timings {
    total: Duration,
    validation: Duration,
    queue: Duration,
    inference: Duration,
    per_token: Duration,
}

impl Timings {
    fn new(
        received: Instant,
        queued: Instant,
        started: Instant,
        finished: Instant,
        generated_tokens: u32,
    ) -> Self {
        let inference = finished.saturating_duration_since(started);
        Self {
            total: finished.saturating_duration_since(received),
            validation: queued.saturating_duration_since(received),
            queue: started.saturating_duration_since(queued),
            inference,
            // A request ends on a token, so there is at least one.
            per_token: inference / generated_tokens.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::FinishReason;

    #[test]
    fn the_times_add_up_to_the_total() {
        let received = Instant::now();
        let ms = Duration::from_millis;
        let end = GenerationEnd {
            finish_reason: FinishReason::Length,
            generated_text: "é!".into(),
            stop_sequence_start: None,
            generated_tokens: 4,
            cached_tokens: 0,
            prompt_tokens: Vec::new(),
            queued: received + ms(3),
            started: received + ms(10),
        };
        let headers = ComputeHeaders::new("cpu", "héllo", 7, received);
        let finished = headers.finished(&end, received + ms(110));
        let value = |name: &str| finished[name].to_str().unwrap().to_string();
        assert_eq!(value("x-compute-type"), "cpu");
        assert_eq!(value("x-compute-characters"), "5");
        assert_eq!(value("x-prompt-tokens"), "7");
        assert_eq!(value("x-generated-tokens"), "4");
        assert_eq!(value("x-total-time"), "110");
        assert_eq!(value("x-compute-time"), "0.11");
        assert_eq!(value("x-validation-time"), "3");
        assert_eq!(value("x-queue-time"), "7");
        assert_eq!(value("x-inference-time"), "100");
        assert_eq!(value("x-time-per-token"), "25");
    }

    #[test]
    fn a_stream_starts_with_what_is_known_before_any_token() {
        let headers = ComputeHeaders::new("cuda", "abc", 2, Instant::now()).at_stream_start();
        assert_eq!(headers["x-compute-type"], "cuda");
        assert_eq!(headers["x-compute-characters"], "3");
        assert_eq!(headers["x-prompt-tokens"], "2");
        assert_eq!(headers["x-accel-buffering"], "no");
        assert!(headers.contains_key("x-validation-time"));
        assert!(!headers.contains_key("x-generated-tokens"));
    }
}
