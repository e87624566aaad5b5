//! The generated KubeVirt and CDI types read realistic objects and write them back unchanged: no field
//! lost, no `null` invented (server-side apply would take a `null` as "remove this field").

#![cfg(test)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use paddock_api::cdi::datasource::DataSource;
use paddock_api::cdi::datavolume::{DataVolume, DataVolumeSpec};
use paddock_api::kubevirt::RunStrategy;
use paddock_api::kubevirt::virtualmachine::{VirtualMachine, VirtualMachineSpec};
use paddock_api::kubevirt::virtualmachineclone::VirtualMachineClone;
use paddock_api::kubevirt::virtualmachineexport::VirtualMachineExport;
use paddock_api::kubevirt::virtualmachineinstance::VirtualMachineInstance;
use paddock_api::kubevirt::virtualmachineinstancemigration::VirtualMachineInstanceMigration;
use paddock_api::kubevirt::virtualmachineinstancetype::VirtualMachineInstancetype;
use paddock_api::kubevirt::virtualmachinepreference::VirtualMachinePreference;
use paddock_api::kubevirt::virtualmachinerestore::VirtualMachineRestore;
use paddock_api::kubevirt::virtualmachinesnapshot::VirtualMachineSnapshot;
use pretty_assertions::assert_eq;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A KubeVirt-docs-style VM: containerDisk + cloudInitNoCloud + a dataVolumeTemplate from a registry,
/// with the status a running VM reports.
const VIRTUAL_MACHINE: &str = r#"
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: testvm
  namespace: vms
  labels:
    app.kubernetes.io/managed-by: paddock
  annotations:
    kubevirt.io/latest-observed-api-version: v1
spec:
  runStrategy: Always
  dataVolumeTemplates:
    - metadata:
        name: testvm-rootdisk
        labels:
          paddock.dev/disk: root
      spec:
        source:
          registry:
            url: docker://quay.io/containerdisks/fedora:40
            pullMethod: node
        storage:
          accessModes: [ReadWriteOnce]
          storageClassName: local-path
          volumeMode: Filesystem
          resources:
            requests:
              storage: 10Gi
  template:
    metadata:
      labels:
        kubevirt.io/domain: testvm
        kubevirt.io/size: small
      annotations:
        vm.kubevirt.io/os: fedora
    spec:
      terminationGracePeriodSeconds: 180
      evictionStrategy: LiveMigrate
      nodeSelector:
        kubernetes.io/arch: amd64
      domain:
        cpu:
          cores: 2
          sockets: 1
          threads: 1
        memory:
          guest: 2Gi
        resources:
          requests:
            memory: 2Gi
            cpu: 1
          limits:
            cpu: "2"
        firmware:
          bootloader:
            efi:
              secureBoot: false
        features:
          acpi: {}
          smm:
            enabled: true
        devices:
          autoattachGraphicsDevice: true
          rng: {}
          disks:
            - name: rootdisk
              bootOrder: 1
              disk:
                bus: virtio
            - name: containerdisk
              disk:
                bus: virtio
            - name: cloudinitdisk
              disk:
                bus: virtio
          interfaces:
            - name: default
              masquerade: {}
              ports:
                - name: ssh
                  port: 22
                  protocol: TCP
      networks:
        - name: default
          pod: {}
      volumes:
        - name: rootdisk
          dataVolume:
            name: testvm-rootdisk
        - name: containerdisk
          containerDisk:
            image: quay.io/kubevirt/cirros-container-disk-demo:v1.9.0
            imagePullPolicy: IfNotPresent
        - name: cloudinitdisk
          cloudInitNoCloud:
            userData: |-
              #cloud-config
              password: fedora
              chpasswd: { expire: False }
              ssh_pwauth: true
status:
  created: true
  ready: true
  printableStatus: Running
  runStrategy: Always
  desiredGeneration: 1
  observedGeneration: 1
  conditions:
    - type: Ready
      status: "True"
      lastProbeTime: null
      lastTransitionTime: "2026-01-10T09:00:00Z"
    - type: LiveMigratable
      status: "False"
      reason: DisksNotLiveMigratable
      message: cannot migrate VMI with a local-path PVC
      lastProbeTime: null
      lastTransitionTime: null
  volumeSnapshotStatuses:
    - name: rootdisk
      enabled: true
    - name: containerdisk
      enabled: false
      reason: Snapshot is not supported for this volumeSource type [containerdisk]
"#;

/// A DataVolume importing from a registry through the `storage` API (CDI picks the access and volume
/// mode from the StorageProfile), as the CDI controller reports it when done.
const DATA_VOLUME: &str = r#"
apiVersion: cdi.kubevirt.io/v1beta1
kind: DataVolume
metadata:
  name: fedora-root
  namespace: vms
  annotations:
    cdi.kubevirt.io/storage.bind.immediate.requested: "true"
spec:
  source:
    registry:
      url: docker://quay.io/containerdisks/fedora:40
      pullMethod: node
      certConfigMap: registry-ca
  storage:
    resources:
      requests:
        storage: 5Gi
    storageClassName: local-path
  contentType: kubevirt
  preallocation: false
status:
  claimName: fedora-root
  phase: Succeeded
  progress: 100.0%
  restartCount: 0
  conditions:
    - type: Bound
      status: "True"
      reason: Bound
      message: PVC fedora-root Bound
      lastHeartbeatTime: "2026-01-10T09:01:00Z"
      lastTransitionTime: "2026-01-10T09:01:00Z"
    - type: Ready
      status: "True"
      lastHeartbeatTime: "2026-01-10T09:03:00Z"
      lastTransitionTime: "2026-01-10T09:03:00Z"
"#;

fn yaml(text: &str) -> Value {
    serde_yaml::from_str(text).unwrap()
}

/// Drops `null` object members: reading turns an explicit `null` into `None`, which is then not
/// written, and for the API server the two mean the same.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

fn assert_no_nulls(value: &Value, path: &str) {
    match value {
        Value::Null => panic!("serialized a null at {path}"),
        Value::Object(map) => map
            .iter()
            .for_each(|(k, v)| assert_no_nulls(v, &format!("{path}.{k}"))),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(i, v)| assert_no_nulls(v, &format!("{path}[{i}]"))),
        _ => {}
    }
}

/// Reads `input` as `T`, writes it back, and checks nothing was lost or added.
fn round_trip<T: DeserializeOwned + Serialize>(input: &Value) -> T {
    let typed: T = serde_json::from_value(input.clone()).unwrap();
    let output = serde_json::to_value(&typed).unwrap();
    assert_no_nulls(&output, "$");
    assert_eq!(output, without_nulls(input));
    typed
}

#[test]
fn virtual_machine_round_trips_and_reads_typed() {
    let vm: VirtualMachine = round_trip(&yaml(VIRTUAL_MACHINE));

    assert_eq!(
        vm.spec.run_strategy.as_deref(),
        Some(RunStrategy::Always.as_str())
    );

    let template_labels = vm
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .as_ref()
        .unwrap();
    assert_eq!(template_labels["kubevirt.io/domain"], "testvm");

    let spec = vm.spec.template.spec.as_ref().unwrap();
    let memory = spec.domain.memory.as_ref().unwrap();
    assert_eq!(memory.guest, Some(IntOrString::String("2Gi".into())));
    let requests = spec.domain.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(requests["cpu"], IntOrString::Int(1));
    assert_eq!(requests["memory"], IntOrString::String("2Gi".into()));
    assert_eq!(spec.domain.cpu.as_ref().unwrap().cores, Some(2));
    assert_eq!(
        spec.domain.devices.interfaces.as_ref().unwrap()[0]
            .ports
            .as_ref()
            .unwrap()[0]
            .port,
        22
    );

    let volumes = spec.volumes.as_ref().unwrap();
    let container_disk = volumes[1].container_disk.as_ref().unwrap();
    assert_eq!(
        container_disk.image,
        "quay.io/kubevirt/cirros-container-disk-demo:v1.9.0"
    );
    let cloud_init = volumes[2].cloud_init_no_cloud.as_ref().unwrap();
    assert!(
        cloud_init
            .user_data
            .as_deref()
            .unwrap()
            .starts_with("#cloud-config\n")
    );
    assert_eq!(volumes[0].data_volume.as_ref().unwrap().name, "testvm-rootdisk");

    let dv_template = &vm.spec.data_volume_templates.as_ref().unwrap()[0];
    assert_eq!(
        dv_template.metadata.as_ref().unwrap().name.as_deref(),
        Some("testvm-rootdisk")
    );
    let registry = dv_template
        .spec
        .source
        .as_ref()
        .unwrap()
        .registry
        .as_ref()
        .unwrap();
    assert_eq!(
        registry.url.as_deref(),
        Some("docker://quay.io/containerdisks/fedora:40")
    );
    let storage = dv_template.spec.storage.as_ref().unwrap();
    let storage_requests = storage.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(storage_requests["storage"], IntOrString::String("10Gi".into()));

    let status = vm.status.as_ref().unwrap();
    assert_eq!(status.printable_status.as_deref(), Some("Running"));
    let conditions = status.conditions.as_ref().unwrap();
    assert_eq!(
        (conditions[0].r#type.as_str(), conditions[0].status.as_str()),
        ("Ready", "True")
    );
    assert_eq!(conditions[1].last_transition_time, None);
}

#[test]
fn data_volume_with_registry_source_and_storage_api_round_trips() {
    let dv: DataVolume = round_trip(&yaml(DATA_VOLUME));

    let registry = dv.spec.source.as_ref().unwrap().registry.as_ref().unwrap();
    assert_eq!(
        registry.url.as_deref(),
        Some("docker://quay.io/containerdisks/fedora:40")
    );
    assert_eq!(registry.pull_method.as_deref(), Some("node"));
    let storage = dv.spec.storage.as_ref().unwrap();
    assert_eq!(storage.storage_class_name.as_deref(), Some("local-path"));
    assert_eq!(
        storage.access_modes, None,
        "storage API: left to the StorageProfile"
    );
    let requests: &BTreeMap<String, IntOrString> =
        storage.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(requests["storage"], IntOrString::String("5Gi".into()));

    let status = dv.status.as_ref().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    assert_eq!(status.progress.as_deref(), Some("100.0%"));
    let bound = &status.conditions.as_ref().unwrap()[0];
    assert_eq!(bound.last_heartbeat_time.as_deref(), Some("2026-01-10T09:01:00Z"));
}

#[test]
fn a_virtual_machine_instance_with_null_condition_times_reads() {
    let vmi: VirtualMachineInstance = round_trip(&serde_json::json!({
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "testvm", "namespace": "vms"},
        "spec": {
            "domain": {"devices": {}, "memory": {"guest": "2Gi"}},
        },
        "status": {
            "phase": "Running",
            "nodeName": "node-1",
            "conditions": [
                {"type": "LiveMigratable", "status": "True", "lastProbeTime": null, "lastTransitionTime": null},
                {"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2026-01-10T09:02:00Z"},
            ],
            "interfaces": [{"name": "default", "ipAddress": "10.42.0.17", "mac": "02:00:00:00:00:01"}],
        },
    }));
    let status = vmi.status.unwrap();
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(status.conditions.unwrap().len(), 2);
}

#[test]
fn defaults_serialize_without_nulls() {
    let vm = VirtualMachine::new("empty", VirtualMachineSpec::default());
    let json = serde_json::to_value(&vm).unwrap();
    assert_no_nulls(&json, "$");
    assert_eq!(
        json,
        serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": "empty"},
            "spec": {"template": {}},
        })
    );

    let dv = DataVolume::new("empty", DataVolumeSpec::default());
    let json = serde_json::to_value(&dv).unwrap();
    assert_eq!(
        json,
        serde_json::json!({
            "apiVersion": "cdi.kubevirt.io/v1beta1",
            "kind": "DataVolume",
            "metadata": {"name": "empty"},
            "spec": {},
        })
    );
}

#[test]
fn snapshot_restore_export_clone_round_trip() {
    round_trip::<VirtualMachineSnapshot>(&yaml(
        r#"
apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineSnapshot
metadata: {name: snap-1, namespace: vms}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: testvm}
status:
  phase: Succeeded
  readyToUse: true
  virtualMachineSnapshotContentName: vmsnapshot-content-1
  conditions:
    - {type: Ready, status: "True", reason: Operation complete, lastProbeTime: null, lastTransitionTime: "2026-01-10T09:00:00Z"}
"#,
    ));
    round_trip::<VirtualMachineRestore>(&yaml(
        r#"
apiVersion: snapshot.kubevirt.io/v1beta1
kind: VirtualMachineRestore
metadata: {name: restore-1, namespace: vms}
spec:
  target: {apiGroup: kubevirt.io, kind: VirtualMachine, name: testvm}
  virtualMachineSnapshotName: snap-1
status:
  complete: true
"#,
    ));
    round_trip::<VirtualMachineExport>(&yaml(
        r#"
apiVersion: export.kubevirt.io/v1beta1
kind: VirtualMachineExport
metadata: {name: export-1, namespace: vms}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: testvm}
  tokenSecretRef: export-token
  ttlDuration: 2h
status:
  phase: Ready
  tokenSecretRef: export-token
"#,
    ));
    round_trip::<VirtualMachineClone>(&yaml(
        r#"
apiVersion: clone.kubevirt.io/v1beta1
kind: VirtualMachineClone
metadata: {name: clone-1, namespace: vms}
spec:
  source: {apiGroup: kubevirt.io, kind: VirtualMachine, name: testvm}
  target: {apiGroup: kubevirt.io, kind: VirtualMachine, name: testvm-copy}
  labelFilters: ["*", "!paddock.dev/*"]
status:
  phase: Succeeded
"#,
    ));
}

#[test]
fn kinds_use_the_api_versions_kubevirt_1_6_and_later_serve() {
    fn id<K: Resource<DynamicType = ()>>() -> (String, String) {
        (K::api_version(&()).into_owned(), K::plural(&()).into_owned())
    }
    let expected = [
        (id::<VirtualMachine>(), ("kubevirt.io/v1", "virtualmachines")),
        (
            id::<VirtualMachineInstance>(),
            ("kubevirt.io/v1", "virtualmachineinstances"),
        ),
        (
            id::<VirtualMachineInstanceMigration>(),
            ("kubevirt.io/v1", "virtualmachineinstancemigrations"),
        ),
        (
            id::<VirtualMachineSnapshot>(),
            ("snapshot.kubevirt.io/v1beta1", "virtualmachinesnapshots"),
        ),
        (
            id::<VirtualMachineRestore>(),
            ("snapshot.kubevirt.io/v1beta1", "virtualmachinerestores"),
        ),
        (
            id::<VirtualMachineExport>(),
            ("export.kubevirt.io/v1beta1", "virtualmachineexports"),
        ),
        (
            id::<VirtualMachineClone>(),
            ("clone.kubevirt.io/v1beta1", "virtualmachineclones"),
        ),
        (
            id::<VirtualMachineInstancetype>(),
            ("instancetype.kubevirt.io/v1beta1", "virtualmachineinstancetypes"),
        ),
        (
            id::<VirtualMachinePreference>(),
            ("instancetype.kubevirt.io/v1beta1", "virtualmachinepreferences"),
        ),
        (id::<DataVolume>(), ("cdi.kubevirt.io/v1beta1", "datavolumes")),
        (id::<DataSource>(), ("cdi.kubevirt.io/v1beta1", "datasources")),
    ];
    for ((api_version, plural), (want_api_version, want_plural)) in expected {
        assert_eq!(
            (api_version.as_str(), plural.as_str()),
            (want_api_version, want_plural)
        );
    }
}

#[test]
fn run_strategy_values() {
    for strategy in RunStrategy::ALL {
        assert_eq!(RunStrategy::from_wire(strategy.as_str()), Some(strategy));
        assert_eq!(strategy.as_str(), strategy.to_string());
    }
    assert_eq!(RunStrategy::from_wire("WaitAsReceiver"), None);
}
