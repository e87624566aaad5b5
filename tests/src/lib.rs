//! Test support shared by paddock's integration and end-to-end tests.
//!
//! Everything here starts or reads *real* components (QEMU, the test disk, the schemas under
//! `../shared/schemas/`). Nothing in this crate is shipped; it is a dev-dependency only.

pub mod cluster;
pub mod paths;
pub mod processes;
pub mod qemu;
pub mod registry;
pub mod registry_crash;
pub mod schema;
pub mod testdisk;
pub mod vncdotool;
pub mod world;
pub mod zarf;
