//! Pure builders: the KubeVirt VirtualMachine (with its CDI dataVolumeTemplate), the SSH-key Secret and
//! the BafflesApplication that a `VirtualMachineApp` should have, given what the operator knows about the
//! cluster ([`ClusterFacts`]).
//!
//! Contract: [`desired`] is a pure function. Same inputs, same objects — names are derived from the
//! app's name, never random — so the operator can server-side apply the result on every reconcile and
//! tests can compare it against golden YAML. Every object carries paddock's labels and a controller
//! owner reference to the app, so deleting the app lets Kubernetes' garbage collector remove them.
//!
//! Choices worth knowing:
//! - The disk is a DataVolume owned by the app, not a `dataVolumeTemplate` of the VM: KubeVirt v1.9's
//!   VirtualMachine schema carries an older copy of CDI's API and would prune fields paddock uses (the
//!   HTTP `checksum`), the operator reads import progress from its own child, and the disk is imported
//!   even while the VM is `Halted` (CDI is asked to bind at once, also on WaitForFirstConsumer
//!   storage), so the first start is quick. The VM's volume names the DataVolume and KubeVirt waits
//!   for it.
//! - The VM always gets `runStrategy`, never the deprecated `running`.
//! - With Zarf in the cluster, a persistent containerDisk imports with CDI's `registry` source and
//!   `pullMethod: node`: the importer pod then runs the image itself, and the Zarf agent rewrites that
//!   pod's image to the Zarf registry like any other pod's, with Zarf's own pull credentials. The URL is
//!   left untouched. Ephemeral containerDisk volumes are likewise left to the Zarf agent, which rewrites
//!   the virt-launcher pod.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::Secret,
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, OwnerReference},
        util::intstr::IntOrString,
    },
};
use kube::Resource;
use thiserror::Error;

use crate::{
    app::{FirmwareKind, ReferenceScope, VirtualMachineApp},
    baffles::{BafflesApplication, BafflesApplicationSpec},
    cdi::datavolume::{
        DataVolume, DataVolumeSource, DataVolumeSourceHttp, DataVolumeSourcePvc, DataVolumeSourceRef,
        DataVolumeSourceRegistry, DataVolumeSourceUpload, DataVolumeSpec, DataVolumeStorage,
        DataVolumeStorageResources,
    },
    image_reference::ImageReference,
    kubevirt::virtualmachine as vm,
    validation::{InvalidSpec, validate},
};

/// The label every object paddock creates carries, with value [`MANAGER`].
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// paddock's name as a manager (label value and server-side apply field manager).
pub const MANAGER: &str = "paddock";
/// The label naming the VirtualMachineApp an object belongs to.
pub const APP_LABEL: &str = "paddock.dev/app";
/// The name of the VM's boot disk in its domain, and the suffix of its DataVolume's name.
pub const ROOT_DISK: &str = "rootdisk";
/// The name of the cloud-init disk in the VM's domain.
pub const CLOUD_INIT_DISK: &str = "cloudinitdisk";
/// CDI's annotation asking to bind (and so import) a DataVolume before a VM consumes it.
pub const IMMEDIATE_BINDING_ANNOTATION: &str = "cdi.kubevirt.io/storage.bind.immediate.requested";
/// The memory a VM gets when the app sets neither memory nor an instancetype.
pub const DEFAULT_MEMORY: &str = "1Gi";
/// The cores a VM gets when the app sets neither cpu nor an instancetype.
pub const DEFAULT_CPU_CORES: u32 = 1;

/// What the operator has discovered about the cluster, the only input besides the app.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterFacts {
    /// The Zarf registry, when Zarf is installed (its `zarf-state` secret exists).
    pub zarf: Option<ZarfRegistry>,
    /// Whether the BafflesApplication CRD (app.baffles.dev/v1) is installed.
    pub baffles_installed: bool,
    /// The base URL that reaches the KubeVirt VNC subresource path for Baffles, e.g.
    /// `wss://console.example.com` (the paddock console, which proxies `/k8s/apis/...`).
    pub console_gateway_url: String,
    /// The StorageClass to use when an app names none (`None` leaves it to the cluster's default).
    pub default_storage_class: Option<String>,
}

/// The Zarf registry as the `zarf-state` secret describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZarfRegistry {
    /// The registry address, e.g. `127.0.0.1:31999`.
    pub address: String,
}

/// The objects a VirtualMachineApp should have.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// The CDI DataVolume the boot disk is imported into, unless the VM boots from an ephemeral volume.
    pub data_volume: Option<DataVolume>,
    /// The KubeVirt VirtualMachine.
    pub virtual_machine: vm::VirtualMachine,
    /// The Secret holding the app's SSH keys, when it has any.
    pub ssh_keys_secret: Option<Secret>,
    /// The BafflesApplication, when Baffles is installed and the app wants to be listed.
    pub baffles_application: Option<BafflesApplication>,
}

impl Desired {
    /// Every object as JSON, in the order to apply them: the disk first, the VM that waits for it,
    /// then the objects that refer to the VM.
    pub fn to_json(&self) -> Result<Vec<serde_json::Value>, serde_json::Error> {
        let mut objects = Vec::new();
        if let Some(data_volume) = &self.data_volume {
            objects.push(serde_json::to_value(data_volume)?);
        }
        objects.push(serde_json::to_value(&self.virtual_machine)?);
        if let Some(secret) = &self.ssh_keys_secret {
            objects.push(serde_json::to_value(secret)?);
        }
        if let Some(baffles) = &self.baffles_application {
            objects.push(serde_json::to_value(baffles)?);
        }
        Ok(objects)
    }
}

/// Why the desired objects cannot be built.
#[derive(Debug, Error)]
pub enum BuildError {
    /// The spec breaks a rule.
    #[error(transparent)]
    Invalid(#[from] InvalidSpec),
    /// The app was not read from the API server, so it has no name, namespace or uid to own children by.
    #[error(
        "the VirtualMachineApp has no {0}: build desired objects only from an object read from the API server"
    )]
    MissingMetadata(&'static str),
}

/// The DataVolume name of an app's boot disk.
pub fn data_volume_name(app_name: &str) -> String {
    format!("{app_name}-disk")
}

/// The Secret name for an app's SSH keys.
pub fn ssh_keys_secret_name(app_name: &str) -> String {
    format!("{app_name}-ssh-keys")
}

/// The URL of a VM's VNC websocket through the console gateway: the KubeVirt subresource path, which
/// is what Baffles opens.
pub fn console_url(gateway_url: &str, namespace: &str, name: &str) -> String {
    format!(
        "{}/k8s/apis/subresources.kubevirt.io/v1/namespaces/{namespace}/virtualmachineinstances/{name}/vnc",
        gateway_url.trim_end_matches('/')
    )
}

/// Builds every object the app should have. Validates the spec first.
pub fn desired(app: &VirtualMachineApp, facts: &ClusterFacts) -> Result<Desired, BuildError> {
    validate(app)?;
    let name = app
        .metadata
        .name
        .as_deref()
        .ok_or(BuildError::MissingMetadata("name"))?;
    let namespace = app
        .metadata
        .namespace
        .as_deref()
        .ok_or(BuildError::MissingMetadata("namespace"))?;
    let owner = app
        .controller_owner_ref(&())
        .ok_or(BuildError::MissingMetadata("uid"))?;
    let ssh_keys_secret = build_ssh_keys_secret(app, name, namespace, &owner);
    let boot = boot_volume(app, name, namespace, &owner, facts);
    Ok(Desired {
        data_volume: boot.data_volume,
        virtual_machine: build_virtual_machine(
            app,
            name,
            namespace,
            &owner,
            boot.volume,
            ssh_keys_secret.is_some(),
        ),
        ssh_keys_secret,
        baffles_application: build_baffles_application(app, name, namespace, &owner, facts),
    })
}

fn labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_owned(), MANAGER.to_owned()),
        ("app.kubernetes.io/name".to_owned(), name.to_owned()),
        (APP_LABEL.to_owned(), name.to_owned()),
    ])
}

fn child_metadata(name: String, namespace: &str, app_name: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace.to_owned()),
        labels: Some(labels(app_name)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn build_virtual_machine(
    app: &VirtualMachineApp,
    name: &str,
    namespace: &str,
    owner: &OwnerReference,
    boot_volume: vm::VirtualMachineTemplateSpecVolumes,
    has_ssh_keys: bool,
) -> vm::VirtualMachine {
    let spec = &app.spec;
    let uses_preference = spec.resources.as_ref().is_some_and(|r| r.preference.is_some());

    let mut disks = vec![vm::VirtualMachineTemplateSpecDomainDevicesDisks {
        name: ROOT_DISK.to_owned(),
        boot_order: Some(1),
        // A preference chooses the bus (e.g. SATA for Windows); otherwise virtio, KubeVirt's default.
        disk: Some(vm::VirtualMachineTemplateSpecDomainDevicesDisksDisk {
            bus: (!uses_preference).then(|| "virtio".to_owned()),
            ..Default::default()
        }),
        ..Default::default()
    }];
    let mut volumes = vec![boot_volume];
    if let Some(cloud_init) = cloud_init_volume(app, has_ssh_keys) {
        disks.push(vm::VirtualMachineTemplateSpecDomainDevicesDisks {
            name: CLOUD_INIT_DISK.to_owned(),
            disk: Some(vm::VirtualMachineTemplateSpecDomainDevicesDisksDisk {
                bus: Some("virtio".to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        });
        volumes.push(cloud_init);
    }

    let access_credentials = has_ssh_keys.then(|| {
        vec![vm::VirtualMachineTemplateSpecAccessCredentials {
            ssh_public_key: Some(vm::VirtualMachineTemplateSpecAccessCredentialsSshPublicKey {
                source: vm::VirtualMachineTemplateSpecAccessCredentialsSshPublicKeySource {
                    secret: Some(
                        vm::VirtualMachineTemplateSpecAccessCredentialsSshPublicKeySourceSecret {
                            secret_name: ssh_keys_secret_name(name),
                        },
                    ),
                },
                propagation_method:
                    vm::VirtualMachineTemplateSpecAccessCredentialsSshPublicKeyPropagationMethod {
                        no_cloud: Some(Default::default()),
                        ..Default::default()
                    },
            }),
            ..Default::default()
        }]
    });

    let (cpu, memory) = domain_size(app);
    let domain = vm::VirtualMachineTemplateSpecDomain {
        cpu,
        memory,
        firmware: firmware(app),
        features: secure_boot(app).then(|| vm::VirtualMachineTemplateSpecDomainFeatures {
            // KubeVirt refuses Secure Boot without SMM.
            smm: Some(vm::VirtualMachineTemplateSpecDomainFeaturesSmm { enabled: Some(true) }),
            ..Default::default()
        }),
        devices: vm::VirtualMachineTemplateSpecDomainDevices {
            autoattach_graphics_device: Some(spec.console.vnc),
            autoattach_serial_console: Some(spec.console.serial),
            disks: Some(disks),
            interfaces: Some(vec![vm::VirtualMachineTemplateSpecDomainDevicesInterfaces {
                name: "default".to_owned(),
                masquerade: Some(vm::VirtualMachineTemplateSpecDomainDevicesInterfacesMasquerade {}),
                ..Default::default()
            }]),
            ..Default::default()
        },
        ..Default::default()
    };

    let (instancetype, preference) = instancetype_matchers(app);
    let mut template_labels = BTreeMap::from([(APP_LABEL.to_owned(), name.to_owned())]);
    template_labels.insert("kubevirt.io/domain".to_owned(), name.to_owned());

    let mut metadata = child_metadata(name.to_owned(), namespace, name, owner);
    if let Some(display_name) = &spec.display_name {
        metadata.annotations = Some(BTreeMap::from([(
            "paddock.dev/display-name".to_owned(),
            display_name.clone(),
        )]));
    }

    vm::VirtualMachine {
        metadata,
        spec: vm::VirtualMachineSpec {
            run_strategy: Some(spec.run_strategy.as_str().to_owned()),
            instancetype,
            preference,
            template: vm::VirtualMachineTemplate {
                metadata: Some(ObjectMeta {
                    labels: Some(template_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(vm::VirtualMachineTemplateSpec {
                    domain,
                    access_credentials,
                    networks: Some(vec![vm::VirtualMachineTemplateSpecNetworks {
                        name: "default".to_owned(),
                        pod: Some(Default::default()),
                        ..Default::default()
                    }]),
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        status: None,
    }
}

struct BootVolume {
    volume: vm::VirtualMachineTemplateSpecVolumes,
    data_volume: Option<DataVolume>,
}

fn boot_volume(
    app: &VirtualMachineApp,
    name: &str,
    namespace: &str,
    owner: &OwnerReference,
    facts: &ClusterFacts,
) -> BootVolume {
    let image = &app.spec.image;
    let mut volume = vm::VirtualMachineTemplateSpecVolumes {
        name: ROOT_DISK.to_owned(),
        ..Default::default()
    };

    if !image.persistent {
        // Validation allows only containerDisk and pvc images to be ephemeral.
        if let Some(reference) = &image.container_disk {
            volume.container_disk = Some(vm::VirtualMachineTemplateSpecVolumesContainerDisk {
                image: reference.clone(),
                ..Default::default()
            });
        } else if let Some(pvc) = &image.pvc {
            volume.ephemeral = Some(vm::VirtualMachineTemplateSpecVolumesEphemeral {
                persistent_volume_claim: Some(
                    vm::VirtualMachineTemplateSpecVolumesEphemeralPersistentVolumeClaim {
                        claim_name: pvc.name.clone(),
                        ..Default::default()
                    },
                ),
            });
        }
        return BootVolume {
            volume,
            data_volume: None,
        };
    }

    let mut source = DataVolumeSource::default();
    let mut source_ref = None;
    if let Some(reference) = &image.container_disk {
        // CDI wants the reference with its transport; normalising spells out docker.io/library/ so the
        // Zarf agent and CDI read the same name.
        // CDI's importer refuses references with both a tag and a digest; the digest alone names the image.
        let normalised = ImageReference::parse(reference).map_or_else(
            |_| reference.clone(),
            |mut parsed| {
                if parsed.digest.is_some() {
                    parsed.tag = None;
                }
                parsed.to_string()
            },
        );
        source.registry = Some(DataVolumeSourceRegistry {
            url: Some(format!("docker://{normalised}")),
            pull_method: facts.zarf.as_ref().map(|_| "node".to_owned()),
            ..Default::default()
        });
    } else if let Some(http) = &image.http {
        source.http = Some(DataVolumeSourceHttp {
            url: http.url.clone(),
            checksum: http.checksum.clone(),
            ..Default::default()
        });
    } else if let Some(pvc) = &image.pvc {
        source.pvc = Some(DataVolumeSourcePvc {
            name: pvc.name.clone(),
            namespace: namespace.to_owned(),
        });
    } else if image.upload.is_some() {
        source.upload = Some(DataVolumeSourceUpload {});
    } else if let Some(data_source) = &image.data_source {
        source_ref = Some(DataVolumeSourceRef {
            kind: "DataSource".to_owned(),
            name: data_source.name.clone(),
            namespace: data_source.namespace.clone(),
        });
    }

    let disk = app.spec.disk.as_ref();
    let storage = DataVolumeStorage {
        // Without a size (clones), CDI sizes the volume from the source.
        resources: disk
            .and_then(|d| d.size.as_ref())
            .map(|size| DataVolumeStorageResources {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    IntOrString::String(size.0.clone()),
                )])),
                ..Default::default()
            }),
        storage_class_name: disk
            .and_then(|d| d.storage_class.clone())
            .or_else(|| facts.default_storage_class.clone()),
        ..Default::default()
    };
    let data_volume_name = data_volume_name(name);
    volume.data_volume = Some(vm::VirtualMachineTemplateSpecVolumesDataVolume {
        name: data_volume_name.clone(),
        ..Default::default()
    });
    let mut metadata = child_metadata(data_volume_name, namespace, name, owner);
    // With WaitForFirstConsumer storage, CDI would otherwise wait for the VM's pod before importing:
    // nothing would be imported while the VM is Halted and the first start would pay for the import.
    metadata.annotations = Some(BTreeMap::from([(
        IMMEDIATE_BINDING_ANNOTATION.to_owned(),
        "true".to_owned(),
    )]));
    let data_volume = DataVolume {
        metadata,
        spec: DataVolumeSpec {
            source: source_ref.is_none().then_some(source),
            source_ref,
            storage: Some(storage),
            ..Default::default()
        },
        status: None,
    };
    BootVolume {
        volume,
        data_volume: Some(data_volume),
    }
}

fn cloud_init_volume(
    app: &VirtualMachineApp,
    has_ssh_keys: bool,
) -> Option<vm::VirtualMachineTemplateSpecVolumes> {
    let cloud_init = app.spec.cloud_init.as_ref()?;
    let has_user_data = cloud_init.user_data.is_some() || cloud_init.user_data_secret_ref.is_some();
    if !has_user_data && cloud_init.network_data.is_none() && !has_ssh_keys {
        return None;
    }
    // KubeVirt propagates SSH keys through the NoCloud volume, which needs some user data to exist.
    let user_data = match (&cloud_init.user_data, &cloud_init.user_data_secret_ref) {
        (Some(user_data), _) => Some(user_data.clone()),
        (None, Some(_)) => None,
        (None, None) => Some("#cloud-config\n".to_owned()),
    };
    Some(vm::VirtualMachineTemplateSpecVolumes {
        name: CLOUD_INIT_DISK.to_owned(),
        cloud_init_no_cloud: Some(vm::VirtualMachineTemplateSpecVolumesCloudInitNoCloud {
            user_data,
            secret_ref: cloud_init.user_data_secret_ref.as_ref().map(|name| {
                vm::VirtualMachineTemplateSpecVolumesCloudInitNoCloudSecretRef {
                    name: Some(name.clone()),
                }
            }),
            network_data: cloud_init.network_data.clone(),
            ..Default::default()
        }),
        ..Default::default()
    })
}

fn domain_size(
    app: &VirtualMachineApp,
) -> (
    Option<vm::VirtualMachineTemplateSpecDomainCpu>,
    Option<vm::VirtualMachineTemplateSpecDomainMemory>,
) {
    let resources = app.spec.resources.as_ref();
    if resources.is_some_and(|r| r.instancetype.is_some()) {
        // The instancetype sets both; KubeVirt rejects VMs that set them again.
        return (None, None);
    }
    let count = i32::try_from(resources.and_then(|r| r.cpu).unwrap_or(DEFAULT_CPU_CORES)).ok();
    // With a preference (and no instancetype) KubeVirt checks the preference's CPU requirement against
    // the topology the preference prefers, `sockets` unless it says otherwise; cores would count as 0.
    let cpu = if resources.is_some_and(|r| r.preference.is_some()) {
        vm::VirtualMachineTemplateSpecDomainCpu {
            sockets: count,
            ..Default::default()
        }
    } else {
        vm::VirtualMachineTemplateSpecDomainCpu {
            cores: count,
            ..Default::default()
        }
    };
    let memory = resources
        .and_then(|r| r.memory.as_ref())
        .map_or_else(|| DEFAULT_MEMORY.to_owned(), |memory| memory.0.clone());
    (
        Some(cpu),
        Some(vm::VirtualMachineTemplateSpecDomainMemory {
            guest: Some(IntOrString::String(memory)),
            ..Default::default()
        }),
    )
}

fn secure_boot(app: &VirtualMachineApp) -> bool {
    app.spec
        .firmware
        .as_ref()
        .is_some_and(|f| f.kind == FirmwareKind::Uefi && f.secure_boot == Some(true))
}

fn firmware(app: &VirtualMachineApp) -> Option<vm::VirtualMachineTemplateSpecDomainFirmware> {
    let firmware = app.spec.firmware.as_ref()?;
    let bootloader = match firmware.kind {
        FirmwareKind::Bios => vm::VirtualMachineTemplateSpecDomainFirmwareBootloader {
            bios: Some(Default::default()),
            ..Default::default()
        },
        FirmwareKind::Uefi => vm::VirtualMachineTemplateSpecDomainFirmwareBootloader {
            // KubeVirt turns Secure Boot on by default for EFI; say what the app asked for.
            efi: Some(vm::VirtualMachineTemplateSpecDomainFirmwareBootloaderEfi {
                secure_boot: Some(secure_boot(app)),
                ..Default::default()
            }),
            ..Default::default()
        },
    };
    Some(vm::VirtualMachineTemplateSpecDomainFirmware {
        bootloader: Some(bootloader),
        ..Default::default()
    })
}

fn instancetype_matchers(
    app: &VirtualMachineApp,
) -> (
    Option<vm::VirtualMachineInstancetype>,
    Option<vm::VirtualMachinePreference>,
) {
    let Some(resources) = app.spec.resources.as_ref() else {
        return (None, None);
    };
    let instancetype = resources
        .instancetype
        .as_ref()
        .map(|reference| vm::VirtualMachineInstancetype {
            name: Some(reference.name.clone()),
            kind: Some(
                match reference.scope {
                    ReferenceScope::Cluster => "VirtualMachineClusterInstancetype",
                    ReferenceScope::Namespaced => "VirtualMachineInstancetype",
                }
                .to_owned(),
            ),
            ..Default::default()
        });
    let preference = resources
        .preference
        .as_ref()
        .map(|reference| vm::VirtualMachinePreference {
            name: Some(reference.name.clone()),
            kind: Some(
                match reference.scope {
                    ReferenceScope::Cluster => "VirtualMachineClusterPreference",
                    ReferenceScope::Namespaced => "VirtualMachinePreference",
                }
                .to_owned(),
            ),
            ..Default::default()
        });
    (instancetype, preference)
}

fn build_ssh_keys_secret(
    app: &VirtualMachineApp,
    name: &str,
    namespace: &str,
    owner: &OwnerReference,
) -> Option<Secret> {
    let keys = &app.spec.cloud_init.as_ref()?.ssh_keys;
    if keys.is_empty() {
        return None;
    }
    let data = keys
        .iter()
        .enumerate()
        .map(|(index, key)| (format!("key{index}"), ByteString(key.trim().as_bytes().to_vec())))
        .collect();
    Some(Secret {
        metadata: child_metadata(ssh_keys_secret_name(name), namespace, name, owner),
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    })
}

fn build_baffles_application(
    app: &VirtualMachineApp,
    name: &str,
    namespace: &str,
    owner: &OwnerReference,
    facts: &ClusterFacts,
) -> Option<BafflesApplication> {
    let console = &app.spec.console;
    if !(facts.baffles_installed && console.vnc && console.baffles.enabled) {
        return None;
    }
    let display_name = console
        .baffles
        .display_name
        .clone()
        .or_else(|| app.spec.display_name.clone())
        .unwrap_or_else(|| name.to_owned());
    Some(BafflesApplication {
        metadata: child_metadata(name.to_owned(), namespace, name, owner),
        spec: BafflesApplicationSpec {
            display_name,
            url: console_url(&facts.console_gateway_url, namespace, name),
            category: console.baffles.category.clone(),
        },
    })
}
