//! The lifecycle subresources: start, stop, restart, migrate (VirtualMachines) and pause, unpause,
//! softreboot (VirtualMachineInstances), with virt-api's checks, patches and messages.
//!
//! Role: what `virtctl start|stop|restart|migrate|pause|unpause|soft-reboot` and paddock's operator and
//! console call. The checks, the 409 messages and the patches follow KubeVirt v1.9's
//! `pkg/virt-api/rest/lifecycle.go`:
//! - start/stop of `Always`/`Once`/`Halted` VMs flip `spec.runStrategy` (or `spec.running`) with a JSON
//!   patch that first tests the old value; `Manual`/`RerunOnFailure` VMs and restarts get
//!   `status.stateChangeRequests`, which virt-controller (the simulated one) acts on;
//! - migrate creates a `VirtualMachineInstanceMigration` (`generateName: kubevirt-migrate-vm-`), which
//!   [`crate::migration`] completes;
//! - pause/unpause/softreboot are what virt-handler does on the node: here the simulator itself sets or
//!   removes the VMI's `Paused` condition (reason `PausedByUser`, as virt-handler) and, when a QEMU
//!   was booted for the VMI's console, pauses, resumes or reboots that QEMU too.
//!
//! Contract: successful start/stop/restart/migrate answer 202 with no body; pause/unpause/softreboot
//! answer 200 with no body; failures answer a `Status` ([`StatusError`]).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::server::AppState;
use crate::status::{self, StatusError};

/// virt-api's `jsonpatchTestErr`: a failed `test` operation, answered as 409.
const JSON_PATCH_TEST_FAILED: &str = "jsonpatch test operation does not apply";
const VM_NOT_RUNNING: &str = "VM is not running";
const VMI_NOT_RUNNING: &str = "VMI is not running";

/// The path of a VirtualMachine.
pub fn vm_path(namespace: &str, name: &str) -> String {
    format!("/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachines/{name}")
}

/// The path of a VirtualMachineInstance.
pub fn vmi_path(namespace: &str, name: &str) -> String {
    format!("/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}")
}

/// `fetchVirtualMachine`: the VM or 404/500.
async fn fetch_vm(state: &AppState, namespace: &str, name: &str) -> Result<Value, StatusError> {
    match status::get(state.client(), &vm_path(namespace, name)).await {
        Ok(Some(vm)) => Ok(vm),
        Ok(None) => Err(StatusError::not_found("virtualmachine", name)),
        Err(error) => Err(StatusError::internal(format!(
            "unable to retrieve vm [{name}]: {error}"
        ))),
    }
}

/// `FetchVirtualMachineInstance`: the VMI or 404/500.
pub async fn fetch_vmi(state: &AppState, namespace: &str, name: &str) -> Result<Value, StatusError> {
    match status::get(state.client(), &vmi_path(namespace, name)).await {
        Ok(Some(vmi)) => Ok(vmi),
        Ok(None) => Err(StatusError::not_found("virtualmachineinstance", name)),
        Err(error) => Err(StatusError::internal(format!(
            "unable to retrieve vmi [{name}]: {error}"
        ))),
    }
}

/// The VMI, `None` when it does not exist, 500 on any other failure.
async fn optional_vmi(state: &AppState, namespace: &str, name: &str) -> Result<Option<Value>, StatusError> {
    status::get(state.client(), &vmi_path(namespace, name))
        .await
        .map_err(|error| StatusError::internal(error.message()))
}

/// A VMI's `status.phase` (empty when unset).
pub fn phase(vmi: &Value) -> &str {
    status::text(vmi, "/status/phase")
}

/// `vmi.IsFinal()`.
fn is_final(vmi: &Value) -> bool {
    matches!(phase(vmi), "Succeeded" | "Failed")
}

/// Whether the VMI has a condition of `kind` (any status).
pub fn has_condition(vmi: &Value, kind: &str) -> bool {
    condition_status(vmi, kind).is_some()
}

/// The status of the VMI's condition of `kind`.
pub fn condition_status<'a>(vmi: &'a Value, kind: &str) -> Option<&'a str> {
    vmi.pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|condition| condition.get("type").and_then(Value::as_str) == Some(kind))
        .map(|condition| condition.get("status").and_then(Value::as_str).unwrap_or(""))
}

/// `vm.RunStrategy()`.
fn run_strategy(vm: &Value) -> Result<String, StatusError> {
    let spec = &vm["spec"];
    let running = spec.get("running").filter(|value| !value.is_null());
    let strategy = spec.get("runStrategy").and_then(Value::as_str);
    match (running, strategy) {
        (Some(_), Some(_)) => Err(StatusError::internal(
            "running and runstrategy are mutually exclusive",
        )),
        (Some(running), None) if running.as_bool() == Some(true) => Ok("Always".to_string()),
        (Some(_), None) | (None, None) => Ok("Halted".to_string()),
        (None, Some(strategy)) => Ok(strategy.to_string()),
    }
}

/// `getRunningPatch`: flip `spec.runStrategy` (or the legacy `spec.running`), testing the old value.
fn running_patch(vm: &Value, running: bool) -> Value {
    match vm.pointer("/spec/runStrategy").filter(|value| !value.is_null()) {
        Some(current) => json!([
            {"op": "test", "path": "/spec/runStrategy", "value": current},
            {"op": "replace", "path": "/spec/runStrategy", "value": if running { "Always" } else { "Halted" }},
        ]),
        None => json!([
            {"op": "test", "path": "/spec/running", "value": vm.pointer("/spec/running").cloned().unwrap_or(Value::Null)},
            {"op": "replace", "path": "/spec/running", "value": running},
        ]),
    }
}

/// `getChangeRequestJson`: append (or, for a lone stop, replace) `status.stateChangeRequests`.
fn change_request_patch(vm: &Value, changes: Vec<Value>) -> Result<Value, StatusError> {
    let status = vm.get("status").filter(|status| !status.is_null());
    let status_is_empty =
        status.is_none_or(|status| status.as_object().is_none_or(serde_json::Map::is_empty));
    let mut operations = Vec::new();
    if status_is_empty {
        operations.push(json!({"op": "add", "path": "/status", "value": {"stateChangeRequests": changes}}));
    } else {
        let current = status
            .and_then(|status| status.get("stateChangeRequests"))
            .cloned()
            .unwrap_or(Value::Null);
        let pending = current.as_array().map_or(0, Vec::len);
        operations.push(json!({"op": "test", "path": "/status/stateChangeRequests", "value": current}));
        let lone_stop = changes.len() == 1 && changes[0]["action"] == "Stop";
        if pending == 0 {
            operations.push(json!({"op": "add", "path": "/status/stateChangeRequests", "value": changes}));
        } else if lone_stop {
            operations
                .push(json!({"op": "replace", "path": "/status/stateChangeRequests", "value": changes}));
        } else {
            return Err(StatusError::internal(
                "unable to complete request: stop/start already underway",
            ));
        }
    }
    if status.is_some_and(|status| {
        status
            .get("startFailure")
            .is_some_and(|failure| !failure.is_null())
    }) {
        operations.push(json!({"op": "remove", "path": "/status/startFailure"}));
    }
    Ok(Value::Array(operations))
}

/// Applies a JSON patch to the VM (or its status) and maps failures as virt-api does.
async fn patch_vm(
    state: &AppState,
    namespace: &str,
    name: &str,
    status_subresource: bool,
    operations: &Value,
    dry_run: bool,
) -> Result<(), StatusError> {
    let mut path = vm_path(namespace, name);
    if status_subresource {
        path.push_str("/status");
    }
    match status::json_patch(state.client(), &path, operations, dry_run).await {
        Ok(_) => Ok(()),
        Err(error) if error.message().contains(JSON_PATCH_TEST_FAILED) => {
            Err(vm_conflict(name, error.message()))
        }
        Err(error) => Err(StatusError::internal(error.message())),
    }
}

/// Decodes an optional JSON request body (`StartOptions`, `StopOptions`, ...).
fn options(body: &[u8]) -> Result<Value, StatusError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|error| {
        StatusError::bad_request(format!(
            "Can not unmarshal Request body to struct, error: {error}"
        ))
    })
}

/// Whether `dryRun` (a list, as in the KubeVirt option structs) asks for `All`.
fn dry_run(options: &Value) -> bool {
    options["dryRun"]
        .as_array()
        .is_some_and(|values| values.iter().any(|value| value == "All"))
}

/// `errors.NewConflict(v1.Resource("virtualmachine"), name, error)`.
fn vm_conflict(name: &str, error: impl std::fmt::Display) -> StatusError {
    StatusError::conflict("virtualmachine", name, error)
}

/// `errors.NewConflict(v1.Resource("virtualmachineinstance"), name, error)`.
fn vmi_conflict(name: &str, error: impl std::fmt::Display) -> StatusError {
    StatusError::conflict("virtualmachineinstance", name, error)
}

/// The VMI, or 404/500 as [`fetch_vmi`], or a conflict with `not_running` unless it is `Running`.
async fn fetch_running_vmi(
    state: &AppState,
    namespace: &str,
    name: &str,
    not_running: &str,
) -> Result<Value, StatusError> {
    let vmi = fetch_vmi(state, namespace, name).await?;
    if phase(&vmi) != "Running" {
        return Err(vmi_conflict(name, not_running));
    }
    Ok(vmi)
}

/// A `Stop` state change request for the VMI with `vmi`'s uid.
fn stop_request(vmi: &Value) -> Value {
    json!({"action": "Stop", "uid": vmi.pointer("/metadata/uid").cloned().unwrap_or(Value::Null)})
}

/// `PUT .../virtualmachines/{name}/start`.
pub async fn start(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, StatusError> {
    let vm = fetch_vm(&state, &namespace, &name).await?;
    let vmi = optional_vmi(&state, &namespace, &name).await?;
    if let Some(vmi) = &vmi
        && !is_final(vmi)
        && !matches!(phase(vmi), "Unknown" | "")
    {
        return Err(vm_conflict(&name, "VM is already running"));
    }
    let options = options(&body)?;
    let start_paused = options["paused"].as_bool() == Some(true);
    let mut start_request = json!({"action": "Start"});
    if start_paused {
        start_request["data"] = json!({"paused": "true"});
    }
    let dry_run = dry_run(&options);
    let strategy = run_strategy(&vm)?;
    match strategy.as_str() {
        "Halted" => {
            let template_starts_paused = vm
                .pointer("/spec/template/spec/startStrategy")
                .and_then(Value::as_str)
                == Some("Paused");
            if start_paused && !template_starts_paused {
                let patch = change_request_patch(&vm, vec![start_request])?;
                patch_vm(&state, &namespace, &name, true, &patch, dry_run).await?;
            } else {
                patch_vm(
                    &state,
                    &namespace,
                    &name,
                    false,
                    &running_patch(&vm, true),
                    dry_run,
                )
                .await?;
            }
        }
        "RerunOnFailure" | "Manual" => {
            let vmi_phase = vmi.as_ref().map(phase);
            let needs_restart = (strategy == "RerunOnFailure" && vmi_phase == Some("Succeeded"))
                || (strategy == "Manual" && vmi.as_ref().is_some_and(is_final));
            if strategy == "RerunOnFailure" && vmi_phase == Some("Failed") {
                return Err(vm_conflict(
                    &name,
                    "RerunOnFailure does not support starting VM from failed state",
                ));
            }
            let changes = match (&vmi, needs_restart) {
                (Some(vmi), true) => vec![stop_request(vmi), start_request],
                _ => vec![start_request],
            };
            let patch = change_request_patch(&vm, changes)?;
            patch_vm(&state, &namespace, &name, true, &patch, dry_run).await?;
        }
        other => {
            return Err(vm_conflict(
                &name,
                format!("{other} does not support manual start requests"),
            ));
        }
    }
    Ok(StatusCode::ACCEPTED)
}

/// `PUT .../virtualmachines/{name}/stop`.
pub async fn stop(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, StatusError> {
    let options = options(&body)?;
    let dry_run = dry_run(&options);
    let grace_period = options["gracePeriod"].as_i64();
    let vm = fetch_vm(&state, &namespace, &name).await?;
    let strategy = run_strategy(&vm)?;
    let vmi = optional_vmi(&state, &namespace, &name).await?;
    let running_vmi = vmi.as_ref().filter(|vmi| !is_final(vmi));
    let mut old_grace_period = 0;
    if let (Some(vmi), Some(grace_period)) = (running_vmi, grace_period) {
        old_grace_period = patch_grace_period(&state, &namespace, vmi, grace_period, dry_run).await?;
    }
    match strategy.as_str() {
        "Halted" => {
            let Some(vmi) = running_vmi else {
                return Err(vm_conflict(&name, VM_NOT_RUNNING));
            };
            let vmi_has_grace_period = vmi
                .pointer("/spec/terminationGracePeriodSeconds")
                .is_some_and(|value| !value.is_null());
            if grace_period
                .is_none_or(|grace_period| vmi_has_grace_period && grace_period >= old_grace_period)
            {
                return Err(vm_conflict(
                    &name,
                    "Halted only supports manual stop requests with a shorter graceperiod",
                ));
            }
            request_stop(&state, &namespace, &name, &vm, vmi, dry_run).await?;
        }
        "RerunOnFailure" | "Manual" => {
            let Some(vmi) = running_vmi else {
                return Err(vm_conflict(&name, VM_NOT_RUNNING));
            };
            request_stop(&state, &namespace, &name, &vm, vmi, dry_run).await?;
        }
        _ => {
            patch_vm(
                &state,
                &namespace,
                &name,
                false,
                &running_patch(&vm, false),
                dry_run,
            )
            .await?;
        }
    }
    Ok(StatusCode::ACCEPTED)
}

/// `patchVMStatusStopped`.
async fn request_stop(
    state: &AppState,
    namespace: &str,
    name: &str,
    vm: &Value,
    vmi: &Value,
    dry_run: bool,
) -> Result<(), StatusError> {
    let patch = change_request_patch(vm, vec![stop_request(vmi)])?;
    patch_vm(state, namespace, name, true, &patch, dry_run).await
}

/// `patchVMITerminationGracePeriod`: returns the old grace period (0 when unset).
async fn patch_grace_period(
    state: &AppState,
    namespace: &str,
    vmi: &Value,
    grace_period: i64,
    dry_run: bool,
) -> Result<i64, StatusError> {
    let current = vmi
        .pointer("/spec/terminationGracePeriodSeconds")
        .cloned()
        .unwrap_or(Value::Null);
    let name = status::text(vmi, "/metadata/name");
    let patch = json!([
        {"op": "test", "path": "/spec/terminationGracePeriodSeconds", "value": current},
        {"op": "replace", "path": "/spec/terminationGracePeriodSeconds", "value": grace_period},
    ]);
    status::json_patch(state.client(), &vmi_path(namespace, name), &patch, dry_run)
        .await
        .map_err(|error| StatusError::internal(error.message()))?;
    Ok(current.as_i64().unwrap_or(0))
}

/// `PUT .../virtualmachines/{name}/restart`.
pub async fn restart(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, StatusError> {
    let options = options(&body)?;
    let dry_run = dry_run(&options);
    let grace_period = options["gracePeriodSeconds"].as_i64();
    match grace_period {
        Some(seconds) if seconds > 0 => {
            return Err(StatusError::bad_request(
                "For force restart, only gracePeriod=0 is supported for now",
            ));
        }
        Some(seconds) if seconds < 0 => {
            return Err(StatusError::bad_request(
                "gracePeriod has to be greater or equal to 0",
            ));
        }
        _ => {}
    }
    let vm = fetch_vm(&state, &namespace, &name).await?;
    let strategy = run_strategy(&vm)?;
    if strategy == "Halted" || strategy == "Once" {
        // "RunStategy" is virt-api's spelling.
        return Err(vm_conflict(
            &name,
            format!("RunStategy {strategy} does not support manual restart requests"),
        ));
    }
    let Some(vmi) = optional_vmi(&state, &namespace, &name).await? else {
        return Err(vm_conflict(&name, "VM is not running: Halted"));
    };
    if grace_period == Some(0) {
        patch_grace_period(&state, &namespace, &vmi, 1, dry_run).await?;
    }
    let patch = change_request_patch(&vm, vec![stop_request(&vmi), json!({"action": "Start"})])?;
    patch_vm(&state, &namespace, &name, true, &patch, dry_run).await?;
    Ok(StatusCode::ACCEPTED)
}

/// `PUT .../virtualmachines/{name}/migrate`.
pub async fn migrate(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, StatusError> {
    let options = options(&body)?;
    fetch_vm(&state, &namespace, &name).await?;
    let vmi = fetch_vmi(&state, &namespace, &name).await?;
    if phase(&vmi) != "Running" {
        return Err(vm_conflict(&name, VM_NOT_RUNNING));
    }
    let mut spec = json!({"vmiName": name});
    if let Some(selector) = options.get("addedNodeSelector").filter(|value| !value.is_null()) {
        spec["addedNodeSelector"] = selector.clone();
    }
    let migration = json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": "kubevirt-migrate-vm-", "namespace": namespace},
        "spec": spec,
    });
    let path = format!("/apis/kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstancemigrations");
    status::create(state.client(), &path, &migration, dry_run(&options))
        .await
        .map_err(|error| StatusError::internal(error.message()))?;
    Ok(StatusCode::ACCEPTED)
}

/// `PUT .../virtualmachineinstances/{name}/pause`.
pub async fn pause(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, StatusError> {
    let options = options(&body)?;
    let vmi = fetch_running_vmi(&state, &namespace, &name, VM_NOT_RUNNING).await?;
    let liveness = vmi
        .pointer("/spec/livenessProbe")
        .filter(|probe| !probe.is_null());
    if liveness.is_some_and(|probe| probe.get("guestAgentPing").is_none_or(Value::is_null)) {
        return Err(StatusError::forbidden(
            "virtualmachineinstance",
            &name,
            "Pausing VMIs with a non-GuestAgentPing LivenessProbe is not supported",
        ));
    }
    if has_condition(&vmi, "Paused") {
        return Err(vmi_conflict(&name, "VMI is already paused"));
    }
    if dry_run(&options) {
        return Ok(StatusCode::OK);
    }
    state
        .machines()
        .pause(&namespace, &name)
        .await
        .map_err(StatusError::internal)?;
    let now = paddock_kubevirt_controllers::now();
    set_paused_condition(
        &state,
        &vmi,
        Some(json!({
            "type": "Paused",
            "status": "True",
            "lastProbeTime": now,
            "lastTransitionTime": now,
            "reason": "PausedByUser",
            "message": "VMI was paused by user",
        })),
    )
    .await?;
    Ok(StatusCode::OK)
}

/// `PUT .../virtualmachineinstances/{name}/unpause`.
pub async fn unpause(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
    body: Bytes,
) -> Result<StatusCode, StatusError> {
    match fetch_vm(&state, &namespace, &name).await {
        Ok(vm)
            if vm
                .pointer("/status/snapshotInProgress")
                .is_some_and(|value| !value.is_null()) =>
        {
            return Err(vm_conflict(&name, "VM snapshot is in progress"));
        }
        Ok(_) => {}
        Err(error) if error.code == 404 => {}
        Err(error) => return Err(error),
    }
    let options = options(&body)?;
    let vmi = fetch_running_vmi(&state, &namespace, &name, VMI_NOT_RUNNING).await?;
    if !has_condition(&vmi, "Paused") {
        return Err(vmi_conflict(&name, "VMI is not paused"));
    }
    if dry_run(&options) {
        return Ok(StatusCode::OK);
    }
    state
        .machines()
        .resume(&namespace, &name)
        .await
        .map_err(StatusError::internal)?;
    set_paused_condition(&state, &vmi, None).await?;
    Ok(StatusCode::OK)
}

/// Replaces the VMI's conditions with the Paused one removed and `paused` (when given) added, with a
/// JSON patch that tests the conditions it read, retrying on a concurrent change.
async fn set_paused_condition(
    state: &AppState,
    vmi: &Value,
    paused: Option<Value>,
) -> Result<(), StatusError> {
    let namespace = status::text(vmi, "/metadata/namespace");
    let name = status::text(vmi, "/metadata/name");
    // The VirtualMachineInstance CRD has no status subresource: status is written with the object.
    let path = vmi_path(namespace, name);
    let mut current = vmi.clone();
    for _ in 0..5 {
        let conditions = current
            .pointer("/status/conditions")
            .cloned()
            .unwrap_or(Value::Null);
        let mut updated: Vec<Value> = conditions
            .as_array()
            .map(|conditions| {
                conditions
                    .iter()
                    .filter(|condition| condition["type"] != "Paused")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        updated.extend(paused.clone());
        let patch = if current.get("status").is_none_or(Value::is_null) {
            json!([{"op": "add", "path": "/status", "value": {"conditions": updated}}])
        } else {
            json!([
                {"op": "test", "path": "/status/conditions", "value": conditions},
                {"op": "add", "path": "/status/conditions", "value": updated},
            ])
        };
        match status::json_patch(state.client(), &path, &patch, false).await {
            Ok(_) => return Ok(()),
            Err(error) if error.message().contains(JSON_PATCH_TEST_FAILED) => {
                current = fetch_vmi(state, namespace, name).await?;
            }
            Err(error) => return Err(StatusError::internal(error.message())),
        }
    }
    Err(StatusError::internal(format!(
        "the conditions of vmi {namespace}/{name} kept changing while the Paused condition was updated"
    )))
}

/// `PUT .../virtualmachineinstances/{name}/softreboot`.
pub async fn soft_reboot(
    State(state): State<AppState>,
    Path((namespace, name)): Path<(String, String)>,
) -> Result<StatusCode, StatusError> {
    let vmi = fetch_running_vmi(&state, &namespace, &name, VM_NOT_RUNNING).await?;
    if condition_status(&vmi, "Paused") == Some("True") {
        return Err(vmi_conflict(&name, "VMI is paused"));
    }
    let acpi_disabled = vmi
        .pointer("/spec/domain/features/acpi/enabled")
        .and_then(Value::as_bool)
        == Some(false);
    if !has_condition(&vmi, "AgentConnected") && acpi_disabled {
        return Err(vmi_conflict(
            &name,
            "VMI neither have the agent connected nor the ACPI feature enabled",
        ));
    }
    state.machines().soft_reboot(&namespace, &name);
    Ok(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    #[test]
    fn run_strategy_follows_kubevirt() {
        assert_eq!(run_strategy(&json!({"spec": {}})).unwrap(), "Halted");
        assert_eq!(
            run_strategy(&json!({"spec": {"running": true}})).unwrap(),
            "Always"
        );
        assert_eq!(
            run_strategy(&json!({"spec": {"running": false}})).unwrap(),
            "Halted"
        );
        assert_eq!(
            run_strategy(&json!({"spec": {"runStrategy": "Manual"}})).unwrap(),
            "Manual"
        );
        assert!(run_strategy(&json!({"spec": {"runStrategy": "Manual", "running": true}})).is_err());
    }

    #[test]
    fn change_requests_add_status_when_it_is_empty_and_test_otherwise() {
        let patch = change_request_patch(&json!({"spec": {}}), vec![json!({"action": "Start"})]).unwrap();
        assert_eq!(patch[0]["op"], "add");
        assert_eq!(patch[0]["path"], "/status");
        let vm = json!({"status": {"printableStatus": "Stopped", "startFailure": {"retries": 1}}});
        let patch = change_request_patch(&vm, vec![json!({"action": "Start"})]).unwrap();
        assert_eq!(
            patch[0],
            json!({"op": "test", "path": "/status/stateChangeRequests", "value": null})
        );
        assert_eq!(patch[1]["op"], "add");
        assert_eq!(patch[2], json!({"op": "remove", "path": "/status/startFailure"}));
        let busy = json!({"status": {"stateChangeRequests": [{"action": "Start"}]}});
        assert!(change_request_patch(&busy, vec![json!({"action": "Start"})]).is_err());
        let stop = change_request_patch(&busy, vec![json!({"action": "Stop"})]).unwrap();
        assert_eq!(stop[1]["op"], "replace");
    }
}
