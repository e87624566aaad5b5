//! Completes VirtualMachineInstanceMigrations, the part of a live migration that needs nodes.
//!
//! Role: `migrate` (or any client) creates a `VirtualMachineInstanceMigration`; in KubeVirt,
//! virt-controller schedules a target pod and virt-handlers move the guest. There is one simulated
//! node and no pods, so this loop (the only place that completes migrations in the simulator) marks
//! each new migration of a Running VMI `Succeeded` at once, with the phase transition timestamps
//! KubeVirt records, and writes the VMI's `status.migrationState` (completed, same simulated node as
//! source and target). A migration of a missing or not Running VMI becomes `Failed`.
//!
//! Contract: [`run`] polls every second until its future is dropped; it touches only migrations
//! without a final phase.

use std::time::Duration;

use serde_json::{Value, json};

use crate::lifecycle::{phase, vmi_path};
use crate::status;

/// How often migrations are looked at.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Completes migrations until dropped.
pub async fn run(client: kube::Client) {
    loop {
        if let Err(error) = complete_pending(&client).await {
            tracing::warn!(%error, "completing migrations failed; retrying");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

async fn complete_pending(client: &kube::Client) -> Result<(), status::ApiFailure> {
    let list = status::get(client, "/apis/kubevirt.io/v1/virtualmachineinstancemigrations")
        .await?
        .unwrap_or_default();
    let migrations = list["items"].as_array().cloned().unwrap_or_default();
    for migration in migrations {
        let current = status::text(&migration, "/status/phase");
        if matches!(current, "Succeeded" | "Failed") {
            continue;
        }
        if let Err(error) = complete(client, &migration).await {
            tracing::warn!(%error, "completing a migration failed");
        }
    }
    Ok(())
}

async fn complete(client: &kube::Client, migration: &Value) -> Result<(), status::ApiFailure> {
    let namespace = status::text(migration, "/metadata/namespace");
    let name = status::text(migration, "/metadata/name");
    let migration_uid = migration.pointer("/metadata/uid").cloned().unwrap_or(Value::Null);
    let vmi_name = status::text(migration, "/spec/vmiName");
    let migration_path =
        format!("/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstancemigrations/{name}/status");
    let now = paddock_kubevirt_controllers::now();
    let vmi = status::get(client, &vmi_path(namespace, vmi_name)).await?;
    let Some(vmi) = vmi.filter(|vmi| phase(vmi) == "Running") else {
        let patch = json!({"status": {
            "phase": "Failed",
            "phaseTransitionTimestamps": [
                {"phase": "Pending", "phaseTransitionTimestamp": now},
                {"phase": "Failed", "phaseTransitionTimestamp": now},
            ],
        }});
        status::merge_patch(client, &migration_path, &patch).await?;
        tracing::info!(
            namespace,
            name,
            vmi_name,
            "migration failed: the vmi is not running"
        );
        return Ok(());
    };
    let node = vmi
        .pointer("/status/nodeName")
        .and_then(Value::as_str)
        .unwrap_or(paddock_kubevirt_controllers::SIMULATED_NODE_NAME);
    let migration_state = json!({
        "migrationUid": migration_uid,
        "sourceNode": node,
        "targetNode": node,
        "targetNodeAddress": "127.0.0.1",
        "startTimestamp": now,
        "endTimestamp": now,
        "completed": true,
        "failed": false,
        "mode": "PreCopy",
    });
    status::merge_patch(
        client,
        &vmi_path(namespace, vmi_name),
        &json!({"status": {"migrationState": migration_state, "migrationMethod": "LiveMigration"}}),
    )
    .await?;
    let transitions: Vec<Value> = [
        "Pending",
        "Scheduling",
        "Scheduled",
        "PreparingTarget",
        "TargetReady",
        "Running",
        "Succeeded",
    ]
    .iter()
    .map(|phase| json!({"phase": phase, "phaseTransitionTimestamp": now}))
    .collect();
    let patch = json!({"status": {
        "phase": "Succeeded",
        "phaseTransitionTimestamps": transitions,
        "migrationState": migration_state,
    }});
    status::merge_patch(client, &migration_path, &patch).await?;
    tracing::info!(namespace, name, vmi_name, "migration succeeded");
    Ok(())
}
