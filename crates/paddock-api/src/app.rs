//! The `VirtualMachineApp` custom resource (paddock.dev/v1alpha1): the one manifest that describes a VM
//! for package authors and users who know neither Kubernetes nor KubeVirt.
//!
//! The doc comments on these types become the CRD's OpenAPI descriptions, so they are what
//! `kubectl explain virtualmachineapp.spec` prints: they are written for users, not for Rust readers.
//! Rules the API server can check on its own (exactly one image source, sane quantities, combinations
//! that cannot work) live here as CEL (`x-kubernetes-validations`); [`crate::validation`] repeats them
//! with friendlier messages and adds what CEL cannot express.

use k8s_openapi::apimachinery::pkg::{
    api::resource::Quantity,
    apis::meta::v1::{Condition, Time},
};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// The API group of paddock's own resources.
pub const GROUP: &str = "paddock.dev";
/// The served (and stored) version of `VirtualMachineApp`.
pub const VERSION: &str = "v1alpha1";

/// A virtual machine described for people who do not know KubeVirt: which disk image to boot, how big
/// the machine is, how it starts and how users reach its screen. paddock turns it into a KubeVirt
/// VirtualMachine, a CDI DataVolume for its disk and, where Baffles is installed, a BafflesApplication.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "paddock.dev",
    version = "v1alpha1",
    kind = "VirtualMachineApp",
    plural = "virtualmachineapps",
    singular = "virtualmachineapp",
    shortname = "vmapp",
    shortname = "vmapps",
    category = "paddock",
    namespaced,
    status = "VirtualMachineAppStatus",
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".spec.image.containerDisk","description":"The containerDisk image the VM boots from (empty for other sources)."}"#,
    printcolumn = r#"{"name":"Run strategy","type":"string","jsonPath":".spec.runStrategy","description":"When the VM runs."}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase","description":"Where the VM is in its life."}"#,
    printcolumn = r#"{"name":"Console","type":"string","jsonPath":".status.conditions[?(@.type==\"ConsoleReady\")].status","description":"Whether the VNC console can be opened."}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = kube::core::Rule::new("size(self.metadata.name) <= 58").message("metadata.name must be at most 58 characters: paddock appends '-disk' to it and the result must stay a valid DNS label (63 characters)"),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!has(self.resources) || !has(self.resources.instancetype) || (!has(self.resources.cpu) && !has(self.resources.memory))").message("set either resources.instancetype or resources.cpu/resources.memory, not both: the instancetype already sets CPU and memory"))]
#[x_kube(validation = kube::core::Rule::new("!self.image.persistent || !(has(self.image.containerDisk) || has(self.image.http) || has(self.image.upload)) || (has(self.disk) && has(self.disk.size))").message("disk.size is required to import the image into a persistent volume: set it to at least the image's virtual size, e.g. 10Gi"))]
#[x_kube(validation = kube::core::Rule::new("self.image.persistent || has(self.image.containerDisk) || has(self.image.pvc)").message("image.persistent: false works only with image.containerDisk or image.pvc; http, dataSource and upload images are always imported into a persistent volume"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.firmware) || !has(self.firmware.secureBoot) || !self.firmware.secureBoot || self.firmware.type == 'uefi'").message("firmware.secureBoot needs firmware.type: uefi"))]
pub struct VirtualMachineAppSpec {
    /// A human-friendly name shown in consoles and in Baffles, e.g. "Windows 10 workstation".
    /// Defaults to the object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,

    /// What this VM is for, shown in consoles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,

    /// Where the VM's boot disk comes from. Exactly one source must be set.
    pub image: ImageSpec,

    /// How much CPU and memory the VM gets: either `cpu` and `memory`, or a KubeVirt instancetype
    /// (and optionally a preference). Defaults to 1 core and 1Gi of memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourcesSpec>,

    /// The VM's boot disk volume: its size and storage class. Needed when the image is imported into a
    /// persistent volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskSpec>,

    /// The firmware the VM boots with: legacy BIOS (the default) or UEFI, optionally with Secure Boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firmware: Option<FirmwareSpec>,

    /// First-boot configuration handed to cloud-init (NoCloud) inside the guest: user data, network
    /// data and SSH keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInitSpec>,

    /// When the VM runs, with KubeVirt's meaning: `Always` keeps it running and restarts it when it
    /// stops or crashes (the default, so a deployed package starts by itself); `Halted` keeps it stopped;
    /// `Manual` starts and stops it only on request; `RerunOnFailure` restarts it only when it fails;
    /// `Once` runs it to completion once.
    #[serde(default)]
    pub run_strategy: RunStrategy,

    /// How users reach the VM's screen and serial console, and whether it is listed in Baffles.
    #[serde(default)]
    pub console: ConsoleSpec,

    /// Scheduled snapshots of the VM. Absent means no scheduled snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<SnapshotPolicy>,

    /// Scheduled backups of the VM's disk and definition to an OCI registry, with retention. Absent
    /// means no scheduled backups. Set the annotation `paddock.dev/backup-now` to any new value (e.g.
    /// the current time) to request a backup at once, also while the schedule is suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupPolicy>,
}

/// Where the VM's boot disk comes from. Exactly one of `containerDisk`, `http`, `dataSource`, `pvc` or
/// `upload` must be set.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("[has(self.containerDisk), has(self.http), has(self.dataSource), has(self.pvc), has(self.upload)].filter(x, x).size() == 1").message("set exactly one image source: containerDisk, http, dataSource, pvc or upload"))]
pub struct ImageSpec {
    /// An OCI image reference of a containerDisk image, e.g. `registry.example.com/vms/debian:12`, as
    /// `paddock package` builds it (one layer with `disk/disk.img`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    #[x_kube(validation = kube::core::Rule::new("size(self) > 0 && !self.contains(' ') && !self.contains('://')").message("containerDisk must be an image reference such as registry.example.com/vms/debian:12, without a scheme like docker://"))]
    pub container_disk: Option<String>,

    /// Download the disk from an HTTP(S) URL. qcow2, raw, vmdk, vdi, vhd(x) and iso files are accepted,
    /// optionally gz or xz compressed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpImageSource>,

    /// Clone the disk from a CDI DataSource (a "golden image" kept up to date by the platform).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_source: Option<DataSourceImageSource>,

    /// Use an existing PersistentVolumeClaim in the VM's namespace. With `persistent: true` the VM gets
    /// its own clone of it; with `persistent: false` the VM runs on a throw-away overlay of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcImageSource>,

    /// Wait for the disk to be uploaded (`paddock upload` or the console's upload page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadImageSource>,

    /// `true` (the default) imports the image into a persistent volume the VM owns, so changes to the
    /// disk survive restarts. `false` boots from the image directly and loses every change when the VM
    /// stops (containerDisk and pvc images only).
    #[serde(default = "default_true")]
    pub persistent: bool,
}

/// An HTTP(S) download of the disk image.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct HttpImageSource {
    /// The URL of the disk image, `http://` or `https://`.
    #[schemars(length(max = 8192))]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("http.url must start with http:// or https://"))]
    pub url: String,

    /// The expected checksum of the downloaded file as `<algorithm>:<hex>`, e.g. `sha256:9f86d0…`.
    /// The import fails when the download does not match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}|md5:[0-9a-f]{32}|sha1:[0-9a-f]{40})$')").message("http.checksum must look like sha256:<64 lowercase hex digits> (sha512, sha1 and md5 also work)"))]
    pub checksum: Option<String>,
}

/// A reference to a CDI DataSource.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DataSourceImageSource {
    /// The DataSource's name.
    pub name: String,
    /// The DataSource's namespace; defaults to the VM's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// A reference to a PersistentVolumeClaim in the VM's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PvcImageSource {
    /// The PersistentVolumeClaim's name.
    pub name: String,
}

/// The disk is uploaded after the VirtualMachineApp is created. It has no fields.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct UploadImageSource {}

/// CPU and memory, or a KubeVirt instancetype.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesSpec {
    /// Number of virtual CPU cores (1 to 512).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 512").message("resources.cpu must be between 1 and 512 cores"))]
    pub cpu: Option<u32>,

    /// Guest memory, e.g. `2Gi` (at least 16Mi, at most 16Ti).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("isQuantity(string(self)) && quantity(string(self)).compareTo(quantity('16Mi')) >= 0 && quantity(string(self)).compareTo(quantity('16Ti')) <= 0").message("resources.memory must be a quantity of at least 16Mi, e.g. 2Gi"))]
    pub memory: Option<Quantity>,

    /// A KubeVirt instancetype that sets CPU and memory, e.g. `u1.medium`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instancetype: Option<InstancetypeReference>,

    /// A KubeVirt preference that sets preferred devices and firmware, e.g. `fedora`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<InstancetypeReference>,
}

/// A reference to a KubeVirt instancetype or preference.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct InstancetypeReference {
    /// The instancetype's or preference's name.
    pub name: String,
    /// `cluster` (the default) for a VirtualMachineClusterInstancetype/ClusterPreference,
    /// `namespaced` for one in the VM's namespace.
    #[serde(default)]
    pub scope: ReferenceScope,
}

/// Whether an instancetype or preference is cluster-wide or namespaced.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum ReferenceScope {
    /// A cluster-wide VirtualMachineClusterInstancetype or VirtualMachineClusterPreference.
    #[default]
    Cluster,
    /// A VirtualMachineInstancetype or VirtualMachinePreference in the VM's namespace.
    Namespaced,
}

/// The VM's boot disk volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct DiskSpec {
    /// The volume's size, e.g. `20Gi`. It must be at least the image's virtual size; the guest sees
    /// the extra room as free disk space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('1Mi'))").message("disk.size must be a quantity larger than 1Mi, e.g. 20Gi"))]
    pub size: Option<Quantity>,

    /// The StorageClass of the volume. Defaults to the cluster's default class; CDI's StorageProfile for
    /// the class fills in access and volume modes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
}

/// The firmware the VM boots with.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct FirmwareSpec {
    /// `bios` (the default) or `uefi`.
    #[serde(default, rename = "type")]
    pub kind: FirmwareKind,
    /// Turn on UEFI Secure Boot (needs `type: uefi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_boot: Option<bool>,
}

/// Legacy BIOS or UEFI.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub enum FirmwareKind {
    /// Legacy BIOS (SeaBIOS).
    #[default]
    Bios,
    /// UEFI (OVMF).
    Uefi,
}

/// cloud-init NoCloud configuration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("!(has(self.userData) && has(self.userDataSecretRef))").message("set cloudInit.userData or cloudInit.userDataSecretRef, not both"))]
pub struct CloudInitSpec {
    /// cloud-init user data, usually starting with `#cloud-config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,

    /// The name of a Secret in the VM's namespace whose `userdata` key holds the user data (for user
    /// data with passwords or keys that should not sit in the manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_data_secret_ref: Option<String>,

    /// cloud-init network configuration (version 1 or 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_data: Option<String>,

    /// SSH public keys allowed to log in to the default user, e.g. `ssh-ed25519 AAAA… alice@laptop`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub ssh_keys: Vec<String>,
}

/// KubeVirt's run strategies.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub enum RunStrategy {
    /// Keep the VM running; restart it whenever it stops.
    #[default]
    Always,
    /// Keep the VM stopped.
    Halted,
    /// Start and stop only on request; a crashed VM stays stopped.
    Manual,
    /// Restart the VM only when it fails; a clean guest shutdown stops it.
    RerunOnFailure,
    /// Run the VM once, to completion.
    Once,
}

impl RunStrategy {
    /// Every run strategy, in the order KubeVirt documents them.
    pub const ALL: [Self; 5] = [
        Self::Always,
        Self::Halted,
        Self::Manual,
        Self::RerunOnFailure,
        Self::Once,
    ];

    /// The name KubeVirt uses for this strategy (the wire value of `VirtualMachine.spec.runStrategy`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::Halted => "Halted",
            Self::Manual => "Manual",
            Self::RerunOnFailure => "RerunOnFailure",
            Self::Once => "Once",
        }
    }

    /// Parses a wire value; `None` for a value KubeVirt v1.9 does not define.
    pub fn from_wire(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|strategy| strategy.as_str() == value)
    }
}

impl std::fmt::Display for RunStrategy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// How users reach the VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConsoleSpec {
    /// Attach a graphics device so the VM's screen can be opened over VNC (default true).
    #[serde(default = "default_true")]
    pub vnc: bool,
    /// Attach a serial console (default true).
    #[serde(default = "default_true")]
    pub serial: bool,
    /// List the VM in Baffles so its users find it and open its screen.
    #[serde(default)]
    pub baffles: BafflesSpec,
}

impl Default for ConsoleSpec {
    fn default() -> Self {
        ConsoleSpec {
            vnc: true,
            serial: true,
            baffles: BafflesSpec::default(),
        }
    }
}

/// Listing in Baffles (app.baffles.dev).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BafflesSpec {
    /// Create a BafflesApplication for this VM when Baffles is installed and VNC is on (default true).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The name shown in Baffles; defaults to `displayName`, then to the object's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The Baffles category (default `vm`).
    #[serde(default = "default_category")]
    pub category: String,
}

impl Default for BafflesSpec {
    fn default() -> Self {
        BafflesSpec {
            enabled: true,
            display_name: None,
            category: default_category(),
        }
    }
}

/// Scheduled snapshots.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotPolicy {
    /// When to take a snapshot, as a five-field cron expression in UTC, e.g. `0 3 * * *` for 03:00
    /// every day.
    #[schemars(length(max = 128))]
    #[x_kube(validation = kube::core::Rule::new("self.split(' ').filter(f, f != '').size() == 5 || self.startsWith('@')").message("snapshots.schedule must be a five-field cron expression such as '0 3 * * *' (minute hour day-of-month month day-of-week) or a macro such as @daily"))]
    pub schedule: String,
    /// How many scheduled snapshots to keep; older ones are deleted (default 7).
    #[serde(default = "default_keep")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 1000").message("snapshots.keep must be between 1 and 1000"))]
    pub keep: u32,
}

/// Scheduled backups to an OCI registry: each backup is the VM's disk as a containerDisk image tagged
/// `<vm>-<UTC time>` in `repository`, with this VirtualMachineApp in the image's annotations (the
/// format of `paddock backup`), so it can be restored in any cluster or locally.
///
/// Why a field of the VirtualMachineApp and not a separate BackupPolicy resource: a policy applies
/// to exactly one VM and lives and dies with it (like `snapshots`), it travels with the VM's
/// definition into its backups, restores and moves, one `kubectl apply` of one manifest sets up a VM
/// with its protection, and the backup's outcome belongs in the VM's own status and Events where
/// users and consoles already look. A separate resource would add a second object to keep in sync
/// and permissions to grant, for a one-to-one relation.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackupPolicy {
    /// When to back up, as a five-field cron expression in UTC, e.g. `0 2 * * *` for 02:00 every
    /// day, or a macro such as `@daily`. A running VM is snapshotted first and the snapshot is
    /// backed up. Times missed while the operator was down are caught up with one backup, not one
    /// per missed time; a failed backup is tried again at the next scheduled time.
    #[schemars(length(max = 128))]
    #[x_kube(validation = kube::core::Rule::new("self.split(' ').filter(f, f != '').size() == 5 || self.startsWith('@')").message("backup.schedule must be a five-field cron expression such as '0 2 * * *' (minute hour day-of-month month day-of-week) or a macro such as @daily"))]
    pub schedule: String,

    /// How many of this VM's backups to keep in the repository; after each successful backup the
    /// oldest beyond this number are deleted from the registry (default 7). Backups made by hand
    /// with `paddock backup create` count too.
    #[serde(default = "default_keep")]
    #[x_kube(validation = kube::core::Rule::new("self >= 1 && self <= 1000").message("backup.keep must be between 1 and 1000"))]
    pub keep: u32,

    /// The registry repository the backups are pushed to, without tag or scheme, e.g.
    /// `registry.example.com/backups/web`. For pruning, the registry must allow deleting manifests
    /// (docker-registry: `REGISTRY_STORAGE_DELETE_ENABLED=true`).
    #[schemars(length(max = 1024))]
    #[x_kube(validation = kube::core::Rule::new("size(self) > 0 && !self.contains(' ') && !self.contains('://') && !self.contains('@')").message("backup.repository must be a registry repository such as registry.example.com/backups/web, without a scheme like https:// and without a digest"))]
    pub repository: String,

    /// The name of a Secret of type `kubernetes.io/dockerconfigjson` in the VM's namespace with
    /// credentials for the registry (as `kubectl create secret docker-registry` makes it). Absent
    /// means the registry is used without credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub credentials_secret: Option<String>,

    /// Speak plain HTTP to the registry instead of HTTPS: only for a registry on loopback or inside
    /// the cluster network (e.g. Zarf's in-cluster registry). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,

    /// Stop taking scheduled backups (requested ones, through the `paddock.dev/backup-now`
    /// annotation, still run). Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

/// What the operator last did for `spec.backup` (or for a requested backup).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackupStatus {
    /// The scheduled time the last scheduled backup was taken for (successful or not); the next
    /// scheduled backup comes after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,

    /// When the next scheduled backup is due (absent while the schedule is suspended or invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<Time>,

    /// The last successful backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup: Option<BackupRecord>,

    /// The last failed backup (kept after later successes, for reference).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<BackupFailure>,

    /// The value of the `paddock.dev/backup-now` annotation last acted on: a backup is requested
    /// by setting the annotation to a value different from this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_request: Option<String>,
}

/// A successful backup.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupRecord {
    /// When the backup finished.
    pub time: Time,
    /// The backup pinned by digest, `registry/repository@sha256:…`: what `paddock backup restore`
    /// takes.
    pub reference: String,
    /// The backup's tag, `<vm>-<UTC time>`.
    pub tag: String,
    /// How long the backup took, in seconds.
    #[serde(default)]
    pub duration_seconds: u64,
}

/// A failed backup.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackupFailure {
    /// When the backup failed.
    pub time: Time,
    /// What failed and what to do.
    pub message: String,
}

/// The observed state of a VirtualMachineApp, written by the operator (or the local runtime).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineAppStatus {
    /// Where the VM is in its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Ready, DiskReady, ConsoleReady and BafflesRegistered (and SnapshotsHealthy, BackupSucceeded
    /// when those are configured), each True/False/Unknown with a reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,

    /// Progress of the disk import as CDI reports it, e.g. `42.50%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_progress: Option<String>,

    /// Where the VM's VNC console is reached (the URL Baffles opens).
    #[serde(default, rename = "consoleURL", skip_serializing_if = "Option::is_none")]
    pub console_url: Option<String>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Scheduled and requested backups: the last one, the last failure and when the next is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupStatus>,
}

/// Where a VM is in its life.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Accepted, nothing started yet.
    Pending,
    /// The disk is being imported.
    Importing,
    /// The VM is booting.
    Starting,
    /// The VM is running.
    Running,
    /// The VM is stopped.
    Stopped,
    /// The VM is paused.
    Paused,
    /// The VM is moving to another node.
    Migrating,
    /// Something failed; see the conditions.
    Failed,
}

/// Names of the conditions paddock reports.
pub mod condition {
    /// The VM is running and its disk and console are ready.
    pub const READY: &str = "Ready";
    /// The boot disk has been imported.
    pub const DISK_READY: &str = "DiskReady";
    /// The VNC console can be opened.
    pub const CONSOLE_READY: &str = "ConsoleReady";
    /// The VM is listed in Baffles.
    pub const BAFFLES_REGISTERED: &str = "BafflesRegistered";
    /// The last backup (scheduled or requested) succeeded (only on apps with `spec.backup` or a
    /// requested backup).
    pub const BACKUP_SUCCEEDED: &str = "BackupSucceeded";
}

/// The annotation that requests a backup now: set it to any value different from
/// `status.backup.lastRequest`, e.g. `kubectl annotate vmapp web paddock.dev/backup-now="$(date -u +%FT%TZ)" --overwrite`.
pub const BACKUP_NOW_ANNOTATION: &str = "paddock.dev/backup-now";

impl ImageSpec {
    /// The image sources that are set, by field name. A valid spec has exactly one.
    pub fn sources_set(&self) -> Vec<&'static str> {
        let mut sources = Vec::new();
        if self.container_disk.is_some() {
            sources.push("containerDisk");
        }
        if self.http.is_some() {
            sources.push("http");
        }
        if self.data_source.is_some() {
            sources.push("dataSource");
        }
        if self.pvc.is_some() {
            sources.push("pvc");
        }
        if self.upload.is_some() {
            sources.push("upload");
        }
        sources
    }
}

fn default_true() -> bool {
    true
}

fn default_category() -> String {
    "vm".to_owned()
}

fn default_keep() -> u32 {
    7
}

/// Conditions are a list keyed by `type`, so server-side apply merges them per condition.
fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".to_owned(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".to_owned(),
        serde_json::json!(["type"]),
    );
    schema
}
