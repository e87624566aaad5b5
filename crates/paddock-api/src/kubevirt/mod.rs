//! Typed KubeVirt objects paddock reads and writes, generated from the KubeVirt v1.9.0 CRDs by
//! `hack/generate-types.sh` (kopium). One module per kind; each kind's root type (e.g.
//! [`virtualmachine::VirtualMachine`]) implements [`kube::Resource`], so it works with `kube::Api`.
//!
//! Versions are the ones KubeVirt ≥ 1.6 serves: `kubevirt.io/v1`, `snapshot.kubevirt.io/v1beta1`,
//! `export.kubevirt.io/v1beta1`, `clone.kubevirt.io/v1beta1` and `instancetype.kubevirt.io/v1beta1`.
//!
//! The generated modules are not to be edited by hand; change the script and re-run it.

pub mod virtualmachine;
pub mod virtualmachineclone;
pub mod virtualmachineexport;
pub mod virtualmachineinstance;
pub mod virtualmachineinstancemigration;
pub mod virtualmachineinstancetype;
pub mod virtualmachinepreference;
pub mod virtualmachinerestore;
pub mod virtualmachinesnapshot;

/// The values of `VirtualMachine.spec.runStrategy` (and `status.runStrategy`), which the CRD types as
/// a plain string ([`virtualmachine::VirtualMachineSpec::run_strategy`]). The VirtualMachineApp uses the
/// same enum, so there is one definition of KubeVirt's run strategies.
pub use crate::app::RunStrategy;
