//! Decoding an AdmissionReview, running one webhook on it and encoding the answer.
//!
//! Contract: [`review`] is synchronous and pure apart from reading the [`ReviewContext`]. Any body is
//! either answered with an AdmissionReview (allowed, patched or denied, the request's `uid` echoed) or
//! refused as [`Malformed`] (the server answers 400); nothing panics and nothing recurses without
//! bound (serde_json stops at 128 levels of nesting). A request for a kind a webhook does not handle
//! (a misrouted configuration) is allowed unchanged.

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use crate::HostVolumePolicy;
use crate::configuration::Webhook;
use crate::zarf::ZarfState;
use crate::{mutate, validate};

/// What the handlers know besides the request.
#[derive(Clone, Debug, Default)]
pub struct ReviewContext {
    /// Whether Zarf is installed.
    pub zarf: ZarfState,
    /// Where the host-volume policy applies (for the denial message).
    pub host_volume_policy: HostVolumePolicy,
}

/// How a request was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted unchanged.
    Allowed,
    /// Admitted with a JSON patch.
    Patched,
    /// Denied.
    Denied,
}

impl Verdict {
    /// The metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Patched => "patched",
            Self::Denied => "denied",
        }
    }
}

/// A body that is not an AdmissionReview request.
#[derive(Debug, thiserror::Error)]
#[error("the request body is not an admission.k8s.io/v1 AdmissionReview request: {0}")]
pub struct Malformed(String);

/// The encoded AdmissionReview answer and its verdict.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The AdmissionReview JSON.
    pub body: Vec<u8>,
    /// How the request was answered.
    pub verdict: Verdict,
}

fn to_value(object: Option<&DynamicObject>) -> Result<Option<Value>, Malformed> {
    object
        .map(|object| serde_json::to_value(object).map_err(|error| Malformed(error.to_string())))
        .transpose()
}

/// Answers `body` for `webhook`.
pub fn review(webhook: Webhook, body: &[u8], context: &ReviewContext) -> Result<Answer, Malformed> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(|error| Malformed(error.to_string()))?;
    // The answer echoes these, so they must be exactly what the API server sends.
    if review.types.api_version != "admission.k8s.io/v1" || review.types.kind != "AdmissionReview" {
        return Err(Malformed(format!(
            "apiVersion {:?} and kind {:?} are not admission.k8s.io/v1 AdmissionReview",
            review.types.api_version, review.types.kind
        )));
    }
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| Malformed("it has no request".to_owned()))?;
    let response = AdmissionResponse::from(&request);
    let object = to_value(request.object.as_ref())?;
    let old = to_value(request.old_object.as_ref())?;
    let kind = request.kind.kind.as_str();
    let (response, verdict) = match (webhook, object) {
        (_, None) => (response, Verdict::Allowed),
        (Webhook::AppDefaults, Some(object)) if kind == "VirtualMachineApp" => {
            patched(response, object, |mutated| {
                mutate::app_defaults(mutated, old.as_ref())
            })?
        }
        (Webhook::DataVolumeRegistry, Some(object)) if kind == "DataVolume" => match context.zarf.get() {
            Some(facts) => patched(response, object, |mutated| {
                mutate::data_volume(mutated, facts.registry_address.as_deref());
            })?,
            None => (response, Verdict::Allowed),
        },
        (Webhook::VirtualMachineRegistry, Some(object)) if kind == "VirtualMachine" => {
            match context.zarf.get() {
                Some(facts) => patched(response, object, |mutated| {
                    mutate::virtual_machine(mutated, facts.registry_address.as_deref());
                })?,
                None => (response, Verdict::Allowed),
            }
        }
        (Webhook::AppValidation, Some(object)) if kind == "VirtualMachineApp" => {
            let old = if request.operation == Operation::Update {
                old.as_ref()
            } else {
                None
            };
            verdict(response, validate::app(&object, old))
        }
        (Webhook::HostVolumes, Some(object)) => {
            let namespace = request.namespace.as_deref().unwrap_or("");
            let scope = match context.host_volume_policy {
                HostVolumePolicy::LabelledNamespaces => format!(
                    "in namespace {namespace} (labelled {}={}; ask an administrator to remove the label if the VM must use the node's disk)",
                    crate::HOST_VOLUMES_LABEL,
                    crate::DENY
                ),
                HostVolumePolicy::AllNamespaces | HostVolumePolicy::Off => {
                    "in this cluster (paddock's host-volume policy)".to_owned()
                }
            };
            verdict(
                response,
                validate::host_volumes(kind, &object, old.as_ref(), &scope),
            )
        }
        _ => (response, Verdict::Allowed),
    };
    let body = serde_json::to_vec(&response.into_review()).map_err(|error| Malformed(error.to_string()))?;
    Ok(Answer { body, verdict })
}

fn verdict(response: AdmissionResponse, result: Result<(), String>) -> (AdmissionResponse, Verdict) {
    match result {
        Ok(()) => (response, Verdict::Allowed),
        Err(message) => (response.deny(message), Verdict::Denied),
    }
}

fn patched(
    response: AdmissionResponse,
    object: Value,
    mutation: impl FnOnce(&mut Value),
) -> Result<(AdmissionResponse, Verdict), Malformed> {
    let mut mutated = object.clone();
    mutation(&mut mutated);
    if mutated == object {
        return Ok((response, Verdict::Allowed));
    }
    let patch = json_patch::diff(&object, &mutated);
    let response = response
        .with_patch(patch)
        .map_err(|error| Malformed(error.to_string()))?;
    Ok((response, Verdict::Patched))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::{Duration, Instant};

    use serde_json::json;

    use super::*;
    use crate::zarf::ZarfFacts;

    fn request(kind: (&str, &str, &str), resource: &str, object: Value) -> Value {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": kind.0, "version": kind.1, "kind": kind.2},
                "resource": {"group": kind.0, "version": kind.1, "resource": resource},
                "name": "debian",
                "namespace": "default",
                "operation": "CREATE",
                "userInfo": {"username": "admin", "groups": ["system:masters"]},
                "object": object,
                "oldObject": null,
                "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        })
    }

    fn app_request(spec: Value) -> Value {
        request(
            ("paddock.dev", "v1alpha1", "VirtualMachineApp"),
            "virtualmachineapps",
            json!({"apiVersion": "paddock.dev/v1alpha1", "kind": "VirtualMachineApp",
                   "metadata": {"name": "debian", "namespace": "default"}, "spec": spec}),
        )
    }

    fn data_volume_request() -> Value {
        request(
            ("cdi.kubevirt.io", "v1beta1", "DataVolume"),
            "datavolumes",
            json!({"apiVersion": "cdi.kubevirt.io/v1beta1", "kind": "DataVolume",
                   "metadata": {"name": "disk", "namespace": "default"},
                   "spec": {"source": {"registry": {"url": "docker://quay.io/containerdisks/debian:12"}},
                            "storage": {"resources": {"requests": {"storage": "10Gi"}}}}}),
        )
    }

    fn answer(webhook: Webhook, body: &Value, context: &ReviewContext) -> (Value, Verdict) {
        let answer = review(webhook, &serde_json::to_vec(body).unwrap(), context).unwrap();
        (serde_json::from_slice(&answer.body).unwrap(), answer.verdict)
    }

    #[test]
    fn patches_are_json_patches_that_apply() {
        let body = app_request(
            json!({"image": {"containerDisk": "quay.io/containerdisks/debian:12"}, "disk": {"size": "10Gi"}}),
        );
        let (review, verdict) = answer(Webhook::AppDefaults, &body, &ReviewContext::default());
        assert_eq!(verdict, Verdict::Patched);
        let response = &review["response"];
        assert_eq!(response["uid"], body["request"]["uid"]);
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        // kube-core encodes the patch bytes as a JSON array of numbers, which the API server accepts.
        let patch_bytes: Vec<u8> = serde_json::from_value(response["patch"].clone()).unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&patch_bytes).unwrap();
        let mut object = body["request"]["object"].clone();
        json_patch::patch(&mut object, &patch).unwrap();
        assert_eq!(object["spec"]["displayName"], "debian");
        assert_eq!(object["spec"]["resources"]["memory"], "1Gi");
    }

    #[test]
    fn invalid_apps_are_denied() {
        let body = app_request(json!({"image": {"containerDisk": "quay.io/containerdisks/debian:12"}}));
        let (review, verdict) = answer(Webhook::AppValidation, &body, &ReviewContext::default());
        assert_eq!(verdict, Verdict::Denied);
        assert_eq!(review["response"]["allowed"], false);
        assert!(
            review["response"]["status"]["message"]
                .as_str()
                .unwrap()
                .contains("spec.disk.size")
        );
    }

    #[test]
    fn data_volumes_change_only_with_zarf() {
        let body = data_volume_request();
        let (_, verdict) = answer(Webhook::DataVolumeRegistry, &body, &ReviewContext::default());
        assert_eq!(verdict, Verdict::Allowed);
        let with_zarf = ReviewContext {
            zarf: ZarfState::fixed(Some(ZarfFacts::default())),
            ..ReviewContext::default()
        };
        let (_, verdict) = answer(Webhook::DataVolumeRegistry, &body, &with_zarf);
        assert_eq!(verdict, Verdict::Patched);
    }

    /// A tiny deterministic generator (xorshift64*), so failures reproduce from the printed seed.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound.max(1) as u64) as usize
        }
    }

    const INTERESTING: &[&[u8]] = &[
        b"null",
        b"{}",
        b"[]",
        b"\"\"",
        b"-0",
        b"1e999",
        b"18446744073709551616",
        b"true",
        b"\"\\ud800\"",
        b"{\"request\":null}",
        b"\"CREATE\"",
        b"\"DELETE\"",
        b"\"VirtualMachineApp\"",
        b"{\"spec\":{\"image\":{\"containerDisk\":\"\"}}}",
        b"\xff\xfe",
        b"\0",
    ];

    /// Mutates a valid body: flips, truncations, splices of JSON fragments, deletions, duplications.
    fn mutate(random: &mut Random, seed: &[u8]) -> Vec<u8> {
        let mut body = seed.to_vec();
        for _ in 0..=random.below(4) {
            let position = random.below(body.len() + 1);
            match random.below(7) {
                0 => {
                    if let Some(byte) = body.get_mut(position) {
                        *byte ^= 1 << random.below(8);
                    }
                }
                1 => body.truncate(position),
                2 => {
                    let fragment = INTERESTING[random.below(INTERESTING.len())];
                    body.splice(position..position, fragment.iter().copied());
                }
                3 => {
                    let end = (position + random.below(64)).min(body.len());
                    body.drain(position..end);
                }
                4 => {
                    let end = (position + random.below(256)).min(body.len());
                    let copy = body[position..end].to_vec();
                    body.splice(position..position, copy);
                }
                5 => {
                    // Replace a value after a colon with an interesting fragment (type confusion).
                    if let Some(colon) = body[position.min(body.len())..]
                        .iter()
                        .position(|byte| *byte == b':')
                    {
                        let start = position + colon + 1;
                        let end = body[start..]
                            .iter()
                            .position(|byte| matches!(byte, b',' | b'}'))
                            .map_or(body.len(), |offset| start + offset);
                        let fragment = INTERESTING[random.below(INTERESTING.len())];
                        body.splice(start..end, fragment.iter().copied());
                    }
                }
                _ => {
                    let length = random.below(32);
                    let bytes: Vec<u8> = (0..length).map(|_| random.next() as u8).collect();
                    body.splice(position..position, bytes);
                }
            }
        }
        body
    }

    /// Replaces or removes one node of a valid body's JSON tree: valid JSON, wrong shapes and types.
    fn mutate_structure(random: &mut Random, seed: &[u8]) -> Vec<u8> {
        let mut value: Value = serde_json::from_slice(seed).unwrap();
        let replacements = [
            Value::Null,
            json!(0),
            json!(-1),
            json!(1.5e300),
            json!(""),
            json!("x"),
            json!({}),
            json!([]),
            json!([{"name": "d", "hostDisk": null}]),
            json!({"registry": {"url": 7}}),
            json!({"containerDisk": "a b", "http": {"url": "ftp://x"}}),
            json!("docker://"),
        ];
        let mut pointer = String::new();
        let mut node = &value;
        for _ in 0..random.below(8) {
            let next = match node {
                Value::Object(map) if !map.is_empty() => map
                    .iter()
                    .nth(random.below(map.len()))
                    .map(|(key, value)| (key.replace('~', "~0").replace('/', "~1"), value)),
                Value::Array(items) if !items.is_empty() => {
                    let index = random.below(items.len());
                    items.get(index).map(|value| (index.to_string(), value))
                }
                _ => None,
            };
            let Some((token, next)) = next else { break };
            pointer.push('/');
            pointer.push_str(&token);
            node = next;
        }
        let remove = random.below(4) == 0;
        let replacement = replacements[random.below(replacements.len())].clone();
        if let Some(node) = value.pointer_mut(&pointer) {
            match node {
                Value::Object(map) if remove && !map.is_empty() => {
                    let index = random.below(map.len());
                    if let Some(key) = map.keys().nth(index).cloned() {
                        map.remove(&key);
                    }
                }
                _ => *node = replacement,
            }
        }
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn malformed_reviews_never_panic_or_hang() {
        let seeds: Vec<Vec<u8>> = [
            app_request(json!({"image": {"containerDisk": "quay.io/containerdisks/debian:12"}, "disk": {"size": "10Gi"},
                               "resources": {"cpu": 2}, "snapshots": {"schedule": "0 3 * * *", "keep": 3},
                               "cloudInit": {"sshKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA alice@laptop"]}})),
            data_volume_request(),
            request(("kubevirt.io", "v1", "VirtualMachine"), "virtualmachines",
                json!({"metadata": {"name": "vm"}, "spec": {"dataVolumeTemplates": [{"spec": {"source": {"registry": {"url": "docker://a.b/c:1"}}}}],
                       "template": {"spec": {"volumes": [{"name": "d", "hostDisk": {"path": "/x"}}]}}}})),
        ]
        .iter()
        .map(|seed| serde_json::to_vec(seed).unwrap())
        .collect();
        let context = ReviewContext {
            zarf: ZarfState::fixed(Some(ZarfFacts {
                registry_address: Some("127.0.0.1:31999".to_owned()),
            })),
            ..ReviewContext::default()
        };
        let seed = std::env::var("PADDOCK_FUZZ_SEED")
            .ok()
            .and_then(|seed| seed.parse().ok())
            .unwrap_or(0x5eed_0fad_0155_1000_u64);
        let iterations: usize = std::env::var("PADDOCK_FUZZ_ITERATIONS")
            .ok()
            .and_then(|iterations| iterations.parse().ok())
            .unwrap_or(20_000);
        let mut random = Random(seed);
        let mut outcomes = [0usize; 2];
        let mut slowest = Duration::ZERO;
        for iteration in 0..iterations {
            let body = if iteration.is_multiple_of(50) {
                // Pure noise and pathological nesting now and then.
                match random.below(3) {
                    0 => (0..random.below(4096)).map(|_| random.next() as u8).collect(),
                    1 => [vec![b'['; 100_000], vec![b']'; 100_000]].concat(),
                    _ => format!("{{\"request\":{}}}", "{\"a\":".repeat(10_000)).into_bytes(),
                }
            } else if iteration.is_multiple_of(2) {
                let seed_index = random.below(seeds.len());
                mutate_structure(&mut random, &seeds[seed_index])
            } else {
                let seed_index = random.below(seeds.len());
                mutate(&mut random, &seeds[seed_index])
            };
            let webhook = Webhook::ALL[random.below(Webhook::ALL.len())];
            let started = Instant::now();
            let result = review(webhook, &body, &context);
            slowest = slowest.max(started.elapsed());
            match result {
                Ok(answer) => {
                    let parsed: Value = serde_json::from_slice(&answer.body).unwrap();
                    assert_eq!(
                        parsed["kind"], "AdmissionReview",
                        "seed {seed:#x} iteration {iteration}"
                    );
                    outcomes[0] += 1;
                }
                Err(_) => outcomes[1] += 1,
            }
        }
        eprintln!(
            "fuzzed {iterations} bodies (seed {seed:#x}): {} answered, {} malformed, slowest {slowest:?}",
            outcomes[0], outcomes[1]
        );
        assert!(
            outcomes[0] > iterations / 20,
            "the mutator should keep a share of bodies valid"
        );
        assert!(
            outcomes[1] > iterations / 20,
            "the mutator should break a share of bodies"
        );
        assert!(slowest < Duration::from_secs(1), "one body took {slowest:?}");
    }
}
