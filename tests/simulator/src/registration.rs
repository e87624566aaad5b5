//! Registers the simulator as the aggregated server of `subresources.kubevirt.io/v1` and
//! `upload.cdi.kubevirt.io/v1beta1`, as virt-operator and cdi-operator register virt-api and
//! cdi-apiserver.
//!
//! Role: kube-apiserver must reach a server listening on 127.0.0.1. `--enable-aggregator-routing` is
//! off in the test cluster, so the apiserver resolves an APIService's Service by its spec alone; a
//! Service of `type: ExternalName` with `externalName: localhost` makes it dial `localhost:<port>`,
//! verifying the TLS server name `<service>.<namespace>.svc` against the APIService `caBundle`
//! (see `tests/cluster/README.md`). Endpoints, which cannot hold loopback addresses, are not needed.
//!
//! Contract: [`register`] server-side-applies the namespace, the Service and both APIServices (field
//! manager `kubevirt-simulator`), so it can run again after a restart with a new port and CA.

use serde_json::{Value, json};

use crate::status::ApiFailure;

/// The field manager of everything the simulator applies.
const FIELD_MANAGER: &str = "kubevirt-simulator";

/// Where the aggregated APIs point.
#[derive(Debug, Clone)]
pub struct ServiceReference {
    /// The namespace of the Service (`kubevirt`, as in a real installation).
    pub namespace: String,
    /// The Service's name (`virt-api`).
    pub name: String,
    /// The port the simulator listens on (127.0.0.1).
    pub port: u16,
}

impl ServiceReference {
    /// The DNS name the apiserver verifies the serving certificate against.
    pub fn server_name(&self) -> String {
        format!("{}.{}.svc", self.name, self.namespace)
    }
}

/// The APIServices the simulator serves: (name, group, version).
pub const API_SERVICES: [(&str, &str, &str); 2] = [
    ("v1.subresources.kubevirt.io", "subresources.kubevirt.io", "v1"),
    (
        "v1beta1.upload.cdi.kubevirt.io",
        "upload.cdi.kubevirt.io",
        "v1beta1",
    ),
];

/// Applies the namespace, Service and APIServices pointing at `service` with `ca_pem` as `caBundle`.
pub async fn register(
    client: &kube::Client,
    service: &ServiceReference,
    ca_pem: &str,
) -> Result<(), ApiFailure> {
    use base64::Engine as _;
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    apply(
        client,
        &format!("/api/v1/namespaces/{}", service.namespace),
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": service.namespace}}),
    )
    .await?;
    apply(
        client,
        &format!(
            "/api/v1/namespaces/{}/services/{}",
            service.namespace, service.name
        ),
        &json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": service.name, "namespace": service.namespace},
            "spec": {
                "type": "ExternalName",
                "externalName": "localhost",
                "ports": [{"name": "https", "port": service.port, "protocol": "TCP"}],
            },
        }),
    )
    .await?;
    for (name, group, version) in API_SERVICES {
        apply(
            client,
            &format!("/apis/apiregistration.k8s.io/v1/apiservices/{name}"),
            &json!({
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": name},
                "spec": {
                    "group": group,
                    "version": version,
                    "groupPriorityMinimum": 1000,
                    "versionPriority": 15,
                    "caBundle": ca_bundle,
                    "service": {"name": service.name, "namespace": service.namespace, "port": service.port},
                },
            }),
        )
        .await?;
    }
    Ok(())
}

async fn apply(client: &kube::Client, path: &str, object: &Value) -> Result<Value, ApiFailure> {
    let uri = format!("{path}?fieldManager={FIELD_MANAGER}&force=true");
    let body =
        serde_json::to_vec(object).map_err(|error| ApiFailure::Other(kube::Error::SerdeError(error)))?;
    let request = axum::http::Request::patch(uri)
        .header("Content-Type", "application/apply-patch+yaml")
        .body(body)
        .map_err(|error| ApiFailure::Other(kube::Error::HttpError(error)))?;
    client
        .request::<Value>(request)
        .await
        .map_err(|error| match error {
            kube::Error::Api(status) => ApiFailure::Status(status),
            other => ApiFailure::Other(other),
        })
}
