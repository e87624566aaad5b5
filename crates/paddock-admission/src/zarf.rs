//! Whether Zarf is installed, from its `zarf-state` Secret, polled in the background.
//!
//! Contract: [`ZarfDetector::run`] reads one named Secret every [`ZarfOptions::poll_interval`] and
//! publishes what it found in a [`ZarfState`] that admission reads without waiting. Polling one
//! object by name needs only `get` on that Secret (RBAC `resourceNames: [zarf-state]`), holds one
//! small value in memory, and Zarf is installed once per cluster, so a delay of one interval is
//! harmless; a watch would need `list`/`watch` on Secrets in the Zarf namespace. When a read fails the
//! last known state is kept (a transient API error must not flip DataVolume mutation off).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

/// How Zarf is detected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZarfOptions {
    /// Zarf's namespace; default `zarf`.
    pub namespace: String,
    /// The Secret whose existence means Zarf is installed; default `zarf-state`.
    pub secret_name: String,
    /// How often the Secret is read; default 10 seconds.
    pub poll_interval: Duration,
}

impl Default for ZarfOptions {
    fn default() -> Self {
        ZarfOptions {
            namespace: "zarf".to_owned(),
            secret_name: "zarf-state".to_owned(),
            poll_interval: Duration::from_secs(10),
        }
    }
}

/// What is known about Zarf in the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZarfFacts {
    /// The Zarf registry's address (`registryInfo.address` in the state), when the state names it.
    pub registry_address: Option<String>,
}

/// The latest detection result, shared between the detector and the request handlers.
#[derive(Clone, Debug, Default)]
pub struct ZarfState {
    facts: Arc<RwLock<Option<ZarfFacts>>>,
}

impl ZarfState {
    /// A state that says Zarf is installed (`Some`) or not (`None`), for tests and benchmarks.
    pub fn fixed(facts: Option<ZarfFacts>) -> ZarfState {
        ZarfState {
            facts: Arc::new(RwLock::new(facts)),
        }
    }

    /// `Some` while Zarf is installed.
    pub fn get(&self) -> Option<ZarfFacts> {
        match self.facts.read() {
            Ok(facts) => facts.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn set(&self, facts: Option<ZarfFacts>) {
        match self.facts.write() {
            Ok(mut current) => *current = facts,
            Err(poisoned) => *poisoned.into_inner() = facts,
        }
    }
}

/// Reads Zarf's `state` JSON (`data.state` of the Secret); an unreadable state still means Zarf is
/// installed, just without a known registry address.
pub fn facts_from_secret(secret: &Secret) -> ZarfFacts {
    let registry_address = secret
        .data
        .as_ref()
        .and_then(|data| data.get("state"))
        .and_then(|state| serde_json::from_slice::<serde_json::Value>(&state.0).ok())
        .and_then(|state| {
            state
                .pointer("/registryInfo/address")
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        })
        .filter(|address| !address.is_empty());
    ZarfFacts { registry_address }
}

/// Polls the `zarf-state` Secret.
#[derive(Clone)]
pub struct ZarfDetector {
    api: Api<Secret>,
    options: ZarfOptions,
    state: ZarfState,
}

impl ZarfDetector {
    /// A detector publishing into `state`.
    pub fn new(client: kube::Client, options: ZarfOptions, state: ZarfState) -> ZarfDetector {
        ZarfDetector {
            api: Api::namespaced(client, &options.namespace),
            options,
            state,
        }
    }

    /// Reads the Secret once and publishes the result; errors keep the previous state.
    pub async fn poll_once(&self) {
        match self.api.get_opt(&self.options.secret_name).await {
            Ok(secret) => {
                let facts = secret.as_ref().map(facts_from_secret);
                if facts != self.state.get() {
                    tracing::info!(installed = facts.is_some(), registry = ?facts.as_ref().and_then(|facts| facts.registry_address.as_deref()), "zarf detection changed");
                }
                self.state.set(facts);
            }
            Err(error) => tracing::warn!(
                %error,
                namespace = %self.options.namespace,
                secret = %self.options.secret_name,
                "cannot read the zarf state secret; keeping the last known state"
            ),
        }
    }

    /// Polls forever (until the task is dropped).
    pub async fn run(self) {
        let mut interval = tokio::time::interval(self.options.poll_interval);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            self.poll_once().await;
        }
    }
}
