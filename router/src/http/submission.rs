//! What every generation route does first, whichever API it speaks: refuse it while the router
//! drains (503), validate the prompt and parameters, take an admission slot (none left: 429),
//! and queue the request on the scheduler.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::error::ApiError;
use super::AppState;
use crate::generation::GenerationStream;
use crate::request::{GenerationRequest, Prompt, RequestedParameters};
use crate::scheduler::SchedulerError;
use crate::telemetry::{self, RequestTelemetry};

/// A request that passed validation and admission and is queued on the scheduler.
pub struct Submitted {
    /// Each sequence's tokens as they come (one unless `sequences` asked for more); dropping a
    /// stream cancels its sequence.
    pub streams: Vec<GenerationStream>,
    pub valid: GenerationRequest,
}

impl Submitted {
    /// The first sequence's stream, for answers that have one sequence.
    pub fn into_single(self) -> Result<(GenerationStream, GenerationRequest), ApiError> {
        match self.streams.into_iter().next() {
            Some(stream) => Ok((stream, self.valid)),
            None => Err(SchedulerError::Closed.into()),
        }
    }
}

pub fn submit(
    state: &AppState,
    prompt: Prompt<'_>,
    requested: &RequestedParameters,
) -> Result<Submitted, ApiError> {
    let received = Instant::now();
    telemetry::record_received();
    admit(state, prompt, requested, received).inspect_err(|error| {
        telemetry::record_refused(error.error_type());
    })
}

fn admit(
    state: &AppState,
    prompt: Prompt<'_>,
    requested: &RequestedParameters,
    received: Instant,
) -> Result<Submitted, ApiError> {
    if state.draining.is_draining() {
        return Err(ApiError::ShuttingDown);
    }
    let valid = state.validator.validate(prompt, requested)?;
    let permit = state
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
    // One slot under --max-concurrent-requests for all of the request's sequences.
    let permit = Arc::new(permit);
    let mut telemetry = Some(RequestTelemetry::validated(
        state.request_ids.fetch_add(1, Ordering::Relaxed),
        received,
        valid.input_ids.len(),
        valid.stopping.max_new_tokens,
    ));
    let streams = state
        .scheduler
        .submit(valid.clone())?
        .into_iter()
        // The first sequence reports for the request.
        .map(|events| GenerationStream::new(events, Some(permit.clone()), telemetry.take()))
        .collect();
    Ok(Submitted { streams, valid })
}
