//! Whether a child must be applied: the desired object against the copy the reflector holds.
//!
//! Role: a reconcile of an app nobody changed must cost no writes. Every desired child is stamped
//! with [`DESIRED_HASH_ANNOTATION`], a hash of the object as built (before stamping), and applied
//! with that annotation. The next reconcile builds the desired object again and [`decide`]s, from
//! the cached child alone:
//!
//! - no cached child (never created, deleted, or not yet seen by the watch) → apply;
//! - the cached child's hash differs → the desired object changed (a spec edit, new cluster facts,
//!   a new operator version building differently, or a field paddock no longer sets, which only the
//!   hash reveals) → apply;
//! - a field paddock sets has another value in the cached child, or is missing → someone else
//!   changed it (drift) → apply, which takes it back (the apply forces ownership);
//! - otherwise skip: a server-side apply would change nothing.
//!
//! Contract: [`decide`] is pure and conservative: anything it cannot prove equal is applied. "Equal"
//! is containment ([`first_difference`]): every field of the desired object must be in the cached
//! one with the same value; fields others add (API server defaults, KubeVirt's mutations, other
//! managers' labels) are ignored, as server-side apply ignores them; lists must have the same length
//! and contain each other element by element (an entry someone appended to a list paddock sets costs
//! a no-op apply per reconcile, never a wrong skip). A stale cache cannot make a skip wrong for long:
//! the watch event that updates the cache triggers another reconcile of the owner.

use std::fmt;

use kube::Resource;
use serde::Serialize;
use serde_json::Value;

/// The annotation holding the hash of the desired object paddock last applied to a child.
pub const DESIRED_HASH_ANNOTATION: &str = "paddock.dev/desired-hash";

/// Why a child is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The child is not in the cache.
    Missing,
    /// The child was applied from another desired object (its hash annotation differs).
    DesiredChanged,
    /// A field paddock sets differs in the child; the JSON pointer names it.
    Drifted(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Missing => formatter.write_str("missing"),
            Reason::DesiredChanged => formatter.write_str("desired object changed"),
            Reason::Drifted(pointer) => write!(formatter, "drifted at {pointer}"),
        }
    }
}

/// What to do with one child.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Server-side apply it, for this reason.
    Apply(Reason),
    /// It is as desired; no request.
    Skip,
}

/// Stamps `object` with [`DESIRED_HASH_ANNOTATION`]: the hash of its JSON without that annotation.
pub fn stamp<K: Resource + Serialize>(object: &mut K) -> Result<(), serde_json::Error> {
    // Hash the object as built: a stamp from an earlier call (and the empty map it would leave) out.
    let metadata = object.meta_mut();
    if let Some(annotations) = metadata.annotations.as_mut() {
        annotations.remove(DESIRED_HASH_ANNOTATION);
        if annotations.is_empty() {
            metadata.annotations = None;
        }
    }
    let hash = desired_hash(&serde_json::to_value(&*object)?);
    object
        .meta_mut()
        .annotations
        .get_or_insert_with(Default::default)
        .insert(DESIRED_HASH_ANNOTATION.to_owned(), hash);
    Ok(())
}

/// The hash of a desired object's JSON: FNV-1a 64 over its compact serialization, 16 hex digits.
///
/// Not a security measure (anyone who can edit the child can edit the annotation; drift is caught by
/// the containment check anyway): it only has to change when the desired object changes. serde_json
/// serializes struct fields in declaration order and maps sorted (BTreeMap), so equal objects hash
/// equal across processes.
pub fn desired_hash(object: &Value) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = object
        .to_string()
        .bytes()
        .fold(OFFSET, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(PRIME));
    format!("{hash:016x}")
}

/// Decides whether `desired` (stamped, as JSON) must be applied, given the cached child (as JSON).
pub fn decide(desired: &Value, cached: Option<&Value>) -> Decision {
    let Some(cached) = cached else {
        return Decision::Apply(Reason::Missing);
    };
    let hash = |object: &Value| {
        object
            .pointer("/metadata/annotations")
            .and_then(|annotations| annotations.get(DESIRED_HASH_ANNOTATION))
            .cloned()
    };
    if hash(desired).is_none() || hash(desired) != hash(cached) {
        return Decision::Apply(Reason::DesiredChanged);
    }
    match first_difference(desired, cached, String::new()) {
        Some(pointer) => Decision::Apply(Reason::Drifted(pointer)),
        None => Decision::Skip,
    }
}

/// The JSON pointer of the first place where `actual` does not contain `desired`, or `None`.
///
/// Objects: every key of `desired` must be in `actual` and contain its value (a desired `null` also
/// matches an absent key: the API server drops nulls of non-nullable fields). Lists: the same
/// length, element by element. Everything else: equal.
pub fn first_difference(desired: &Value, actual: &Value, pointer: String) -> Option<String> {
    match (desired, actual) {
        (Value::Object(desired), Value::Object(actual)) => desired.iter().find_map(|(key, value)| {
            let here = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
            match actual.get(key) {
                Some(actual) => first_difference(value, actual, here),
                None if value.is_null() => None,
                None => Some(here),
            }
        }),
        (Value::Array(desired), Value::Array(actual)) => {
            if desired.len() != actual.len() {
                return Some(pointer);
            }
            desired
                .iter()
                .zip(actual)
                .enumerate()
                .find_map(|(index, (desired, actual))| {
                    first_difference(desired, actual, format!("{pointer}/{index}"))
                })
        }
        (desired, actual) if desired == actual => None,
        _ => Some(pointer),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use paddock_api::baffles::{BafflesApplication, BafflesApplicationSpec};
    use serde_json::json;

    fn listing(url: &str) -> BafflesApplication {
        BafflesApplication {
            metadata: kube::api::ObjectMeta {
                name: Some("web".to_owned()),
                namespace: Some("vms".to_owned()),
                labels: Some([("app.kubernetes.io/managed-by".to_owned(), "paddock".to_owned())].into()),
                ..Default::default()
            },
            spec: BafflesApplicationSpec {
                display_name: "Web".to_owned(),
                url: url.to_owned(),
                category: "vm".to_owned(),
            },
        }
    }

    fn stamped(url: &str) -> Value {
        let mut object = listing(url);
        stamp(&mut object).unwrap();
        serde_json::to_value(object).unwrap()
    }

    /// What the API server hands back after an apply: the same fields plus its own and others'.
    fn as_stored(desired: &Value) -> Value {
        let mut stored = desired.clone();
        stored["metadata"]["resourceVersion"] = json!("42");
        stored["metadata"]["uid"] = json!("0b3c");
        stored["metadata"]["labels"]["team"] = json!("ops");
        stored["metadata"]["managedFields"] = json!([{"manager": "paddock", "operation": "Apply"}]);
        stored["status"] = json!({"seen": true});
        stored
    }

    #[test]
    fn an_unchanged_child_is_skipped_whatever_others_added() {
        let desired = stamped("wss://a");
        assert_eq!(decide(&desired, Some(&as_stored(&desired))), Decision::Skip);
    }

    #[test]
    fn a_missing_child_is_applied() {
        assert_eq!(
            decide(&stamped("wss://a"), None),
            Decision::Apply(Reason::Missing)
        );
    }

    #[test]
    fn a_changed_desired_object_is_applied_even_when_only_a_field_was_removed() {
        let before = stamped("wss://a");
        let cached = as_stored(&before);
        assert_eq!(
            decide(&stamped("wss://b"), Some(&cached)),
            Decision::Apply(Reason::DesiredChanged)
        );
        // Removing a label paddock used to set leaves the cached object a superset of the desired one:
        // only the hash tells, and the apply then removes the field paddock owned.
        let mut fewer_labels = listing("wss://a");
        fewer_labels.metadata.labels = None;
        stamp(&mut fewer_labels).unwrap();
        let fewer_labels = serde_json::to_value(fewer_labels).unwrap();
        assert_eq!(
            first_difference(&fewer_labels, &cached, String::new()).as_deref(),
            Some("/metadata/annotations/paddock.dev~1desired-hash")
        );
        assert_eq!(
            decide(&fewer_labels, Some(&cached)),
            Decision::Apply(Reason::DesiredChanged)
        );
    }

    #[test]
    fn a_child_edited_by_someone_else_is_applied_back() {
        let desired = stamped("wss://a");
        let mut edited = as_stored(&desired);
        edited["spec"]["url"] = json!("wss://elsewhere");
        assert_eq!(
            decide(&desired, Some(&edited)),
            Decision::Apply(Reason::Drifted("/spec/url".to_owned()))
        );
        let mut label_removed = as_stored(&desired);
        label_removed["metadata"]["labels"]
            .as_object_mut()
            .unwrap()
            .remove("app.kubernetes.io/managed-by");
        assert_eq!(
            decide(&desired, Some(&label_removed)),
            Decision::Apply(Reason::Drifted(
                "/metadata/labels/app.kubernetes.io~1managed-by".to_owned()
            ))
        );
    }

    #[test]
    fn a_child_without_the_hash_is_applied() {
        // Created by an operator version before the hash, or by someone else under the same name.
        let desired = stamped("wss://a");
        let mut unstamped = as_stored(&desired);
        unstamped["metadata"]["annotations"] = json!({});
        assert_eq!(
            decide(&desired, Some(&unstamped)),
            Decision::Apply(Reason::DesiredChanged)
        );
    }

    #[test]
    fn lists_must_match_in_length_and_by_element() {
        let desired = json!({"spec": {"disks": [{"name": "root"}, {"name": "cloudinit"}]}});
        let defaulted =
            json!({"spec": {"disks": [{"name": "root", "bus": "virtio"}, {"name": "cloudinit"}]}});
        assert_eq!(first_difference(&desired, &defaulted, String::new()), None);
        let appended = json!({"spec": {"disks": [{"name": "root"}, {"name": "cloudinit"}, {"name": "x"}]}});
        assert_eq!(
            first_difference(&desired, &appended, String::new()).as_deref(),
            Some("/spec/disks")
        );
        let reordered = json!({"spec": {"disks": [{"name": "cloudinit"}, {"name": "root"}]}});
        assert_eq!(
            first_difference(&desired, &reordered, String::new()).as_deref(),
            Some("/spec/disks/0/name")
        );
        // A desired null matches an absent field (the API server drops it), not a set one.
        let nulls = json!({"spec": {"paused": null}});
        assert_eq!(
            first_difference(&nulls, &json!({"spec": {}}), String::new()),
            None
        );
        assert!(first_difference(&nulls, &json!({"spec": {"paused": true}}), String::new()).is_some());
    }

    #[test]
    fn stamping_is_stable_and_ignores_an_old_stamp() {
        let mut once = listing("wss://a");
        stamp(&mut once).unwrap();
        let mut twice = once.clone();
        stamp(&mut twice).unwrap();
        assert_eq!(once, twice);
        let hash = once.metadata.annotations.as_ref().unwrap()[DESIRED_HASH_ANNOTATION].clone();
        assert_eq!(hash.len(), 16);
        let mut other = listing("wss://b");
        stamp(&mut other).unwrap();
        assert_ne!(
            other.metadata.annotations.as_ref().unwrap()[DESIRED_HASH_ANNOTATION],
            hash
        );
    }
}
