//! The model's chat template: the Jinja template, shipped with the tokenizer, that turns a
//! conversation into the prompt text the model was trained on. It is read and compiled once at
//! startup; a template that does not compile stops the router there rather than failing every
//! chat request.
//!
//! Templates are written for Python's Jinja2 and rendered here with MiniJinja, set up the way
//! `transformers` sets up Jinja2 (blocks trim their newline and leading whitespace) and with
//! Python's string and dict methods (`.strip()`, `.items()`, ...) available, which many
//! templates call.

use std::path::{Path, PathBuf};

use minijinja::{Environment, ErrorKind};
use serde::Serialize;
use serde_json::Value;

const TEMPLATE_NAME: &str = "chat_template";
/// Where the template is looked for first, as `transformers` keeps it.
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// Where newer models keep it, outside tokenizer_config.json.
const TEMPLATE_FILE: &str = "chat_template.jinja";

#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    #[error("cannot read {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{path} is not a valid tokenizer config: {message}")]
    Config { path: PathBuf, message: String },
    #[error("the chat template from {origin} does not compile: {message}")]
    Compile { origin: String, message: String },
    #[error("the model has no chat template")]
    Missing,
    #[error("the chat template cannot render this conversation: {0}")]
    Render(String),
}

/// One message as the template sees it: `message['role']`, `message['content']`, and the optional
/// `name` and `tool_call_id` when the client gave them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// The variables a template is rendered with, named as `transformers` names them.
#[derive(Serialize)]
struct TemplateContext<'a> {
    messages: &'a [ChatMessage],
    add_generation_prompt: bool,
    // Left undefined when the tokenizer has none, as in `transformers` (`none` would print).
    #[serde(skip_serializing_if = "Option::is_none")]
    bos_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eos_token: Option<&'a str>,
    /// Always `none`: tools are refused before a template runs. Templates test `tools is not
    /// none`, which an undefined variable would pass.
    tools: Option<()>,
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Reads the template of the model whose tokenizer is at `tokenizer_path` (a model directory,
    /// or the tokenizer.json inside one): `chat_template` in tokenizer_config.json (a string, or a
    /// list of named templates of which "default" is taken), else chat_template.jinja. `None`
    /// when the model has neither.
    pub fn from_model_dir(tokenizer_path: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let dir = if tokenizer_path.is_dir() {
            tokenizer_path
        } else {
            tokenizer_path.parent().unwrap_or(Path::new("."))
        };
        let config_path = dir.join(TOKENIZER_CONFIG);
        let config = match std::fs::read_to_string(&config_path) {
            Ok(text) => {
                serde_json::from_str::<Value>(&text).map_err(|e| ChatTemplateError::Config {
                    path: config_path.clone(),
                    message: e.to_string(),
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Value::Null,
            Err(e) => {
                return Err(ChatTemplateError::Read {
                    path: config_path,
                    message: e.to_string(),
                })
            }
        };
        let bos_token = special_token(&config, "bos_token");
        let eos_token = special_token(&config, "eos_token");

        let (source, origin) = match config_template(&config, &config_path)? {
            Some(source) => (source, config_path.display().to_string()),
            None => {
                let file = dir.join(TEMPLATE_FILE);
                match std::fs::read_to_string(&file) {
                    Ok(source) => (source, file.display().to_string()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => {
                        return Err(ChatTemplateError::Read {
                            path: file,
                            message: e.to_string(),
                        })
                    }
                }
            }
        };
        Self::new(source, &origin, bos_token, eos_token).map(Some)
    }

    /// Compiles a template; `origin` names where it came from in the error.
    pub fn new(
        source: String,
        origin: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        // What `transformers` sets on its Jinja2 environment; templates are written for it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source)
            .map_err(|e| ChatTemplateError::Compile {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt for `messages`, ending with the opening of the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, ChatTemplateError> {
        let context = TemplateContext {
            messages,
            add_generation_prompt: true,
            bos_token: self.bos_token.as_deref(),
            eos_token: self.eos_token.as_deref(),
            tools: None,
        };
        self.env
            .get_template(TEMPLATE_NAME)
            .and_then(|template| template.render(context))
            .map_err(|e| ChatTemplateError::Render(render_error_message(&e)))
    }
}

/// `raise_exception(message)`: how templates refuse a conversation (e.g. roles that do not
/// alternate). The message reaches the client.
fn raise_exception(message: String) -> Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// A template's own message when it raised one, else MiniJinja's description.
fn render_error_message(error: &minijinja::Error) -> String {
    match (error.kind(), error.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => error.to_string(),
    }
}

/// `chat_template` from tokenizer_config.json: a string, or a list of `{name, template}` of
/// which the one named "default" is taken.
fn config_template(config: &Value, path: &Path) -> Result<Option<String>, ChatTemplateError> {
    let invalid = |message: &str| ChatTemplateError::Config {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(source)) => Ok(Some(source.clone())),
        Some(Value::Array(named)) => {
            let default = named
                .iter()
                .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"));
            match default {
                // Other names (tool use, retrieval) serve requests Sluice refuses.
                None => Ok(None),
                Some(entry) => entry
                    .get("template")
                    .and_then(Value::as_str)
                    .map(|source| Some(source.to_string()))
                    .ok_or_else(|| {
                        invalid("the \"default\" chat template has no `template` string")
                    }),
            }
        }
        Some(_) => Err(invalid(
            "`chat_template` must be a string or a list of named templates",
        )),
    }
}

/// A special token's text from tokenizer_config.json, written either as a string or as an added
/// token object with its text in `content`.
fn special_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(text) => Some(text.clone()),
        Value::Object(token) => token
            .get("content")
            .and_then(Value::as_str)
            .map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Llama 3's shape: BOS from the tokenizer config, headers around each role, content trimmed
    /// with Jinja's filter.
    const LLAMA3_LIKE: &str = "{% for message in messages %}\
        {% if loop.first %}{{ bos_token }}{% endif %}\
        {{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' \
        + message['content'] | trim + '<|eot_id|>' }}\
        {% endfor %}\
        {% if add_generation_prompt %}\
        {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\
        {% endif %}";

    /// ChatML with Python's `.strip()`, a default system prompt, and a refusal through
    /// `raise_exception`; written across lines, as templates are, so block trimming matters.
    const CHATML_WITH_PYTHON_METHODS: &str = "\
{% if messages[0]['role'] == 'assistant' %}
    {{ raise_exception('Conversations must not start with the assistant') }}
{% endif %}
{% if messages[0]['role'] != 'system' %}
<|im_start|>system
You are helpful.<|im_end|>
{% endif %}
{% for message in messages %}
    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>\\n' }}
{%- endfor %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}";

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
            name: None,
            tool_call_id: None,
        }
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(
            source.into(),
            "test",
            Some("<|begin_of_text|>".into()),
            Some("<|eot_id|>".into()),
        )
        .unwrap()
    }

    #[test]
    fn renders_a_llama3_like_template_with_the_bos_token() {
        let rendered = template(LLAMA3_LIKE)
            .render(&[message("system", "Be brief. "), message("user", "  Hi!\n")])
            .unwrap();
        assert_eq!(
            rendered,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn renders_chatml_with_python_string_methods_and_trimmed_blocks() {
        let chatml = template(CHATML_WITH_PYTHON_METHODS);
        assert_eq!(
            chatml.render(&[message("user", " What is 2+2? ")]).unwrap(),
            "<|im_start|>system\nYou are helpful.<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            chatml
                .render(&[
                    message("system", "Be terse."),
                    message("user", "Hi"),
                    message("assistant", "Hello."),
                    message("user", "Bye"),
                ])
                .unwrap(),
            "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n\
             <|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_raised_exception_reaches_the_caller_with_its_message() {
        let error = template(CHATML_WITH_PYTHON_METHODS)
            .render(&[message("assistant", "I start.")])
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the chat template cannot render this conversation: \
             Conversations must not start with the assistant"
        );
    }

    #[test]
    fn tools_are_none_and_a_missing_bos_token_is_undefined() {
        let source = "{% if tools is not none %}tools{% endif %}[{{ bos_token }}]";
        let without_bos = ChatTemplate::new(source.into(), "test", None, None).unwrap();
        assert_eq!(without_bos.render(&[message("user", "x")]).unwrap(), "[]");
    }

    #[test]
    fn a_template_that_does_not_compile_names_its_origin() {
        let error = ChatTemplate::new("{% for %}".into(), "the test", None, None).unwrap_err();
        assert!(matches!(error, ChatTemplateError::Compile { .. }));
        assert!(error
            .to_string()
            .starts_with("the chat template from the test does not compile"));
    }

    /// A scratch model directory, removed when dropped.
    struct ModelDir(PathBuf);

    impl ModelDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "sluice-chat-template-{name}-{}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn write(&self, file: &str, text: &str) {
            std::fs::write(self.0.join(file), text).unwrap();
        }
    }

    impl Drop for ModelDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reads_the_template_and_special_tokens_from_tokenizer_config() {
        let dir = ModelDir::new("config");
        let default_template = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}";
        let config = serde_json::json!({
            "bos_token": {"content": "<s>", "special": true},
            "eos_token": "</s>",
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": default_template}
            ]
        });
        dir.write(TOKENIZER_CONFIG, &config.to_string());
        // tokenizer_config.json wins over the separate file.
        dir.write(TEMPLATE_FILE, "from the file");
        let template = ChatTemplate::from_model_dir(&dir.0.join("tokenizer.json"))
            .unwrap()
            .unwrap();
        assert_eq!(
            template.render(&[message("user", "hi")]).unwrap(),
            "<s>hi</s>"
        );
    }

    #[test]
    fn falls_back_to_chat_template_jinja_and_to_none() {
        let dir = ModelDir::new("file");
        dir.write(TOKENIZER_CONFIG, r#"{"eos_token": "</s>"}"#);
        assert!(ChatTemplate::from_model_dir(&dir.0).unwrap().is_none());
        dir.write(
            TEMPLATE_FILE,
            "{{ messages | length }} message{{ eos_token }}",
        );
        let template = ChatTemplate::from_model_dir(&dir.0).unwrap().unwrap();
        assert_eq!(
            template.render(&[message("user", "hi")]).unwrap(),
            "1 message</s>"
        );
    }

    #[test]
    fn a_broken_tokenizer_config_is_an_error() {
        let dir = ModelDir::new("broken");
        dir.write(TOKENIZER_CONFIG, "{not json");
        assert!(matches!(
            ChatTemplate::from_model_dir(&dir.0).unwrap_err(),
            ChatTemplateError::Config { .. }
        ));
        dir.write(TOKENIZER_CONFIG, r#"{"chat_template": 3}"#);
        assert!(matches!(
            ChatTemplate::from_model_dir(&dir.0).unwrap_err(),
            ChatTemplateError::Config { .. }
        ));
    }
}
