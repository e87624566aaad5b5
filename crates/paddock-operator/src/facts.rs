//! Cluster facts discovery: whether Zarf is installed (and where its registry is), whether the
//! BafflesApplication CRD exists, and the console gateway URL from the operator's options.
//!
//! Contract: [`discover`] asks the API server once; [`run`] asks again every interval and publishes a
//! new [`ClusterFacts`] on the watch channel only when something changed, so controllers can
//! reconcile everything exactly when a fact changes (Baffles installed later, Zarf initialised later).
//! A fact that cannot be read (forbidden, API server unreachable) keeps its previous value and is
//! logged: guessing "not installed" would delete or skip objects on a transient error.

use std::time::Duration;

use k8s_openapi::{
    api::core::v1::Secret, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{Api, Client};
use paddock_api::builders::{ClusterFacts, ZarfRegistry};
use tokio::sync::watch;

/// The namespace and name of the Secret Zarf keeps its state in.
pub const ZARF_STATE_SECRET: (&str, &str) = ("zarf", "zarf-state");
/// The name of the BafflesApplication CRD.
pub const BAFFLES_CRD: &str = "bafflesapplications.app.baffles.dev";

/// Reads the Zarf registry address out of the `zarf-state` Secret's `state` key (Zarf's JSON state,
/// `registryInfo.address`). `None` when the Secret carries no readable address.
pub fn zarf_registry(secret: &Secret) -> Option<ZarfRegistry> {
    let state = secret.data.as_ref()?.get("state")?;
    let state: serde_json::Value = serde_json::from_slice(&state.0).ok()?;
    let address = state.pointer("/registryInfo/address")?.as_str()?;
    Some(ZarfRegistry {
        address: address.to_owned(),
    })
}

/// Asks the API server for the facts; a fact that cannot be read keeps its value in `previous`.
pub async fn discover(client: &Client, gateway_url: &str, previous: &ClusterFacts) -> ClusterFacts {
    let mut facts = previous.clone();
    facts.console_gateway_url = gateway_url.to_owned();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ZARF_STATE_SECRET.0);
    match secrets.get_opt(ZARF_STATE_SECRET.1).await {
        Ok(secret) => {
            // A zarf-state without a readable registry still means Zarf is there; its registry is
            // then unknown and DataVolumes are left as they are.
            facts.zarf = secret
                .as_ref()
                .map(|secret| zarf_registry(secret).unwrap_or_default());
        }
        Err(error) => {
            tracing::warn!(%error, "cannot read the zarf-state secret; keeping the last known Zarf state")
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt(BAFFLES_CRD).await {
        Ok(crd) => facts.baffles_installed = crd.is_some(),
        Err(error) => {
            tracing::warn!(%error, "cannot read the BafflesApplication CRD; keeping the last known Baffles state")
        }
    }
    facts
}

/// Rediscovers every `interval` and publishes changes until the receiver side is gone.
pub async fn run(
    client: Client,
    gateway_url: String,
    interval: Duration,
    sender: watch::Sender<ClusterFacts>,
) {
    loop {
        tokio::time::sleep(interval).await;
        let previous = sender.borrow().clone();
        let facts = discover(&client, &gateway_url, &previous).await;
        if facts != previous {
            tracing::info!(
                zarf = facts.zarf.is_some(),
                baffles = facts.baffles_installed,
                "cluster facts changed; reconciling every app"
            );
            if sender.send(facts).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn reads_the_registry_address_from_zarf_state() {
        let state = br#"{"registryInfo": {"address": "127.0.0.1:31999", "nodePort": 31999}}"#;
        let secret = Secret {
            data: Some([("state".to_owned(), ByteString(state.to_vec()))].into()),
            ..Secret::default()
        };
        assert_eq!(zarf_registry(&secret).unwrap().address, "127.0.0.1:31999");
        assert_eq!(zarf_registry(&Secret::default()), None);
    }
}
