//! An OpenAI-compatible chat completions endpoint (llama.cpp's server,
//! llama-cpp-python, Ollama, vLLM, LocalAI or a cloud service) asked for an
//! answer constrained by the task's JSON schema. Blocking: it runs on
//! tokio's blocking pool.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::shape::excerpt;
use super::ResponseFormat;

/// Why a call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// `why` names the URL (ureq's message does).
    #[error("cannot reach the upstream: {why}")]
    Transport { why: String },
    #[error("{url} answered HTTP {code}: {body}")]
    Status {
        url: String,
        code: u16,
        body: String,
    },
    #[error("cannot read the key file {path}: {why}")]
    Key { path: String, why: String },
    #[error("the reply is not a chat completion with JSON content: {0}")]
    NotACompletion(String),
}

impl HttpError {
    /// A fixed name for it, for results (no URL, nothing the server sent).
    pub fn code(&self) -> String {
        match self {
            HttpError::Transport { .. } => "unreachable".into(),
            HttpError::Status { code, .. } => format!("http_{code}"),
            HttpError::Key { .. } => "key_file".into(),
            HttpError::NotACompletion(_) => "not_a_completion".into(),
        }
    }

    /// Whether trying again later may help (the service is down, busy or
    /// failing); a refused key or a bad request will not get better.
    pub fn retryable(&self) -> bool {
        match self {
            HttpError::Transport { .. } => true,
            HttpError::Status { code, .. } => *code == 408 || *code == 429 || *code >= 500,
            HttpError::Key { .. } | HttpError::NotACompletion(_) => false,
        }
    }
}

/// One call.
pub struct Call {
    /// The base URL, such as `http://127.0.0.1:8080/v1`.
    pub url: String,
    pub model: String,
    pub key_file: Option<PathBuf>,
    pub format: ResponseFormat,
    pub timeout: Duration,
    pub system: String,
    pub user: String,
    pub schema: Value,
}

/// The request body for `call`.
pub fn body(call: &Call) -> Value {
    let response_format = match call.format {
        ResponseFormat::JsonSchema => json!({
            "type": "json_schema",
            // Not strict: OpenAI's strict mode wants every slot required;
            // slmd checks every answer against the schema itself.
            "json_schema": {"name": "slmd_answer", "strict": false, "schema": call.schema},
        }),
        ResponseFormat::JsonObject => json!({"type": "json_object", "schema": call.schema}),
    };
    json!({
        "model": call.model,
        "temperature": 0,
        "max_tokens": 256,
        "messages": [
            {"role": "system", "content": call.system},
            {"role": "user", "content": call.user},
        ],
        "response_format": response_format,
    })
}

/// Posts `call` and returns the JSON its first choice's content holds.
pub fn complete(call: &Call) -> Result<Value, HttpError> {
    let url = format!("{}/chat/completions", call.url.trim_end_matches('/'));
    let agent = ureq::AgentBuilder::new().timeout(call.timeout).build();
    let mut req = agent.post(&url).set("Content-Type", "application/json");
    if let Some(path) = &call.key_file {
        let key = std::fs::read_to_string(path).map_err(|e| HttpError::Key {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        req = req.set("Authorization", &format!("Bearer {}", key.trim()));
    }
    let reply = match req.send_string(&body(call).to_string()) {
        Ok(r) => r,
        Err(ureq::Error::Status(code, r)) => {
            return Err(HttpError::Status {
                url,
                code,
                body: excerpt(&r.into_string().unwrap_or_default()),
            })
        }
        Err(e) => return Err(HttpError::Transport { why: e.to_string() }),
    };
    let text = reply.into_string().map_err(|e| HttpError::Transport {
        why: format!("{url}: {e}"),
    })?;
    content(&text)
}

/// The JSON in a completion's `choices[0].message.content`.
fn content(completion: &str) -> Result<Value, HttpError> {
    let bad = || HttpError::NotACompletion(excerpt(completion));
    let v: Value = serde_json::from_str(completion).map_err(|_| bad())?;
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .ok_or_else(bad)?;
    serde_json::from_str(text.trim()).map_err(|_| HttpError::NotACompletion(excerpt(text)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_the_json_in_the_first_choices_content() {
        let c =
            r#"{"choices":[{"message":{"role":"assistant","content":" {\"label\": \"on\"} "}}]}"#;
        assert_eq!(content(c).unwrap(), json!({"label": "on"}));
        assert!(matches!(content("{}"), Err(HttpError::NotACompletion(_))));
        let prose = r#"{"choices":[{"message":{"content":"Sure! It is on."}}]}"#;
        assert!(matches!(content(prose), Err(HttpError::NotACompletion(_))));
    }

    #[test]
    fn only_transport_trouble_and_server_errors_are_retried() {
        let status = |code| HttpError::Status {
            url: String::new(),
            code,
            body: String::new(),
        };
        assert!(status(503).retryable() && status(429).retryable());
        assert!(!status(401).retryable() && !status(400).retryable());
    }
}
