//! What every generation route does first, whichever API it speaks: validate the prompt and
//! parameters, take an admission slot (none left: 429), and queue the request on the scheduler.

use super::error::ApiError;
use super::AppState;
use crate::generation::GenerationStream;
use crate::request::{GenerationRequest, Prompt, RequestedParameters};

/// A request that passed validation and admission and is queued on the scheduler.
pub struct Submitted {
    /// Its tokens as they come; dropping it cancels the request.
    pub stream: GenerationStream,
    pub valid: GenerationRequest,
}

pub fn submit(
    state: &AppState,
    prompt: Prompt<'_>,
    requested: &RequestedParameters,
) -> Result<Submitted, ApiError> {
    let valid = state.validator.validate(prompt, requested)?;
    let permit = state
        .admission
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::Overloaded)?;
    let events = state.scheduler.submit(valid.clone())?;
    Ok(Submitted {
        stream: GenerationStream::new(events, Some(permit)),
        valid,
    })
}
