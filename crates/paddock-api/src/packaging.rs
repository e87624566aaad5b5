//! The VirtualMachineApp that `paddock package` writes next to a containerDisk image.
//!
//! Role: a pure builder from what packaging learned about a disk (its image reference, virtual size,
//! and the CPU, memory and firmware an OVF asked for) to a valid [`VirtualMachineApp`], so a Zarf
//! package (or a user) deploys the VM without writing YAML by hand.
//!
//! Contract: the result passes [`crate::validation::validate`] or the builder returns its
//! violations; nothing here reads files or talks to a cluster. The disk is imported into a
//! persistent volume (`image.persistent: true`, the CRD default) sized to the disk's virtual size
//! rounded up to whole GiB, because a volume smaller than the virtual size fails the CDI import.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::app::{
    ConsoleSpec, DiskSpec, FirmwareKind, FirmwareSpec, ImageSpec, ResourcesSpec, RunStrategy,
    VirtualMachineApp, VirtualMachineAppSpec,
};
use crate::quantity::format_binary;
use crate::validation::{InvalidSpec, validate};

/// CPUs a packaged VM gets when the source says nothing (KubeVirt's own default is one).
pub const DEFAULT_CPU: u32 = 1;
/// Memory a packaged VM gets when the source says nothing: enough for a small server distribution.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

const GIB: u64 = 1 << 30;

/// What packaging knows about the VM; every `None` takes paddock's default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackagedDisk {
    /// `metadata.name` of the VirtualMachineApp (a DNS label of at most 58 characters).
    pub name: String,
    /// `metadata.namespace`; `None` leaves it to `kubectl`/Zarf (the manifest's target namespace).
    pub namespace: Option<String>,
    /// A human-friendly name (an OVF's VirtualSystem name, say).
    pub display_name: Option<String>,
    /// The containerDisk image reference, as users pull it (`registry/repository:tag`).
    pub image_reference: String,
    /// The disk's virtual size in bytes (what the guest sees).
    pub virtual_size_bytes: u64,
    /// Number of virtual CPUs.
    pub cpu: Option<u32>,
    /// Memory in bytes.
    pub memory_bytes: Option<u64>,
    /// BIOS or UEFI.
    pub firmware: Option<FirmwareKind>,
    /// When the VM runs; the CRD's default (`Always`) when `None`.
    pub run_strategy: Option<RunStrategy>,
}

/// The smallest whole number of GiB that holds `bytes`, at least 1 GiB.
pub fn round_up_to_gibibytes(bytes: u64) -> u64 {
    bytes.div_ceil(GIB).max(1) * GIB
}

/// Builds the VirtualMachineApp for a packaged disk, validated.
pub fn virtual_machine_app(disk: &PackagedDisk) -> Result<VirtualMachineApp, InvalidSpec> {
    let memory = disk.memory_bytes.unwrap_or(DEFAULT_MEMORY_BYTES);
    let spec = VirtualMachineAppSpec {
        display_name: disk.display_name.clone(),
        description: None,
        image: ImageSpec {
            container_disk: Some(disk.image_reference.clone()),
            persistent: true,
            ..ImageSpec::default()
        },
        resources: Some(ResourcesSpec {
            cpu: Some(disk.cpu.unwrap_or(DEFAULT_CPU)),
            memory: Some(Quantity(format_binary(u128::from(memory)))),
            instancetype: None,
            preference: None,
        }),
        disk: Some(DiskSpec {
            size: Some(Quantity(format_binary(u128::from(round_up_to_gibibytes(
                disk.virtual_size_bytes,
            ))))),
            storage_class: None,
        }),
        firmware: disk.firmware.map(|kind| FirmwareSpec {
            kind,
            secure_boot: None,
        }),
        cloud_init: None,
        run_strategy: disk.run_strategy.unwrap_or_default(),
        console: ConsoleSpec::default(),
        snapshots: None,
        backup: None,
    };
    let app = VirtualMachineApp {
        metadata: ObjectMeta {
            name: Some(disk.name.clone()),
            namespace: disk.namespace.clone(),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    };
    validate(&app)?;
    Ok(app)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    fn packaged() -> PackagedDisk {
        PackagedDisk {
            name: "tiny".into(),
            namespace: Some("vms".into()),
            display_name: Some("Tiny test VM".into()),
            image_reference: "registry.example:5000/vms/tiny:1.0".into(),
            virtual_size_bytes: 48 << 20,
            cpu: None,
            memory_bytes: None,
            firmware: None,
            run_strategy: None,
        }
    }

    #[test]
    fn defaults_give_a_valid_persistent_vm() {
        let app = virtual_machine_app(&packaged()).unwrap();
        let expected: serde_json::Value = serde_yaml::from_str(
            r#"
apiVersion: paddock.dev/v1alpha1
kind: VirtualMachineApp
metadata:
  name: tiny
  namespace: vms
spec:
  displayName: Tiny test VM
  image:
    containerDisk: registry.example:5000/vms/tiny:1.0
    persistent: true
  resources:
    cpu: 1
    memory: 1Gi
  disk:
    size: 1Gi
  runStrategy: Always
  console:
    vnc: true
    serial: true
    baffles:
      enabled: true
      category: vm
"#,
        )
        .unwrap();
        assert_eq!(serde_json::to_value(&app).unwrap(), expected);
    }

    #[test]
    fn ovf_hints_and_size_rounding() {
        let app = virtual_machine_app(&PackagedDisk {
            virtual_size_bytes: 10 * GIB + 1,
            cpu: Some(4),
            memory_bytes: Some(4096 << 20),
            firmware: Some(FirmwareKind::Uefi),
            run_strategy: Some(RunStrategy::Manual),
            ..packaged()
        })
        .unwrap();
        let value = serde_json::to_value(&app).unwrap();
        assert_eq!(value["spec"]["disk"]["size"], "11Gi");
        assert_eq!(value["spec"]["resources"]["cpu"], 4);
        assert_eq!(value["spec"]["resources"]["memory"], "4Gi");
        assert_eq!(value["spec"]["firmware"]["type"], "uefi");
        assert_eq!(value["spec"]["runStrategy"], "Manual");
    }

    #[test]
    fn invalid_names_and_references_are_reported() {
        let error = virtual_machine_app(&PackagedDisk {
            name: "Not_A_Label".into(),
            image_reference: "no spaces allowed".into(),
            ..packaged()
        })
        .unwrap_err();
        let fields: Vec<&str> = error.violations.iter().map(|v| v.field.as_str()).collect();
        assert!(fields.contains(&"metadata.name"), "{fields:?}");
        assert!(fields.contains(&"spec.image.containerDisk"), "{fields:?}");
    }

    #[test]
    fn rounding() {
        assert_eq!(round_up_to_gibibytes(0), GIB);
        assert_eq!(round_up_to_gibibytes(GIB), GIB);
        assert_eq!(round_up_to_gibibytes(GIB + 1), 2 * GIB);
    }
}
