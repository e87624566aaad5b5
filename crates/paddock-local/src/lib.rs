//! The QEMU/KVM runtime: QMP, disks, snapshots, VNC.
//!
//! Role: run paddock VMs on this machine, without a cluster, from the same manifest the operator
//! deploys to KubeVirt.
//!
//! Contract so far: [`qmp`] is the async client for QEMU's machine protocol that every other part
//! of the runtime drives QEMU through. Disks, snapshots and VNC arrive with their issues.

pub mod qmp;
