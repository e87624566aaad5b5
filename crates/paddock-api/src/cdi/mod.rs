//! Typed CDI (Containerized Data Importer) objects paddock reads and writes.
//!
//! [`datavolume`] and [`datasource`] are generated from the CDI v1.66.0 CRDs (`cdi.kubevirt.io/v1beta1`)
//! by `hack/generate-types.sh` (kopium) and are not to be edited by hand. [`upload`] is hand-written:
//! `UploadTokenRequest` is served by CDI's aggregated API server, not by a CRD.

pub mod datasource;
pub mod datavolume;
pub mod upload;
