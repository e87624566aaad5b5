//! paddock's API: the `VirtualMachineApp` custom resource (paddock.dev/v1alpha1), the KubeVirt, CDI and
//! Baffles types paddock reads and writes, and pure builders that turn a `VirtualMachineApp` into the
//! desired KubeVirt, CDI and Baffles objects.
//!
//! Contract: nothing in this crate performs I/O or talks to a cluster. Builders are pure functions of
//! their inputs, so the operator, the local runtime and the tests all share one definition of "desired".

pub mod app;
pub mod baffles;
pub mod builders;
pub mod cdi;
pub mod image_reference;
pub mod kubevirt;
pub mod packaging;
pub mod quantity;
pub mod schedule;
pub mod validation;
pub mod zarf;
