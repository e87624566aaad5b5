//! Helm templates from serde values: the YAML structure is built as a [`serde_json::Value`] with
//! placeholder tokens where Helm expressions go, serialized, then each token is replaced by its
//! template text.
//!
//! Contract: a token is a plain YAML scalar (`__paddock_template_N__`), so serialization never quotes
//! it and the replacement lands exactly where the value was. Three kinds of substitution:
//! - [`Template::inline`]: the token becomes the given text (`{{ .Values.replicas }}`);
//! - [`Template::block`]: `key: TOKEN` becomes `key:` plus `{{- toYaml EXPR | nindent N }}` on the
//!   next line, N being the key's indentation plus two (maps and lists from values);
//! - [`Template::lines`]: a list item `- TOKEN` becomes the given lines at the item's indentation
//!   (conditionals such as `{{- with … }}` around optional items).
//!
//! [`Template::render`] fails when a token is left over or used where its kind cannot go, so a
//! builder mistake never reaches a committed template.

use serde_json::Value;

/// A template substitution could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The value could not be serialized to YAML.
    #[error("cannot serialize a chart template to YAML: {0}; this is a bug in paddock-deploy")]
    Serialize(#[from] serde_yaml::Error),
    /// A value could not be serialized to JSON.
    #[error("cannot serialize a chart file to JSON: {0}; this is a bug in paddock-deploy")]
    Json(#[from] serde_json::Error),
    /// A token was not found where its kind can go, or not at all.
    #[error("template placeholder {token} is {problem}; this is a bug in paddock-deploy's chart builders")]
    Placeholder {
        /// The token.
        token: String,
        /// What is wrong with it.
        problem: &'static str,
    },
}

#[derive(Clone, Debug)]
enum Substitution {
    Inline(String),
    Block(String),
    Lines(Vec<String>),
}

/// Collects placeholder tokens and what replaces them.
#[derive(Clone, Debug, Default)]
pub struct Template {
    substitutions: Vec<Substitution>,
}

fn token(index: usize) -> String {
    format!("__paddock_template_{index}__")
}

impl Template {
    /// An empty template.
    pub fn new() -> Template {
        Template::default()
    }

    fn push(&mut self, substitution: Substitution) -> Value {
        self.substitutions.push(substitution);
        Value::String(token(self.substitutions.len() - 1))
    }

    /// A scalar replaced by `text` (e.g. `{{ .Values.replicas }}` or `{{ .Values.name | quote }}`).
    pub fn inline(&mut self, text: impl Into<String>) -> Value {
        self.push(Substitution::Inline(text.into()))
    }

    /// A scalar replaced by `{{ EXPRESSION | quote }}`: any string value, safely quoted.
    pub fn quoted(&mut self, expression: &str) -> Value {
        self.inline(format!("{{{{ {expression} | quote }}}}"))
    }

    /// A mapping value replaced by `toYaml EXPRESSION` on the following lines.
    pub fn block(&mut self, expression: &str) -> Value {
        self.push(Substitution::Block(expression.to_owned()))
    }

    /// A sequence item replaced by `lines`, each at the item's indentation.
    pub fn lines(&mut self, lines: &[&str]) -> Value {
        self.push(Substitution::Lines(
            lines.iter().map(|line| (*line).to_owned()).collect(),
        ))
    }

    /// Serializes `value` and substitutes every token.
    pub fn render(&self, value: &Value) -> Result<String, TemplateError> {
        let mut text = serde_yaml::to_string(value)?;
        for (index, substitution) in self.substitutions.iter().enumerate() {
            let token = token(index);
            let count = text.matches(&token).count();
            if count != 1 {
                return Err(TemplateError::Placeholder {
                    token,
                    problem: if count == 0 {
                        "missing from the serialized YAML"
                    } else {
                        "used more than once"
                    },
                });
            }
            text = match substitution {
                Substitution::Inline(replacement) => text.replace(&token, replacement),
                Substitution::Block(expression) => replace_line(&text, &token, |line| {
                    let key = line.strip_suffix(&format!(" {token}"))?;
                    key.ends_with(':').then_some(())?;
                    let indent = line.len() - line.trim_start().len() + 2;
                    Some(format!(
                        "{key}\n{spaces}{{{{- toYaml {expression} | nindent {indent} }}}}",
                        spaces = " ".repeat(indent)
                    ))
                })?,
                Substitution::Lines(lines) => replace_line(&text, &token, |line| {
                    let indent = line.len() - line.trim_start().len();
                    (line.trim_start() == format!("- {token}")).then(|| {
                        lines
                            .iter()
                            .map(|item| format!("{}{item}", " ".repeat(indent)))
                            .collect::<Vec<_>>()
                            .join("\n")
                    })
                })?,
            };
        }
        Ok(text)
    }
}

/// Replaces the one line containing `token` with what `replace` makes of it.
fn replace_line(
    text: &str,
    token: &str,
    replace: impl Fn(&str) -> Option<String>,
) -> Result<String, TemplateError> {
    let mut output = String::with_capacity(text.len());
    for line in text.lines() {
        if line.contains(token) {
            let replaced = replace(line).ok_or_else(|| TemplateError::Placeholder {
                token: token.to_owned(),
                problem: "not in a position its kind allows (`key: TOKEN` for blocks, `- TOKEN` for lines)",
            })?;
            output.push_str(&replaced);
        } else {
            output.push_str(line);
        }
        output.push('\n');
    }
    Ok(output)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use pretty_assertions::assert_eq;
    use serde_json::json;

    #[test]
    fn every_kind_lands_where_its_value_was() {
        let mut template = Template::new();
        let value = json!({
            "replicas": template.inline("{{ .Values.replicas }}"),
            "spec": {
                "image": template.quoted(".Values.image"),
                "args": ["operator", template.lines(&["{{- with .Values.ns }}", "- {{ . | quote }}", "{{- end }}"])],
                "resources": template.block(".Values.resources"),
            },
        });
        assert_eq!(
            template.render(&value).unwrap(),
            r#"replicas: {{ .Values.replicas }}
spec:
  args:
  - operator
  {{- with .Values.ns }}
  - {{ . | quote }}
  {{- end }}
  image: {{ .Values.image | quote }}
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
"#
        );
    }

    #[test]
    fn misplaced_or_lost_tokens_are_errors() {
        let mut template = Template::new();
        let block = template.block(".Values.x");
        assert!(template.render(&json!({"list": [block]})).is_err());
        let mut template = Template::new();
        let _lost = template.inline("{{ .Values.x }}");
        assert!(template.render(&json!({"a": 1})).is_err());
        let mut template = Template::new();
        let twice = template.inline("{{ .Values.x }}");
        assert!(template.render(&json!({"a": twice.clone(), "b": twice})).is_err());
    }
}
