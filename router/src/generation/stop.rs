//! The one place that decides when a request stops: an end-of-sequence token (unless the request
//! ignores them), `max_new_tokens`, or a stop sequence in the generated text. The shards never
//! stop a request; the scheduler asks `StopCriteria` after every token and frees what it ends.

use std::ops::Range;
use std::sync::Arc;

use crate::request::{FinishReason, StoppingParameters};

/// Why and where a request stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop {
    pub reason: FinishReason,
    /// For a stop sequence: its bytes in the generated text, which ends with it.
    pub sequence: Option<Range<usize>>,
}

pub struct StopCriteria {
    max_new_tokens: u32,
    /// Empty when the request ignores end-of-sequence tokens.
    eos_token_ids: Arc<[u32]>,
    sequences: StopSequences,
}

impl StopCriteria {
    /// `eos_token_ids` are the model's (from the shards' Info).
    pub fn new(stopping: &StoppingParameters, eos_token_ids: &Arc<[u32]>) -> Self {
        Self {
            max_new_tokens: stopping.max_new_tokens,
            eos_token_ids: if stopping.ignore_eos {
                Arc::from([])
            } else {
                eos_token_ids.clone()
            },
            sequences: StopSequences::new(stopping.stop_sequences.clone()),
        }
    }

    /// Whether the request stops after `token`, its `generated`-th token, which extended the
    /// generated `text` from byte `new_from` on. A stop sequence wins over the other reasons,
    /// since it also cuts the text.
    pub fn check(&self, token: u32, generated: u32, text: &str, new_from: usize) -> Option<Stop> {
        if let Some(sequence) = self.sequences.find(text, new_from) {
            return Some(Stop {
                reason: FinishReason::StopSequence,
                sequence: Some(sequence),
            });
        }
        let reason = if self.eos_token_ids.contains(&token) {
            FinishReason::EosToken
        } else if generated >= self.max_new_tokens {
            FinishReason::Length
        } else {
            return None;
        };
        Some(Stop {
            reason,
            sequence: None,
        })
    }
}

pub struct StopSequences {
    sequences: Vec<String>,
    longest: usize,
}

impl StopSequences {
    pub fn new(sequences: Vec<String>) -> Self {
        let longest = sequences.iter().map(String::len).max().unwrap_or(0);
        Self { sequences, longest }
    }

    /// Looks for a stop sequence that ends in the text added since byte `new_from`, and
    /// returns the bytes of the one that ends first (of those ending together, the longest).
    pub fn find(&self, text: &str, new_from: usize) -> Option<Range<usize>> {
        if self.longest == 0 || new_from >= text.len() {
            return None;
        }
        // A match must end in the new text, so it starts at most `longest - 1` bytes earlier.
        let mut start = new_from.saturating_sub(self.longest - 1);
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let window = &text[start..];
        self.sequences
            .iter()
            .filter_map(|s| {
                window
                    .find(s.as_str())
                    .map(|at| start + at..start + at + s.len())
            })
            .filter(|found| found.end > new_from)
            .min_by_key(|found| (found.end, found.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_sequence_that_spans_tokens() {
        let stops = StopSequences::new(vec!["Paris".into()]);
        let mut text = String::from("The capital is Pa");
        assert_eq!(stops.find(&text, 14), None);
        let before = text.len();
        text.push_str("ris, of course");
        assert_eq!(
            stops.find(&text, before),
            Some("The capital is ".len().."The capital is Paris".len())
        );
    }

    #[test]
    fn ignores_matches_that_ended_before_the_new_text() {
        let stops = StopSequences::new(vec!["ab".into()]);
        let text = "ab then more";
        assert_eq!(stops.find(text, 5), None);
    }

    fn criteria(max_new_tokens: u32, ignore_eos: bool, stop: &[&str]) -> StopCriteria {
        let stopping = StoppingParameters {
            max_new_tokens,
            ignore_eos,
            stop_sequences: stop.iter().map(|s| s.to_string()).collect(),
        };
        StopCriteria::new(&stopping, &Arc::from([2u32, 3]))
    }

    #[test]
    fn stops_at_end_of_sequence_unless_ignored_and_at_the_length() {
        let stops = criteria(4, false, &[]);
        assert_eq!(stops.check(7, 1, "a", 0), None);
        assert_eq!(
            stops.check(3, 1, "a", 0).map(|s| s.reason),
            Some(FinishReason::EosToken)
        );
        assert_eq!(
            stops.check(7, 4, "abcd", 3).map(|s| s.reason),
            Some(FinishReason::Length)
        );
        let ignoring = criteria(4, true, &[]);
        assert_eq!(ignoring.check(3, 1, "a", 0), None);
        assert_eq!(
            ignoring.check(3, 4, "abcd", 3).map(|s| s.reason),
            Some(FinishReason::Length)
        );
    }

    #[test]
    fn a_stop_sequence_wins_and_says_where_it_is() {
        let stops = criteria(2, false, &["cd"]);
        assert_eq!(
            stops.check(3, 2, "abcdef", 3),
            Some(Stop {
                reason: FinishReason::StopSequence,
                sequence: Some(2..4)
            })
        );
    }

    #[test]
    fn picks_the_earliest_of_several_and_respects_char_boundaries() {
        let stops = StopSequences::new(vec!["été".into(), "x".into()]);
        let text = "un été x";
        assert_eq!(stops.find(text, 3), Some("un ".len().."un été".len()));
        // Ending together, the longest wins: the answer ends where it starts.
        let together = StopSequences::new(vec!["a".into(), "ba".into()]);
        assert_eq!(together.find("xyzba", 4), Some(3..5));
        assert_eq!(StopSequences::new(vec![]).find(text, 0), None);
    }
}
