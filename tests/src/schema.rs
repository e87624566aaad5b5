//! Checks objects against the structural `openAPIV3Schema` of a CustomResourceDefinition the way the
//! Kubernetes API server does, without an API server: apply `default`s, then validate types, enums,
//! required fields, formats, patterns and bounds, and report every field the server would *prune*
//! (drop silently because the schema does not know it).
//!
//! Pruning is the reason this is not a plain JSON-Schema check: a misspelt field in a builder would pass
//! JSON Schema (unknown properties are allowed) yet never reach KubeVirt. CEL rules
//! (`x-kubernetes-validations`) are left to `kube::core::cel` in the tests that need them.

use std::{fs, path::Path};

use serde_json::{Map, Value};
use thiserror::Error;

/// A problem loading a CRD.
#[derive(Debug, Error)]
pub enum SchemaError {
    /// The file could not be read.
    #[error("cannot read CRD file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not YAML.
    #[error("CRD file {path} is not valid YAML: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The YAML error.
        source: serde_yaml::Error,
    },
    /// The CRD has no schema for the version.
    #[error("CRD {crd} has no openAPIV3Schema for version {version}")]
    NoSchema {
        /// The CRD's name.
        crd: String,
        /// The version asked for.
        version: String,
    },
}

/// One violation: the JSON path of the field and what is wrong.
pub type Violation = String;

/// The structural schema of one version of a CRD.
#[derive(Clone, Debug)]
pub struct StructuralSchema {
    root: Value,
}

impl StructuralSchema {
    /// Loads the schema of `version` from a CRD YAML file.
    pub fn from_crd_file(path: &Path, version: &str) -> Result<Self, SchemaError> {
        let text = fs::read_to_string(path).map_err(|source| SchemaError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let crd: Value = serde_yaml::from_str(&text).map_err(|source| SchemaError::Parse {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_crd_value(&crd, version)
    }

    /// Loads the schema of `version` from a CRD already parsed to JSON.
    pub fn from_crd_value(crd: &Value, version: &str) -> Result<Self, SchemaError> {
        let crd_name = crd
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let schema = crd
            .pointer("/spec/versions")
            .and_then(Value::as_array)
            .and_then(|versions| {
                versions
                    .iter()
                    .find(|v| v.get("name").and_then(Value::as_str) == Some(version))
            })
            .and_then(|v| v.pointer("/schema/openAPIV3Schema"))
            .cloned()
            .ok_or_else(|| SchemaError::NoSchema {
                crd: crd_name,
                version: version.to_owned(),
            })?;
        Ok(StructuralSchema { root: schema })
    }

    /// The raw `openAPIV3Schema`.
    pub fn root(&self) -> &Value {
        &self.root
    }

    /// Fills in `default`s as the API server does on create (recursively, parents before children).
    pub fn apply_defaults(&self, object: &mut Value) {
        apply_defaults(&self.root, object);
    }

    /// Every violation and pruned field, or an empty list when the object is accepted unchanged.
    pub fn violations(&self, object: &Value) -> Vec<Violation> {
        let mut violations = Vec::new();
        check(&self.root, object, "", true, &mut violations);
        violations
    }
}

fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (name, property) in properties {
                    if !map.contains_key(name)
                        && let Some(default) = property.get("default")
                    {
                        map.insert(name.clone(), default.clone());
                    }
                    if let Some(child) = map.get_mut(name) {
                        apply_defaults(property, child);
                    }
                }
            } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for child in map.values_mut() {
                    apply_defaults(additional, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool).unwrap_or(false)
}

fn check(schema: &Value, value: &Value, path: &str, is_root: bool, violations: &mut Vec<Violation>) {
    let here = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        if !flag(schema, "nullable") {
            violations.push(format!("{here}: null is not allowed here"));
        }
        return;
    }
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            violations.push(format!("{here}: expected an integer or a string, found {value}"));
        }
    } else if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let matches = match expected {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            _ => true,
        };
        if !matches {
            violations.push(format!("{here}: expected type {expected}, found {value}"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        violations.push(format!(
            "{here}: {value} is not one of {}",
            Value::Array(allowed.clone())
        ));
    }
    check_bounds(schema, value, here, violations);
    match value {
        Value::Object(map) => check_object(schema, map, path, is_root, violations),
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (index, item) in items.iter().enumerate() {
                    check(item_schema, item, &format!("{path}[{index}]"), false, violations);
                }
            }
        }
        _ => {}
    }
}

fn check_bounds(schema: &Value, value: &Value, here: &str, violations: &mut Vec<Violation>) {
    let number = |key: &str| schema.get(key).and_then(Value::as_f64);
    if let Value::String(text) = value {
        let length = text.chars().count() as f64;
        if number("maxLength").is_some_and(|max| length > max) {
            violations.push(format!("{here}: longer than maxLength"));
        }
        if number("minLength").is_some_and(|min| length < min) {
            violations.push(format!("{here}: shorter than minLength"));
        }
        if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
            match regex::Regex::new(pattern) {
                Ok(regex) if !regex.is_match(text) => {
                    violations.push(format!("{here}: '{text}' does not match pattern {pattern}"));
                }
                Ok(_) => {}
                Err(error) => violations.push(format!(
                    "{here}: schema pattern {pattern} does not compile: {error}"
                )),
            }
        }
        if schema.get("format").and_then(Value::as_str) == Some("date-time")
            && !(text.len() >= 20 && text.as_bytes().get(10) == Some(&b'T'))
        {
            violations.push(format!("{here}: '{text}' is not an RFC 3339 date-time"));
        }
    }
    if let Some(actual) = value.as_f64() {
        if number("minimum").is_some_and(|min| actual < min) {
            violations.push(format!("{here}: {actual} is below the minimum"));
        }
        if number("maximum").is_some_and(|max| actual > max) {
            violations.push(format!("{here}: {actual} is above the maximum"));
        }
        match schema.get("format").and_then(Value::as_str) {
            Some("int32") if value.as_i64().is_none_or(|v| i32::try_from(v).is_err()) => {
                violations.push(format!("{here}: {value} does not fit int32"));
            }
            _ => {}
        }
    }
    if let Value::Array(items) = value
        && number("maxItems").is_some_and(|max| items.len() as f64 > max)
    {
        violations.push(format!("{here}: more than maxItems entries"));
    }
}

fn check_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    is_root: bool,
    violations: &mut Vec<Violation>,
) {
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for name in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(name) {
                violations.push(format!(
                    "{}: required field '{name}' is missing",
                    if path.is_empty() { "<root>" } else { path }
                ));
            }
        }
    }
    let preserve_unknown = flag(schema, "x-kubernetes-preserve-unknown-fields");
    let properties = schema.get("properties").and_then(Value::as_object);
    let additional = schema.get("additionalProperties");
    for (name, child) in map {
        let child_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        // The API server validates apiVersion, kind and metadata itself, whatever the schema says.
        if is_root && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match (properties.and_then(|p| p.get(name)), additional) {
            (Some(property), _) => check(property, child, &child_path, false, violations),
            (None, Some(additional)) if additional.is_object() => {
                check(additional, child, &child_path, false, violations)
            }
            (None, Some(Value::Bool(true))) => {}
            (None, _) if preserve_unknown => {}
            (None, _) => violations.push(format!(
                "{child_path}: unknown field, the API server would prune it"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> StructuralSchema {
        let crd = json!({
            "metadata": {"name": "things.example.com"},
            "spec": {"versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {
                    "spec": {
                        "type": "object",
                        "required": ["size"],
                        "properties": {
                            "size": {"x-kubernetes-int-or-string": true, "pattern": "^[0-9]+(Gi|Mi)?$"},
                            "mode": {"type": "string", "enum": ["A", "B"], "default": "A"},
                            "count": {"type": "integer", "format": "int32", "maximum": 10},
                            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                        }
                    }
                }
            }}}]}
        });
        StructuralSchema::from_crd_value(&crd, "v1").unwrap()
    }

    #[test]
    fn accepts_a_valid_object_and_applies_defaults() {
        let mut object = json!({"apiVersion": "x", "kind": "Thing", "metadata": {"name": "a"},
            "spec": {"size": "10Gi", "labels": {"a": "b"}, "free": {"anything": 1}}});
        schema().apply_defaults(&mut object);
        assert_eq!(object.pointer("/spec/mode"), Some(&json!("A")));
        assert_eq!(schema().violations(&object), Vec::<String>::new());
    }

    #[test]
    fn reports_every_kind_of_violation() {
        let object =
            json!({"spec": {"size": "ten", "mode": "C", "count": 11, "labels": {"a": 1}, "typo": true}});
        let violations = schema().violations(&object);
        let joined = violations.join("\n");
        for expected in [
            "spec.size: 'ten' does not match",
            "spec.mode: \"C\" is not one of",
            "spec.count: 11 is above",
            "spec.labels.a: expected type string",
            "spec.typo: unknown field",
        ] {
            assert!(joined.contains(expected), "missing {expected:?} in:\n{joined}");
        }
        let missing = schema().violations(&json!({"spec": {}}));
        assert_eq!(missing, vec!["spec: required field 'size' is missing".to_owned()]);
    }
}
