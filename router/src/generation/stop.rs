//! Stop sequences: found in the generated text, also when they span several tokens.

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
    /// returns the byte offset just past the earliest one.
    pub fn find(&self, text: &str, new_from: usize) -> Option<usize> {
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
            .filter_map(|s| window.find(s.as_str()).map(|at| start + at + s.len()))
            .filter(|end| *end > new_from)
            .min()
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
            Some("The capital is Paris".len())
        );
    }

    #[test]
    fn ignores_matches_that_ended_before_the_new_text() {
        let stops = StopSequences::new(vec!["ab".into()]);
        let text = "ab then more";
        assert_eq!(stops.find(text, 5), None);
    }

    #[test]
    fn picks_the_earliest_of_several_and_respects_char_boundaries() {
        let stops = StopSequences::new(vec!["été".into(), "x".into()]);
        let text = "un été x";
        assert_eq!(stops.find(text, 3), Some("un été".len()));
        assert_eq!(StopSequences::new(vec![]).find(text, 0), None);
    }
}
