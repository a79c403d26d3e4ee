//! How long steps take on the shards, learnt from their answers: what the step builder needs to
//! keep prompt chunks from stalling the requests that decode (`SchedulerConfig::max_decode_stall`).
//!
//! A step that carries a prompt chunk holds every decoding request until it ends, and what a
//! chunk costs per token depends on the machine, the model and how far into its prompt the
//! chunk is (its attention reads every position before it). So the allowance is measured rather
//! than set in tokens: from moving averages of a decode-only step's time and of a prompt token's
//! time in the steps that carry chunks (their time beyond the decodes' share). The prompt
//! tokens' average is weighted by tokens, so that a prompt's short last chunk does not swing it.

use std::time::Duration;

/// The newest step's weight in the moving averages: about the last ten steps count.
const NEWEST_WEIGHT: f64 = 0.2;

/// The fewest prompt tokens a step with decodes may carry whatever the estimate, so that
/// prompts keep advancing when the decodes alone take the whole target.
const MIN_PREFILL_CHUNK: usize = 64;

#[derive(Debug, Default)]
pub struct StepTimes {
    /// Seconds a step of decodes alone takes.
    decode_step: Option<f64>,
    /// Decaying sums over the steps with prompt chunks: their seconds beyond the decodes'
    /// share, and their prompt tokens.
    prefill_seconds: f64,
    prefill_tokens: f64,
}

impl StepTimes {
    /// Learns from a step that ran `decodes` decodes and `prefill_tokens` prompt tokens.
    pub fn observe(&mut self, decodes: usize, prefill_tokens: usize, took: Duration) {
        let seconds = took.as_secs_f64();
        if prefill_tokens == 0 {
            if decodes > 0 {
                let previous = self.decode_step.unwrap_or(seconds);
                self.decode_step = Some(previous + NEWEST_WEIGHT * (seconds - previous));
            }
            return;
        }
        // Without decodes the step's fixed cost counts towards its prompt tokens: an estimate on
        // the safe side.
        let decode_share = if decodes > 0 {
            self.decode_step.unwrap_or(0.0)
        } else {
            0.0
        };
        let keep = 1.0 - NEWEST_WEIGHT;
        self.prefill_seconds = keep * self.prefill_seconds + (seconds - decode_share).max(0.0);
        self.prefill_tokens = keep * self.prefill_tokens + prefill_tokens as f64;
    }

    /// The prompt tokens a step with decodes can carry and still be expected to end within
    /// `target`, at least MIN_PREFILL_CHUNK; `None` before any prompt chunk's time is known.
    pub fn prefill_allowance(&self, target: Duration) -> Option<usize> {
        if self.prefill_tokens == 0.0 {
            return None;
        }
        let seconds_per_token = self.prefill_seconds / self.prefill_tokens;
        let room = (target.as_secs_f64() - self.decode_step.unwrap_or(0.0)).max(0.0);
        // A float-to-integer cast saturates: no measurable cost is no limit.
        let tokens = (room / seconds_per_token) as usize;
        Some(tokens.max(MIN_PREFILL_CHUNK))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(value: u64) -> Duration {
        Duration::from_millis(value)
    }

    /// The allowance for `target` ms, which must be `expected` give or take the float rounding
    /// of the times.
    fn assert_allowance(times: &StepTimes, target: u64, expected: usize) {
        let allowance = times
            .prefill_allowance(ms(target))
            .expect("a chunk was timed");
        assert!(
            allowance.abs_diff(expected) <= 1,
            "{allowance} tokens, not {expected}"
        );
    }

    #[test]
    fn nothing_is_allowed_or_limited_before_a_chunk_is_timed() {
        let mut times = StepTimes::default();
        assert_eq!(times.prefill_allowance(ms(100)), None);
        times.observe(8, 0, ms(20));
        assert_eq!(times.prefill_allowance(ms(100)), None);
    }

    #[test]
    fn the_allowance_is_what_fits_beside_the_decodes() {
        let mut times = StepTimes::default();
        times.observe(8, 0, ms(20));
        // 512 prompt tokens took 420 - 20 ms beside the decodes: 0.78125 ms a token.
        times.observe(8, 512, ms(420));
        assert_allowance(&times, 120, 128);
        assert_allowance(&times, 420, 512);
    }

    #[test]
    fn a_short_chunk_does_not_swing_the_cost_per_token() {
        let mut times = StepTimes::default();
        times.observe(4, 0, ms(10));
        times.observe(4, 500, ms(510));
        // A prompt's last 5 tokens, in a step whose decodes ran 3 ms slow: 2.6 ms a token on
        // their own, 1.02 ms weighted by tokens with the chunk before them.
        times.observe(4, 5, ms(23));
        assert_allowance(&times, 210, 196);
    }

    #[test]
    fn steps_that_grow_costlier_lower_the_allowance() {
        let mut times = StepTimes::default();
        times.observe(2, 0, ms(10));
        times.observe(2, 256, ms(266));
        assert_allowance(&times, 210, 200);
        // Deeper into a long prompt, each token's attention reads more of the cache: 2 ms a
        // token, which the average reaches within about twenty steps.
        for _ in 0..20 {
            times.observe(2, 256, ms(522));
        }
        assert_allowance(&times, 210, 100);
    }

    #[test]
    fn decodes_that_fill_the_target_leave_the_smallest_chunk() {
        let mut times = StepTimes::default();
        times.observe(64, 0, ms(150));
        times.observe(64, 100, ms(250));
        assert_eq!(times.prefill_allowance(ms(100)), Some(MIN_PREFILL_CHUNK));
    }

    #[test]
    fn prompt_steps_without_decodes_count_their_whole_time() {
        let mut times = StepTimes::default();
        // 1.1 ms a token, the step's fixed cost included.
        times.observe(0, 100, ms(110));
        assert_allowance(&times, 110, 100);
    }
}
