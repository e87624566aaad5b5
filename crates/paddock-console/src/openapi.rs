//! The OpenAPI 3 document of the API, served at `/openapi.json`.
//!
//! Role: the contract for clients (the CLI, the web UI, scripts). Written by hand, next to the
//! routes, so it reads like documentation; a test checks that it describes exactly the routes the
//! router serves (`crate::api::served_routes`) and that every documented route answers.

use serde_json::{Map, Value, json};

/// The OpenAPI document.
pub fn document() -> Value {
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "paddock API",
            "version": "v1",
            "description": "Virtual machines from VirtualMachineApp manifests: create, list, power, snapshots, screenshots, serial and VNC consoles (websockets speaking KubeVirt's plain.kubevirt.io protocol) and a stream of changes. Every route except /healthz and /readyz needs the access token `paddock serve` printed at start (local) or a Kubernetes bearer token (cluster: the console acts as that user, so RBAC decides; a 403 names the missing permission), as `Authorization: Bearer <token>` or the `token` query parameter. Errors are JSON {code, reason, message}.",
            "license": {"name": "Apache-2.0"},
        },
        "servers": [{"url": "/"}],
        "security": [{"bearerToken": []}, {"queryToken": []}],
        "tags": [
            {"name": "vms", "description": "Virtual machines and their power"},
            {"name": "snapshots", "description": "Snapshots of a VM's disk, optionally with memory"},
            {"name": "consoles", "description": "Screenshots, serial and VNC consoles"},
            {"name": "backups", "description": "Backups of a VM to a registry (containerDisk images) and restores from one, as long-running operations. Cluster mode runs them as the signed-in user (RBAC decides; a 403 names the missing permission) with the console's registry credentials"},
            {"name": "disks", "description": "Disk uploads into DataVolumes through CDI's upload proxy (cluster only) and the image library of the machine (local only)"},
            {"name": "server", "description": "Health, metrics and this document"},
        ],
        "components": {
            "securitySchemes": {
                "bearerToken": {"type": "http", "scheme": "bearer", "description": "The token `paddock serve` printed at start (also in <state>/serve.json)."},
                "queryToken": {"type": "apiKey", "in": "query", "name": "token", "description": "The same token as a query parameter, for websockets and links (browsers cannot set headers on websockets)."},
            },
            "parameters": parameters(),
            "responses": responses(),
            "schemas": schemas(),
        },
        "paths": paths(),
    })
}

fn paths() -> Value {
    let mut paths = Map::new();
    let mut add = |path: &str, method: &str, operation: Value| {
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        if let Some(object) = entry.as_object_mut() {
            object.insert(method.to_string(), operation);
        }
    };
    let vm_params = || vec![parameter_ref("namespace"), parameter_ref("name")];
    let snapshot_params = || {
        vec![
            parameter_ref("namespace"),
            parameter_ref("name"),
            parameter_ref("snapshot"),
        ]
    };

    add(
        "/healthz",
        "get",
        json!({
            "tags": ["server"], "operationId": "healthz", "summary": "Liveness: the server answers",
            "security": [],
            "responses": {"200": json_response("The server is alive", json!({"type": "object", "properties": {"status": {"type": "string", "example": "ok"}}}))},
        }),
    );
    add(
        "/readyz",
        "get",
        json!({
            "tags": ["server"], "operationId": "readyz", "summary": "Readiness: the backend is usable (runtime open, state directory writable)",
            "security": [],
            "responses": {
                "200": json_response("Ready", schema_ref("Readiness")),
                "503": json_response("Not ready (a check failed, or the server is shutting down)", schema_ref("Readiness")),
            },
        }),
    );
    add(
        "/",
        "get",
        json!({
            "tags": ["server"], "operationId": "index", "summary": "Where things are: API prefix, this document, events, metrics, the web console",
            "description": "A browser (Accept: text/html) is redirected to the web console at /ui/ (public static files), carrying the token in the URL fragment when it came with one.",
            "responses": {"200": json_response("Links", json!({"type": "object"})), "303": {"description": "To the web console (browsers)"}, "401": response_ref("Unauthorized")},
        }),
    );
    add(
        "/openapi.json",
        "get",
        json!({
            "tags": ["server"], "operationId": "openapi", "summary": "This document",
            "responses": {"200": json_response("The OpenAPI 3 document", json!({"type": "object"})), "401": response_ref("Unauthorized")},
        }),
    );
    add(
        "/metrics",
        "get",
        json!({
            "tags": ["server"], "operationId": "metrics", "summary": "Prometheus metrics (OpenMetrics text)",
            "description": "paddock_http_requests_total{method,route,status}, paddock_websocket_sessions_total{console}, paddock_websocket_sessions_active{console}.",
            "responses": {
                "200": {"description": "Metrics", "content": {"application/openmetrics-text": {"schema": {"type": "string"}}}},
                "401": response_ref("Unauthorized"),
            },
        }),
    );
    add(
        "/api/v1/vms",
        "get",
        json!({
            "tags": ["vms"], "operationId": "listVms", "summary": "List VMs with their status",
            "parameters": [{"name": "namespace", "in": "query", "required": false, "schema": {"type": "string"}, "description": "Only VMs of this namespace."}],
            "responses": {"200": json_response("The VMs, ordered by namespace and name", list_of("Vm")), "401": response_ref("Unauthorized")},
        }),
    );
    add(
        "/api/v1/vms",
        "post",
        json!({
            "tags": ["vms"], "operationId": "createVm", "summary": "Create a VM from a VirtualMachineApp manifest",
            "description": "The body is a VirtualMachineApp (paddock.dev/v1alpha1) as YAML (application/yaml, the default) or JSON (application/json). The VM starts when its runStrategy says so (Always, the default, RerunOnFailure, Once). Locally, spec.image.containerDisk also takes file:<disk> and oci:<layout>[:tag].",
            "requestBody": {
                "required": true,
                "content": {
                    "application/yaml": {"schema": schema_ref("VirtualMachineApp")},
                    "application/json": {"schema": schema_ref("VirtualMachineApp")},
                },
            },
            "responses": {
                "201": json_response("Created", schema_ref("Vm")),
                "400": response_ref("BadRequest"),
                "401": response_ref("Unauthorized"),
                "409": response_ref("Conflict"),
                "415": response_ref("UnsupportedMediaType"),
                "422": response_ref("Unprocessable"),
                "500": response_ref("Internal"),
            },
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}",
        "get",
        json!({
            "tags": ["vms"], "operationId": "getVm", "summary": "One VM", "parameters": vm_params(),
            "responses": {"200": json_response("The VM", schema_ref("Vm")), "401": response_ref("Unauthorized"), "404": response_ref("NotFound")},
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}",
        "delete",
        json!({
            "tags": ["vms"], "operationId": "deleteVm", "summary": "Delete a VM (switching it off first)",
            "parameters": [parameter_ref("namespace"), parameter_ref("name"), {"name": "force", "in": "query", "required": false, "schema": {"type": "boolean", "default": false}, "description": "Delete even when the VM has snapshots (they are deleted with it)."}],
            "responses": {"204": {"description": "Deleted"}, "401": response_ref("Unauthorized"), "404": response_ref("NotFound"), "409": response_ref("Conflict"), "500": response_ref("Internal")},
        }),
    );
    let power = [
        (
            "start",
            "startVm",
            "Start a stopped VM (KubeVirt `start`; runStrategy Halted becomes Always)",
            false,
        ),
        (
            "stop",
            "stopVm",
            "Stop gracefully: ACPI power button, forced after the grace period (KubeVirt `stop`; Always becomes Halted)",
            true,
        ),
        (
            "forcestop",
            "forceStopVm",
            "Switch the VM off at once (Always becomes Halted)",
            false,
        ),
        (
            "restart",
            "restartVm",
            "Stop gracefully and start again (KubeVirt `restart`)",
            true,
        ),
        ("pause", "pauseVm", "Pause the CPUs (KubeVirt `pause`)", false),
        (
            "unpause",
            "unpauseVm",
            "Resume paused CPUs (KubeVirt `unpause`)",
            false,
        ),
    ];
    for (action, operation_id, summary, graceful) in power {
        let mut parameters = vm_params();
        if graceful {
            parameters.push(json!({"name": "gracePeriodSeconds", "in": "query", "required": false, "schema": {"type": "integer", "minimum": 0, "default": 60}, "description": "How long the guest may take to power off before it is switched off."}));
        }
        add(
            &format!("/api/v1/vms/{{namespace}}/{{name}}/{action}"),
            "put",
            json!({
                "tags": ["vms"], "operationId": operation_id, "summary": summary, "parameters": parameters,
                "responses": {
                    "200": json_response("The VM after the action", schema_ref("Vm")),
                    "401": response_ref("Unauthorized"), "404": response_ref("NotFound"),
                    "409": response_ref("Conflict"), "500": response_ref("Internal"),
                },
            }),
        );
    }
    add(
        "/api/v1/vms/{namespace}/{name}/snapshots",
        "get",
        json!({
            "tags": ["snapshots"], "operationId": "listSnapshots", "summary": "A VM's snapshots, oldest first", "parameters": vm_params(),
            "responses": {"200": json_response("The snapshots", list_of("Snapshot")), "401": response_ref("Unauthorized"), "404": response_ref("NotFound")},
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}/snapshots",
        "post",
        json!({
            "tags": ["snapshots"], "operationId": "createSnapshot", "summary": "Take a snapshot",
            "description": "With memory (running or paused VM): restoring resumes the guest exactly there. Without: the disk only, of a running (crash-consistent) or stopped VM.",
            "parameters": vm_params(),
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref("SnapshotRequest")}}},
            "responses": {
                "201": json_response("Taken", schema_ref("Snapshot")),
                "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "404": response_ref("NotFound"),
                "409": response_ref("Conflict"), "422": response_ref("Unprocessable"), "500": response_ref("Internal"),
            },
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}/snapshots/{snapshot}",
        "delete",
        json!({
            "tags": ["snapshots"], "operationId": "deleteSnapshot", "summary": "Delete a snapshot", "parameters": snapshot_params(),
            "responses": {"204": {"description": "Deleted"}, "401": response_ref("Unauthorized"), "404": response_ref("NotFound"), "409": response_ref("Conflict"), "500": response_ref("Internal")},
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}/snapshots/{snapshot}/restore",
        "put",
        json!({
            "tags": ["snapshots"], "operationId": "restoreSnapshot", "summary": "Restore a snapshot",
            "description": "A memory snapshot restores a running or paused VM in place and starts a stopped one in the saved state. A disk-only snapshot needs a stopped VM.",
            "parameters": snapshot_params(),
            "responses": {"200": json_response("The VM after the restore", schema_ref("Vm")), "401": response_ref("Unauthorized"), "404": response_ref("NotFound"), "409": response_ref("Conflict"), "500": response_ref("Internal")},
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}/screenshot",
        "get",
        json!({
            "tags": ["consoles"], "operationId": "screenshot", "summary": "A PNG of the VM's screen", "parameters": vm_params(),
            "responses": {
                "200": {"description": "The screen", "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                "401": response_ref("Unauthorized"), "404": response_ref("NotFound"), "409": response_ref("Conflict"), "422": response_ref("Unprocessable"),
            },
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}/console-access",
        "get",
        json!({
            "tags": ["consoles"], "operationId": "consoleAccess", "summary": "Which consoles of the VM the caller may open",
            "description": "Each console is its own KubeVirt subresource with its own RBAC rule (`get virtualmachineinstances/console`, `get virtualmachineinstances/vnc` in API group subresources.kubevirt.io): a refused one carries the missing permission and an explanation. Ask this before opening a websocket, whose refusal a browser cannot read. Locally both are allowed.",
            "parameters": vm_params(),
            "responses": {
                "200": json_response("The access to each console", schema_ref("ConsoleAccess")),
                "401": response_ref("Unauthorized"), "403": response_ref("Forbidden"), "404": response_ref("NotFound"),
            },
        }),
    );
    for (console, operation_id, summary) in [
        (
            "console",
            "serialConsole",
            "The serial console as a websocket (KubeVirt `console` subresource)",
        ),
        (
            "vnc",
            "vncConsole",
            "The VNC server of the VM's screen as a websocket (KubeVirt `vnc` subresource; RFB inside)",
        ),
    ] {
        add(
            &format!("/api/v1/vms/{{namespace}}/{{name}}/{console}"),
            "get",
            json!({
                "tags": ["consoles"], "operationId": operation_id, "summary": summary,
                "description": "Upgrade to a websocket with subprotocol plain.kubevirt.io (binary is accepted too). Binary frames carry raw bytes both ways; text frames from the client are taken as their UTF-8 bytes. The server closes the websocket (1000) when the console closes, e.g. the VM stopped, and with 1001 at shutdown. The serial console is shared: every session sees the guest's output and may type. Authenticate with ?token= (browsers cannot set headers on websockets).",
                "parameters": vm_params(),
                "responses": {
                    "101": {"description": "Switching to the websocket protocol"},
                    "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "404": response_ref("NotFound"),
                    "409": response_ref("Conflict"), "422": response_ref("Unprocessable"), "500": response_ref("Internal"),
                },
            }),
        );
    }
    for version in ["v1", "v1alpha3"] {
        add(
            &format!(
                "/k8s/apis/subresources.kubevirt.io/{version}/namespaces/{{namespace}}/virtualmachineinstances/{{name}}/vnc"
            ),
            "get",
            json!({
                "tags": ["consoles"], "operationId": format!("kubevirtVnc_{version}"),
                "summary": "The VNC websocket under KubeVirt's own path, where BafflesApplications point (the same session as /api/v1/vms/{namespace}/{name}/vnc)",
                "description": "For Baffles and other KubeVirt VNC clients: the console proxies it to the API server as the signed-in user. Besides ?token=, the token may come as the websocket subprotocol base64url.bearer.authorization.k8s.io.<base64url token>, as Kubernetes clients send it.",
                "parameters": vm_params(),
                "responses": {
                    "101": {"description": "Switching to the websocket protocol"},
                    "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "403": response_ref("Forbidden"), "404": response_ref("NotFound"),
                    "409": response_ref("Conflict"), "422": response_ref("Unprocessable"), "500": response_ref("Internal"),
                },
            }),
        );
    }
    add(
        "/api/v1/vms/{namespace}/{name}/migrate",
        "put",
        json!({
            "tags": ["vms"], "operationId": "migrateVm", "summary": "Move a running VM to another node (KubeVirt `migrate` subresource; cluster only)",
            "parameters": vm_params(),
            "responses": {"200": json_response("The VM", schema_ref("Vm")), "401": response_ref("Unauthorized"), "403": response_ref("Forbidden"), "404": response_ref("NotFound"), "409": response_ref("Conflict"), "422": response_ref("Unprocessable"), "500": response_ref("Internal")},
        }),
    );
    let schedule_responses = json!({
        "200": json_response("The VM; its manifest's spec.snapshots is the schedule in force", schema_ref("Vm")),
        "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"),
        "403": response_ref("Forbidden"), "404": response_ref("NotFound"),
        "422": response_ref("Unprocessable"),
        "501": json_response("The backend has no scheduler (local: schedules run in cluster mode); reason NotImplemented", schema_ref("Error")),
        "500": response_ref("Internal"),
    });
    add(
        "/api/v1/vms/{namespace}/{name}/snapshot-schedule",
        "put",
        json!({
            "tags": ["snapshots"], "operationId": "setSnapshotSchedule",
            "summary": "Set the VM's snapshot schedule (a merge patch of its VirtualMachineApp's spec.snapshots as the user; the operator takes and prunes the snapshots; cluster only). 403 names the missing patch permission; 422 for an invalid schedule or a VM without a VirtualMachineApp",
            "parameters": vm_params(),
            "requestBody": {"required": true, "content": {"application/json": {"schema": {
                "type": "object", "required": ["schedule"], "additionalProperties": false,
                "properties": {
                    "schedule": {"type": "string", "maxLength": 128, "description": "Five-field cron expression in UTC, e.g. `0 3 * * *`, or a macro such as `@daily`"},
                    "keep": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 7, "description": "How many scheduled snapshots to keep"},
                },
            }}}},
            "responses": schedule_responses.clone(),
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}/snapshot-schedule",
        "delete",
        json!({
            "tags": ["snapshots"], "operationId": "clearSnapshotSchedule",
            "summary": "Clear the VM's snapshot schedule (removes its VirtualMachineApp's spec.snapshots; snapshots already taken stay; cluster only)",
            "parameters": vm_params(),
            "responses": schedule_responses,
        }),
    );
    add(
        "/api/v1/vms/{namespace}/{name}/clone",
        "post",
        json!({
            "tags": ["vms"], "operationId": "cloneVm", "summary": "Clone a VM into a new VM (KubeVirt VirtualMachineClone; cluster only)",
            "parameters": vm_params(),
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "description": "The new VM's name"}}}}}},
            "responses": {"201": json_response("The new VM", schema_ref("Vm")), "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "403": response_ref("Forbidden"), "404": response_ref("NotFound"), "409": response_ref("Conflict"), "422": response_ref("Unprocessable"), "500": response_ref("Internal")},
        }),
    );
    add_backup_paths(&mut add);
    let upload_errors = json!({
        "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "403": response_ref("Forbidden"),
        "409": response_ref("Conflict"), "411": json_response("No Content-Length; reason LengthRequired", schema_ref("Error")),
        "422": response_ref("Unprocessable"), "500": response_ref("Internal"),
        "501": json_response("Not in this mode (local): reason NotImplemented; use a disk path or registry image in the create wizard", schema_ref("Error")),
        "502": json_response("CDI's upload proxy refused the upload, failed, or the body broke off before its Content-Length (reason BadGateway); the message has the proxy's words, and the DataVolume was deleted so the name can be used again", schema_ref("Error")),
        "504": json_response("CDI's upload proxy or upload server stopped answering (reason GatewayTimeout); the DataVolume was deleted", schema_ref("Error")),
    });
    let mut upload_responses = upload_errors.clone();
    if let Some(object) = upload_responses.as_object_mut() {
        object.insert(
            "200".to_string(),
            json_response("dryRun: the upload would be accepted", schema_ref("Upload")),
        );
        object.insert(
            "201".to_string(),
            json_response("The proxy accepted every byte; CDI imports next: follow the phase with GET …/uploads/{name} until Succeeded", schema_ref("Upload")),
        );
    }
    add(
        "/api/v1/namespaces/{namespace}/uploads",
        "post",
        json!({
            "tags": ["disks"], "operationId": "uploadDisk", "summary": "Upload a disk into a new DataVolume through CDI's upload proxy (cluster only)",
            "description": "As the signed-in user: checks `create datavolumes.cdi.kubevirt.io` and `create uploadtokenrequests.upload.cdi.kubevirt.io` (403 names the missing one), reads the disk's header (qcow2, raw, vmdk, vdi, vhd, vhdx; a backing file or encryption is refused; the size must hold a qcow2's or raw disk's virtual size), creates the DataVolume with `spec.source.upload`, waits for UploadReady, gets an UploadTokenRequest and streams the body to the proxy's `/v1beta1/upload-async` without buffering it. The answer comes only once the proxy accepted every byte. CDI's proxy takes one stream per upload (no chunks, no resume): a reverse proxy in front of the console must allow bodies of the disk's size and long requests. Local mode answers 501.",
            "parameters": [
                parameter_ref("namespace"),
                {"name": "name", "in": "query", "required": true, "schema": {"type": "string"}, "description": "The DataVolume to create."},
                {"name": "size", "in": "query", "required": false, "schema": {"type": "string"}, "description": "The DataVolume's size, e.g. 10Gi (default: the disk's virtual size plus CDI's 5.5% filesystem overhead, rounded up to MiB)."},
                {"name": "storageClass", "in": "query", "required": false, "schema": {"type": "string"}, "description": "The StorageClass (default: the cluster's)."},
                {"name": "dryRun", "in": "query", "required": false, "schema": {"type": "boolean"}, "description": "Only check the permissions and that the name is free (200, nothing created, no body needed): ask this before sending gigabytes."},
            ],
            "requestBody": {"required": true, "description": "The disk file's bytes, with Content-Length", "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": upload_responses,
        }),
    );
    add(
        "/api/v1/namespaces/{namespace}/uploads/{name}",
        "get",
        json!({
            "tags": ["disks"], "operationId": "uploadStatus", "summary": "An uploaded DataVolume's phase and progress (cluster only; needs `get datavolumes`)",
            "parameters": [parameter_ref("namespace"), {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The DataVolume's name."}],
            "responses": {"200": json_response("The DataVolume", schema_ref("Upload")), "401": response_ref("Unauthorized"), "403": response_ref("Forbidden"), "404": response_ref("NotFound"), "501": upload_errors["501"].clone()},
        }),
    );
    add(
        "/api/v1/images",
        "get",
        json!({
            "tags": ["disks"], "operationId": "listImages", "summary": "The image library: base images already stored on the machine running paddock serve, newest import first (local only)",
            "description": "Each disk a VM was created from is stored once, by the sha256 of its content; the list says where it came from, its format, sizes, when it was imported and which VMs use it. `image` is what to write as spec.image.containerDisk to boot the same disk. Cluster mode answers 501: there, images come from registries and uploaded disks.",
            "responses": {"200": json_response("The images", list_of("Image")), "401": response_ref("Unauthorized"), "500": response_ref("Internal"), "501": response_ref("NotImplemented")},
        }),
    );
    add(
        "/api/v1/session",
        "get",
        json!({
            "tags": ["server"], "operationId": "session", "summary": "Who the caller is: the backend and the signed-in user (what a sign-in page checks a token with)",
            "responses": {
                "200": json_response("The caller", json!({"type": "object", "properties": {"backend": {"type": "string"}, "user": {"type": "object", "properties": {"username": {"type": "string"}, "uid": {"type": "string"}, "groups": {"type": "array", "items": {"type": "string"}}}}}})),
                "401": response_ref("Unauthorized"),
            },
        }),
    );
    add(
        "/api/v1/session",
        "post",
        json!({
            "tags": ["server"], "operationId": "signIn", "summary": "Sign in: exchange the token this request carries for a console session token",
            "description": "In a cluster, send the Kubernetes bearer token once; the answer's token (valid 8 hours, at every console replica sharing the session key; without --session-key-file only at this process) is what a browser keeps instead, so no cluster credential stays in it. Locally the answer is the access token itself.",
            "responses": {
                "201": json_response("The session", json!({"type": "object", "properties": {"token": {"type": "string"}, "expires": {"type": "integer", "description": "Seconds since the Unix epoch (cluster only)"}, "user": {"type": "object"}}})),
                "401": response_ref("Unauthorized"),
            },
        }),
    );
    add(
        "/api/v1/events",
        "get",
        json!({
            "tags": ["vms"], "operationId": "events", "summary": "Every change from now on, as server-sent events",
            "description": "text/event-stream; the event name is the type (Changed, SnapshotsChanged, Deleted, Lagged) and the data is an Event as JSON. List first, then apply events; after Lagged, list again.",
            "responses": {
                "200": {"description": "The stream", "content": {"text/event-stream": {"schema": schema_ref("Event")}}},
                "401": response_ref("Unauthorized"),
            },
        }),
    );
    Value::Object(paths)
}

fn add_backup_paths(add: &mut impl FnMut(&str, &str, Value)) {
    let vm_params = || vec![parameter_ref("namespace"), parameter_ref("name")];
    let repository_params = || {
        vec![
            json!({"name": "repository", "in": "query", "required": true, "schema": {"type": "string"}, "example": "127.0.0.1:5000/backups/web", "description": "registry/repository (a tag or digest in it is ignored)."}),
            json!({"name": "insecure", "in": "query", "required": false, "schema": {"type": "boolean", "default": false}, "description": "Speak plain http to the registry."}),
        ]
    };
    let started = |description: &str| {
        json!({
            "description": description,
            "headers": {"Location": {"schema": {"type": "string"}, "description": "/api/v1/operations/{id}"}},
            "content": {"application/json": {"schema": schema_ref("Operation")}},
        })
    };
    add(
        "/api/v1/vms/{namespace}/{name}/backups",
        "post",
        json!({
            "tags": ["backups"], "operationId": "createBackup", "summary": "Start backing the VM up to a registry repository",
            "description": "A running VM keeps running: its disk is snapshotted (crash-consistent), copied, compressed and pushed as a containerDisk image tagged `<vm>-<UTC time>` with `dev.paddock.backup.*` annotations, exactly as `paddock backup create`. The answer is a Running operation to poll; the tag exists only once the backup is complete. Refused at once for an unknown VM (404), a bad repository (400), a non-persistent disk (422), a backup or restore running on the VM (409), a registry that cannot be reached or refuses access (502). Cluster mode, as the signed-in user (`paddock backup create --cluster`): a running VM gets a VirtualMachineSnapshot, the disk is read through a VirtualMachineExport (the console's `--backup-export-link`), both are deleted afterwards; 403 names the first missing permission among get virtualmachineapps/virtualmachines/virtualmachineinstances, create/get/delete virtualmachineexports, get secrets and (running) create/delete virtualmachinesnapshots; registry credentials are the console's (`--registry-docker-config`) and `insecure` needs `--registry-allow-insecure` (400 otherwise).",
            "parameters": vm_params(),
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref("BackupRequest")}}},
            "responses": {
                "202": started("Started"),
                "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "404": response_ref("NotFound"),
                "403": response_ref("Forbidden"), "409": response_ref("Conflict"), "422": response_ref("Unprocessable"),
                "500": response_ref("Internal"), "501": response_ref("NotImplemented"), "502": response_ref("BadGateway"),
            },
        }),
    );
    let mut vm_list_params = vm_params();
    vm_list_params.extend(repository_params());
    add(
        "/api/v1/vms/{namespace}/{name}/backups",
        "get",
        json!({
            "tags": ["backups"], "operationId": "listVmBackups", "summary": "The VM's complete backups in a repository, oldest first",
            "parameters": vm_list_params,
            "responses": {
                "200": json_response("The backups", list_of("Backup")),
                "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "403": response_ref("Forbidden"),
                "500": response_ref("Internal"), "501": response_ref("NotImplemented"), "502": response_ref("BadGateway"),
            },
        }),
    );
    let mut list_params = repository_params();
    list_params.push(json!({"name": "namespace", "in": "query", "required": false, "schema": {"type": "string"}, "description": "Only backups of VMs of this namespace."}));
    list_params.push(json!({"name": "vm", "in": "query", "required": false, "schema": {"type": "string"}, "description": "Only backups of VMs of this name."}));
    add(
        "/api/v1/backups",
        "get",
        json!({
            "tags": ["backups"], "operationId": "listBackups", "summary": "The complete backups in a repository, oldest first",
            "description": "Tags that are not backups, and backups whose blobs the registry lacks, are left out (as `paddock backup list`). Cluster mode lists with the console's registry credentials and shows only backups of VMs in namespaces where the signed-in user may list virtualmachines (403 when `namespace` names one where they may not).",
            "parameters": list_params,
            "responses": {
                "200": json_response("The backups", list_of("Backup")),
                "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "403": response_ref("Forbidden"),
                "500": response_ref("Internal"), "501": response_ref("NotImplemented"), "502": response_ref("BadGateway"),
            },
        }),
    );
    add(
        "/api/v1/backups/restore",
        "post",
        json!({
            "tags": ["backups"], "operationId": "restoreBackup", "summary": "Start creating a VM from a backup",
            "description": "Under a new name, or (`replace`) in place of the VM of that name, which must be stopped (409 otherwise; it is deleted, with its snapshots, only once the backup is pulled and verified). The VM's disk is the backup pinned by digest. Refused at once when the backup cannot be read (400, 404, 422, 502) or the target exists without `replace` (409). Cluster mode creates the VirtualMachineApp as the signed-in user (403 names a missing get/create, or with `replace` delete, on virtualmachineapps); the operator and CDI then import the disk from the registry, and the operation succeeds once the VirtualMachineApp exists.",
            "requestBody": {"required": true, "content": {"application/json": {"schema": schema_ref("RestoreRequest")}}},
            "responses": {
                "202": started("Started"),
                "400": response_ref("BadRequest"), "401": response_ref("Unauthorized"), "404": response_ref("NotFound"),
                "403": response_ref("Forbidden"), "409": response_ref("Conflict"), "422": response_ref("Unprocessable"),
                "500": response_ref("Internal"), "501": response_ref("NotImplemented"), "502": response_ref("BadGateway"),
            },
        }),
    );
    add(
        "/api/v1/operations",
        "get",
        json!({
            "tags": ["backups"], "operationId": "listOperations", "summary": "Running and recently ended backups and restores, oldest first",
            "description": "Kept in memory: the server forgets them when it restarts. Cluster mode shows only operations on VMs the signed-in user may get.",
            "responses": {"200": json_response("The operations", list_of("Operation")), "401": response_ref("Unauthorized")},
        }),
    );
    add(
        "/api/v1/operations/{id}",
        "get",
        json!({
            "tags": ["backups"], "operationId": "getOperation", "summary": "One backup or restore: phase, progress, result or why it failed",
            "parameters": [{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The operation's id, e.g. op-3f9a1c2b7d4e."}],
            "responses": {"200": json_response("The operation", schema_ref("Operation")), "401": response_ref("Unauthorized"), "404": response_ref("NotFound")},
        }),
    );
}

fn backup_schemas() -> Value {
    let timestamp = json!({"type": "string", "format": "date-time", "description": "RFC 3339, UTC"});
    json!({
        "BackupRequest": {
            "type": "object", "required": ["repository"], "additionalProperties": false,
            "properties": {
                "repository": {"type": "string", "example": "127.0.0.1:5000/backups/web", "description": "registry/repository; the backup is tagged <vm>-<UTC time>"},
                "insecure": {"type": "boolean", "default": false, "description": "Plain http (a local registry)"},
            },
        },
        "RestoreRequest": {
            "type": "object", "required": ["reference"], "additionalProperties": false,
            "properties": {
                "reference": {"type": "string", "example": "127.0.0.1:5000/backups/web@sha256:…", "description": "registry/repository:tag or registry/repository@sha256:…"},
                "insecure": {"type": "boolean", "default": false},
                "name": {"type": "string", "description": "The new VM's name (default: the backed-up VM's)"},
                "namespace": {"type": "string", "description": "The new VM's namespace (default: the backed-up VM's)"},
                "replace": {"type": "boolean", "default": false, "description": "Replace the stopped VM of that name"},
                "start": {"type": "boolean", "default": false, "description": "Start the restored VM whatever the backed-up run strategy"},
            },
        },
        "Backup": {
            "type": "object", "required": ["reference", "pinnedReference", "tag", "digest", "size", "namespace", "name", "createdAt", "diskVirtualSize"],
            "description": "One complete backup, from its manifest's dev.paddock.backup.* annotations",
            "properties": {
                "reference": {"type": "string", "description": "registry/repository:tag"},
                "pinnedReference": {"type": "string", "description": "registry/repository@sha256:…, what a restore names"},
                "tag": {"type": "string"},
                "digest": {"type": "string"},
                "size": {"type": "integer", "description": "Bytes stored in the registry"},
                "namespace": {"type": "string", "description": "The backed-up VM's namespace"},
                "name": {"type": "string", "description": "The backed-up VM's name"},
                "createdAt": timestamp.clone(),
                "diskVirtualSize": {"type": "integer"},
                "displayName": {"type": "string"},
            },
        },
        "Image": {
            "type": "object", "required": ["digest", "image", "size", "importedAt", "recorded", "usedBy"],
            "description": "A base image in the local image store",
            "properties": {
                "digest": {"type": "string", "description": "sha256:… of the disk's content"},
                "image": {"type": "string", "example": "file:/srv/disks/debian.qcow2", "description": "What to write as spec.image.containerDisk to boot it: the source, or file:<stored copy> when the source is unknown"},
                "source": {"type": "string", "description": "Where it was first imported from: file:…, oci:… or a registry reference (absent when unknown)"},
                "format": {"type": "string", "enum": ["qcow2", "raw"]},
                "size": {"type": "integer", "description": "Bytes the stored copy takes"},
                "virtualSize": {"type": "integer", "description": "The disk's size as the guest sees it, in bytes"},
                "importedAt": timestamp.clone(),
                "recorded": {"type": "boolean", "description": "false for disks stored before paddock recorded sources: source and format are then derived"},
                "usedBy": {"type": "array", "items": {"type": "string"}, "description": "The VMs built on it, as namespace/name"},
            },
        },
        "Operation": {
            "type": "object", "required": ["id", "kind", "namespace", "name", "phase", "progress", "message", "startedAt"],
            "properties": {
                "id": {"type": "string"},
                "kind": {"type": "string", "enum": ["Backup", "Restore"]},
                "namespace": {"type": "string", "description": "The VM backed up, or created by the restore"},
                "name": {"type": "string"},
                "phase": {"type": "string", "enum": ["Running", "Succeeded", "Failed"]},
                "progress": {
                    "type": "object", "required": ["stage", "bytesDone", "bytesTotal"],
                    "properties": {
                        "stage": {"type": "string", "enum": ["Starting", "Exporting", "Compressing", "Uploading", "Pulling", "Done"]},
                        "bytesDone": {"type": "integer"},
                        "bytesTotal": {"type": "integer", "description": "0 when unknown"},
                        "percent": {"type": "integer", "minimum": 0, "maximum": 100, "description": "Absent when it cannot be estimated"},
                    },
                },
                "message": {"type": "string", "description": "What it does, or why it failed and what to do"},
                "startedAt": timestamp.clone(),
                "finishedAt": timestamp,
                "result": {"type": "string", "description": "Succeeded: the backup's registry/repository:tag, or the restored VM's namespace/name"},
                "backup": schema_ref("Backup"),
            },
        },
    })
}

fn parameters() -> Value {
    json!({
        "namespace": {"name": "namespace", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The VM's namespace (`default` unless its manifest names one)."},
        "name": {"name": "name", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The VM's name (metadata.name)."},
        "snapshot": {"name": "snapshot", "in": "path", "required": true, "schema": {"type": "string"}, "description": "The snapshot's name."},
    })
}

fn responses() -> Value {
    let error = |description: &str| json_response(description, schema_ref("Error"));
    json!({
        "BadRequest": error("The request is malformed (unparsable body, bad parameters); reason BadRequest"),
        "Unauthorized": error("No or a wrong access token; reason Unauthorized"),
        "Forbidden": json_response("The signed-in Kubernetes user lacks a permission; reason Forbidden, and `permission` names it", schema_ref("ForbiddenError")),
        "NotFound": error("No such VM, snapshot or route; reason NotFound"),
        "Conflict": error("Already exists (reason AlreadyExists) or not possible in the VM's current state (reason InvalidTransition); nothing changed"),
        "UnsupportedMediaType": error("The body's Content-Type is neither YAML nor JSON; reason UnsupportedMediaType"),
        "Unprocessable": error("Well-formed but invalid (reason InvalidSpec) or not supported by this backend (reason Unsupported); nothing changed"),
        "Internal": error("A failure on the server's machine (QEMU, tools, files); reason Internal"),
        "NotImplemented": error("This backend does not do this from the console; the message names the CLI command that does; reason NotImplemented"),
        "BadGateway": error("The registry cannot be reached, refuses the credentials or answered badly; reason BadGateway"),
    })
}

fn schemas() -> Value {
    let mut schemas = base_schemas();
    if let (Some(all), Value::Object(more)) = (schemas.as_object_mut(), backup_schemas()) {
        all.extend(more);
    }
    schemas
}

fn base_schemas() -> Value {
    let timestamp = json!({"type": "string", "format": "date-time", "description": "RFC 3339, UTC"});
    let phase = json!({"type": "string", "description": "KubeVirt's printable status; the local backend uses Stopped, Starting, Running, Paused, Stopping, CrashLoopBackOff and Failed", "enum": ["Stopped", "Provisioning", "Starting", "Running", "Paused", "Stopping", "Terminating", "Migrating", "CrashLoopBackOff", "Failed", "Unknown", "ErrorUnschedulable", "ErrImagePull", "ImagePullBackOff", "ErrorPvcNotFound", "DataVolumeError", "WaitingForVolumeBinding", "WaitingForReceiver"]});
    json!({
        "Error": {
            "type": "object", "required": ["code", "reason", "message"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status code"},
                "reason": {"type": "string", "enum": ["NotFound", "AlreadyExists", "InvalidTransition", "InvalidSpec", "Unsupported", "BadRequest", "Unauthorized", "Forbidden", "UnsupportedMediaType", "MethodNotAllowed", "LengthRequired", "Unavailable", "BadGateway", "NotImplemented", "GatewayTimeout", "Internal"]},
                "message": {"type": "string", "description": "What failed, why, and what to do"},
            },
        },
        "Upload": {
            "type": "object", "required": ["namespace", "name", "phase"],
            "properties": {
                "namespace": {"type": "string"},
                "name": {"type": "string", "description": "The DataVolume's name"},
                "phase": {"type": "string", "description": "CDI's DataVolume phase: UploadScheduled, UploadReady, ImportInProgress, Succeeded, Failed, …"},
                "progress": {"type": "string", "description": "CDI's status.progress, e.g. 100.0%"},
                "message": {"type": "string", "description": "CDI's first condition message"},
                "size": {"type": "string", "description": "The requested size"},
                "format": {"type": "string", "description": "After an upload: the disk's format from its header"},
                "bytesSent": {"type": "integer", "description": "After an upload: the bytes the proxy accepted"},
            },
        },
        "ConsoleAccess": {
            "type": "object", "required": ["serial", "vnc"],
            "properties": {
                "serial": schema_ref("ConsoleAccessEntry"),
                "vnc": schema_ref("ConsoleAccessEntry"),
            },
        },
        "ConsoleAccessEntry": {
            "type": "object", "required": ["allowed"],
            "properties": {
                "allowed": {"type": "boolean"},
                "permission": schema_ref("ForbiddenError/properties/permission"),
                "message": {"type": "string", "description": "When refused: who may not do what, and what to ask for"},
            },
        },
        "ForbiddenError": {
            "type": "object", "required": ["code", "reason", "message", "permission"],
            "properties": {
                "code": {"type": "integer", "example": 403},
                "reason": {"type": "string", "enum": ["Forbidden"]},
                "message": {"type": "string", "description": "The API server's or the access review's words, and what to ask for"},
                "permission": {
                    "type": "object", "required": ["verb", "group", "resource"],
                    "description": "The permission the user lacks, as an RBAC rule spells it",
                    "properties": {
                        "verb": {"type": "string", "example": "update"},
                        "group": {"type": "string", "example": "subresources.kubevirt.io"},
                        "resource": {"type": "string", "example": "virtualmachines"},
                        "subresource": {"type": "string", "example": "start"},
                        "namespace": {"type": "string"},
                        "name": {"type": "string"},
                    },
                },
            },
        },
        "Readiness": {
            "type": "object",
            "properties": {
                "status": {"type": "string", "enum": ["ready", "not ready"]},
                "backend": {"type": "string", "example": "local"},
                "checks": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"}, "message": {"type": "string"}}}},
            },
        },
        "VirtualMachineApp": {
            "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
            "description": "The paddock.dev/v1alpha1 VirtualMachineApp; `paddock crd` prints its full schema.",
            "properties": {
                "apiVersion": {"type": "string", "enum": ["paddock.dev/v1alpha1"]},
                "kind": {"type": "string", "enum": ["VirtualMachineApp"]},
                "metadata": {"type": "object", "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}}},
                "spec": {"type": "object"},
            },
        },
        "Vm": {
            "type": "object", "required": ["namespace", "name", "runStrategy", "createdAt", "console", "status", "snapshots", "manifest"],
            "properties": {
                "namespace": {"type": "string"},
                "name": {"type": "string"},
                "displayName": {"type": "string"},
                "runStrategy": {"type": "string", "enum": ["Always", "Halted", "Manual", "RerunOnFailure", "Once"]},
                "createdAt": timestamp,
                "console": {"type": "object", "properties": {"serial": {"type": "boolean"}, "vnc": {"type": "boolean"}}},
                "status": schema_ref("VmStatus"),
                "snapshots": {"type": "array", "items": schema_ref("Snapshot")},
                "manifest": schema_ref("VirtualMachineApp"),
            },
        },
        "VmStatus": {
            "type": "object", "required": ["phase", "restartCount"],
            "properties": {
                "phase": phase.clone(),
                "pid": {"type": "integer", "description": "The QEMU process (local backend)"},
                "accelerator": {"type": "string", "enum": ["kvm", "tcg"]},
                "startedAt": timestamp,
                "restartCount": {"type": "integer", "description": "Automatic restarts by the run strategy"},
                "lastExit": {
                    "type": "object",
                    "properties": {
                        "kind": {"type": "string", "enum": ["GuestShutdown", "Stopped", "Crashed", "Killed", "StartFailed"]},
                        "at": timestamp,
                        "message": {"type": "string"},
                    },
                },
                "message": {"type": "string"},
                "warnings": {"type": "array", "items": {"type": "string"}},
                "import": {
                    "type": "object", "required": ["state"],
                    "description": "The boot disk's import (Kubernetes: CDI, as the operator reports it in the VirtualMachineApp's status) while under way or after it failed; absent once imported, for disks never imported, and on the local backend",
                    "properties": {
                        "state": {"type": "string", "enum": ["Importing", "Failed"]},
                        "progress": {"type": "string", "description": "CDI's progress as reported, e.g. 42.50%"},
                        "percent": {"type": "number", "minimum": 0, "maximum": 100, "description": "The progress as a number, when it is a percentage"},
                        "message": {"type": "string", "description": "What is happening, or why the import failed and what to do"},
                    },
                },
            },
        },
        "Snapshot": {
            "type": "object", "required": ["name", "createdAt", "memory", "takenInPhase"],
            "properties": {
                "name": {"type": "string"},
                "createdAt": timestamp,
                "memory": {"type": "boolean", "description": "Holds memory and device state"},
                "takenInPhase": phase,
            },
        },
        "SnapshotRequest": {
            "type": "object", "required": ["name"], "additionalProperties": false,
            "properties": {
                "name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$", "description": "1 to 64 letters, digits, '-', '_', '.'; not only digits"},
                "memory": {"type": "boolean", "default": false},
            },
        },
        "Event": {
            "type": "object", "required": ["type"],
            "properties": {
                "type": {"type": "string", "enum": ["Changed", "SnapshotsChanged", "Deleted", "Lagged"]},
                "namespace": {"type": "string"},
                "name": {"type": "string"},
                "status": schema_ref("VmStatus"),
                "snapshots": {"type": "array", "items": schema_ref("Snapshot")},
                "missed": {"type": "integer", "description": "Lagged: how many events were missed"},
            },
        },
    })
}

fn schema_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/schemas/{name}")})
}

fn response_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/responses/{name}")})
}

fn parameter_ref(name: &str) -> Value {
    json!({"$ref": format!("#/components/parameters/{name}")})
}

fn list_of(schema: &str) -> Value {
    json!({"type": "object", "required": ["items"], "properties": {"items": {"type": "array", "items": schema_ref(schema)}}})
}

fn json_response(description: &str, schema: Value) -> Value {
    json!({"description": description, "content": {"application/json": {"schema": schema}}})
}
