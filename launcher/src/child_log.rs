//! A child's output line as the launcher logs it. The shards and the router write JSON lines
//! (level, message, where from), which the launcher logs again at their own level under the
//! child's name, so that its log reads as one, in its own format (text, or JSON with
//! --json-output). Any other line (a traceback printed before logging starts, a compiler's
//! output) is logged as it is, at info.

use std::fmt::Write;

use serde_json::{Map, Value};
use tracing::Level;

/// One line of a child's output.
#[derive(Debug, PartialEq)]
pub struct ChildLine {
    pub level: Level,
    /// The module or logger that wrote it, when the child said.
    pub source: Option<String>,
    pub message: String,
}

impl ChildLine {
    /// Reads a JSON log line of a shard (`{"level", "logger", "message"}`) or of the router
    /// (tracing's `{"level", "target", "fields": {"message", ...}}`); the router's other fields
    /// follow its message as `key=value`.
    pub fn parse(line: &str) -> Self {
        let parsed = serde_json::from_str::<Map<String, Value>>(line)
            .ok()
            .and_then(|object| Self::from_json(&object));
        parsed.unwrap_or_else(|| Self {
            level: Level::INFO,
            source: None,
            message: line.to_owned(),
        })
    }

    fn from_json(object: &Map<String, Value>) -> Option<Self> {
        let level = parse_level(object.get("level")?.as_str()?)?;
        let source = ["logger", "target"]
            .iter()
            .find_map(|key| object.get(*key)?.as_str())
            .map(str::to_owned);
        let fields = object.get("fields").and_then(Value::as_object);
        let mut message = object
            .get("message")
            .or_else(|| fields?.get("message"))?
            .as_str()?
            .to_owned();
        for (key, value) in fields.into_iter().flatten() {
            if key != "message" {
                // Writing to a String cannot fail.
                let _ = write!(message, " {key}={value}");
            }
        }
        Some(Self {
            level,
            source,
            message,
        })
    }

    /// How the line reads in an error report's last stderr lines.
    pub fn render(&self) -> String {
        match &self.source {
            Some(source) => format!("{} {source}: {}", self.level, self.message),
            None => self.message.clone(),
        }
    }

    /// Logs the line at its level, with the child's name.
    pub fn log(&self, child: &str) {
        let source = self.source.as_deref();
        let message = &self.message;
        match self.level {
            Level::ERROR => tracing::error!(child, source, "{message}"),
            Level::WARN => tracing::warn!(child, source, "{message}"),
            Level::INFO => tracing::info!(child, source, "{message}"),
            Level::DEBUG => tracing::debug!(child, source, "{message}"),
            Level::TRACE => tracing::trace!(child, source, "{message}"),
        }
    }
}

/// Python's level names and tracing's.
fn parse_level(name: &str) -> Option<Level> {
    match name.to_ascii_uppercase().as_str() {
        "CRITICAL" | "ERROR" => Some(Level::ERROR),
        "WARNING" | "WARN" => Some(Level::WARN),
        "INFO" => Some(Level::INFO),
        "DEBUG" => Some(Level::DEBUG),
        "TRACE" => Some(Level::TRACE),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_line_keeps_its_level_and_logger() {
        let line = ChildLine::parse(
            r#"{"level": "WARNING", "logger": "sluice_server.service", "message": "rejected: x"}"#,
        );
        assert_eq!(
            line,
            ChildLine {
                level: Level::WARN,
                source: Some("sluice_server.service".to_owned()),
                message: "rejected: x".to_owned(),
            }
        );
        assert_eq!(line.render(), "WARN sluice_server.service: rejected: x");
    }

    #[test]
    fn a_router_line_keeps_its_fields() {
        let line = ChildLine::parse(
            r#"{"timestamp":"2026-01-01T00:00:00Z","level":"ERROR","fields":{"message":"step failed","error":"boom","tokens":3},"target":"sluice_router::scheduler::task"}"#,
        );
        assert_eq!(line.level, Level::ERROR);
        assert_eq!(
            line.source.as_deref(),
            Some("sluice_router::scheduler::task")
        );
        assert_eq!(line.message, r#"step failed error="boom" tokens=3"#);
    }

    #[test]
    fn anything_else_is_an_info_line_as_it_is() {
        for text in [
            "Traceback (most recent call last):",
            r#"{"level": "LOUD", "message": "x"}"#,
            r#"{"message": "no level"}"#,
            "[1, 2]",
        ] {
            let line = ChildLine::parse(text);
            assert_eq!((line.level, line.source.as_deref()), (Level::INFO, None));
            assert_eq!(line.render(), text);
        }
    }
}
