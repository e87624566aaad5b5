//! OVF descriptor parsing: the VM's CPU count, memory, firmware, name and disks.
//!
//! Contract: [`parse_ovf`] reads the first `VirtualSystem` (VMware and VirtualBox exports hold one)
//! and returns [`OvfHints`]; disks are listed in `DiskSection` order, each with the `References`
//! file it is stored in. Elements and attributes are matched by local name, so the namespace prefixes
//! different exporters use (`ovf:`, `rasd:`, `vmw:`, none) do not matter. DTDs are refused by the XML
//! parser (no entity expansion). Nothing here touches the file system.

use std::collections::HashMap;

use roxmltree::{Document, Node};

/// Firmware the exported VM booted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// Legacy BIOS (the default of VMware and VirtualBox, so also what an OVF that says nothing means).
    Bios,
    /// UEFI.
    Uefi,
}

/// One disk of the OVF's `DiskSection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfDisk {
    /// `ovf:diskId`.
    pub disk_id: String,
    /// The `ovf:href` of the file holding the disk; `None` for a blank disk to be created empty.
    pub file: Option<String>,
    /// `ovf:compression` of that file (`gzip`); paddock detects compression from content anyway.
    pub compression: Option<String>,
    /// Capacity in bytes (`ovf:capacity` × `ovf:capacityAllocationUnits`), when parseable.
    pub capacity_bytes: Option<u64>,
    /// `ovf:format`, e.g. `http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized`.
    pub format: Option<String>,
}

/// What an OVF descriptor says about the VM, for the generated `VirtualMachineApp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OvfHints {
    /// The virtual system's `Name` (or its `ovf:id`).
    pub name: Option<String>,
    /// Virtual CPUs (hardware item of ResourceType 3).
    pub cpu_count: Option<u32>,
    /// Memory in bytes (hardware item of ResourceType 4, scaled by its AllocationUnits).
    pub memory_bytes: Option<u64>,
    /// Firmware: UEFI when VMware's `firmware=efi` config or VirtualBox's `<Firmware type="EFI">` says
    /// so, BIOS otherwise.
    pub firmware: Firmware,
    /// All disks in `DiskSection` order; paddock packages the first one that has a file.
    pub disks: Vec<OvfDisk>,
    /// How many `VirtualSystem`s the descriptor holds (the first one is used).
    pub virtual_systems: usize,
}

/// Why an OVF descriptor cannot be used (shown inside [`crate::Error::Ovf`]).
pub(crate) type OvfError = String;

fn children<'a, 'input: 'a>(
    node: Node<'a, 'input>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'input>> + 'a {
    node.children()
        .filter(move |child| child.is_element() && child.tag_name().name() == name)
}

fn descendants<'a, 'input: 'a>(
    node: Node<'a, 'input>,
    name: &'a str,
) -> impl Iterator<Item = Node<'a, 'input>> + 'a {
    node.descendants()
        .filter(move |child| child.is_element() && child.tag_name().name() == name)
}

/// An attribute by local name, whatever its namespace prefix.
fn attribute<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.attributes()
        .find(|attribute| attribute.name() == name)
        .map(|attribute| attribute.value())
}

fn child_text<'a>(node: Node<'a, '_>, name: &str) -> Option<&'a str> {
    node.children()
        .find(|child| child.is_element() && child.tag_name().name() == name)
        .and_then(|child| child.text())
        .map(str::trim)
}

/// Parses a DMTF programmatic unit (`byte`, `byte * 2^20`, `byte * 10^9`) or one of the common
/// names exporters write (`MegaBytes`, `MB`, `GB`, `KB` — binary, as the OVF spec reads them) into a
/// multiplier. `None` for anything else.
fn unit_multiplier(units: &str) -> Option<u64> {
    let compact: String = units
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase();
    let named = match compact.as_str() {
        "byte" | "bytes" | "b" => Some(1),
        "kilobytes" | "kb" | "kib" => Some(1 << 10),
        "megabytes" | "mb" | "mib" => Some(1 << 20),
        "gigabytes" | "gb" | "gib" => Some(1 << 30),
        "terabytes" | "tb" | "tib" => Some(1 << 40),
        _ => None,
    };
    if named.is_some() {
        return named;
    }
    let mut multiplier: u64 = 1;
    let mut factors = compact.split('*');
    if !matches!(factors.next(), Some("byte" | "bytes")) {
        return None;
    }
    for factor in factors {
        let value = match factor.split_once('^') {
            Some((base, exponent)) => base.parse::<u64>().ok()?.checked_pow(exponent.parse().ok()?)?,
            None => factor.parse::<u64>().ok()?,
        };
        multiplier = multiplier.checked_mul(value)?;
    }
    Some(multiplier)
}

/// Parses an OVF descriptor's text into [`OvfHints`]; the error says what is wrong with it.
pub(crate) fn parse_ovf(text: &str) -> Result<OvfHints, OvfError> {
    let document = Document::parse(text).map_err(|error| format!("it is not valid XML ({error})"))?;
    let envelope = document.root_element();
    if envelope.tag_name().name() != "Envelope" {
        return Err(format!(
            "its root element is <{}>, not an OVF <Envelope>",
            envelope.tag_name().name()
        ));
    }

    struct FileReference<'a> {
        href: &'a str,
        compression: Option<&'a str>,
    }
    let mut files = HashMap::new();
    for references in children(envelope, "References") {
        for file in children(references, "File") {
            let (Some(id), Some(href)) = (attribute(file, "id"), attribute(file, "href")) else {
                return Err("a <File> in <References> has no ovf:id or ovf:href".to_string());
            };
            if attribute(file, "chunkSize").is_some() {
                return Err(format!(
                    "file {href:?} is split into chunks (ovf:chunkSize), which paddock does not join; export the VM again without chunking"
                ));
            }
            files.insert(
                id,
                FileReference {
                    href,
                    compression: attribute(file, "compression"),
                },
            );
        }
    }

    let mut disks = Vec::new();
    for section in descendants(envelope, "DiskSection") {
        for disk in children(section, "Disk") {
            let disk_id = attribute(disk, "diskId").unwrap_or_default().to_string();
            let (file, compression) = match attribute(disk, "fileRef") {
                Some(file_ref) => {
                    let reference = files.get(file_ref).ok_or_else(|| {
                        format!("disk {disk_id:?} refers to file id {file_ref:?}, which <References> does not list")
                    })?;
                    (
                        Some(reference.href.to_string()),
                        reference.compression.map(str::to_string),
                    )
                }
                None => (None, None),
            };
            let units = attribute(disk, "capacityAllocationUnits").unwrap_or("byte");
            let capacity_bytes = attribute(disk, "capacity")
                .and_then(|capacity| capacity.trim().parse::<u64>().ok())
                .zip(unit_multiplier(units))
                .and_then(|(capacity, multiplier)| capacity.checked_mul(multiplier));
            disks.push(OvfDisk {
                disk_id,
                file,
                compression,
                capacity_bytes,
                format: attribute(disk, "format").map(str::to_string),
            });
        }
    }

    let systems: Vec<Node> = descendants(envelope, "VirtualSystem").collect();
    let Some(system) = systems.first().copied() else {
        return Err("it describes no <VirtualSystem>".to_string());
    };
    let name = child_text(system, "Name")
        .filter(|name| !name.is_empty())
        .or_else(|| attribute(system, "id"))
        .map(str::to_string);

    let mut cpu_count = None;
    let mut memory_bytes = None;
    if let Some(hardware) = descendants(system, "VirtualHardwareSection").next() {
        for item in children(hardware, "Item") {
            let quantity = child_text(item, "VirtualQuantity");
            match child_text(item, "ResourceType") {
                Some("3") if cpu_count.is_none() => {
                    cpu_count = quantity.and_then(|quantity| quantity.parse().ok());
                }
                Some("4") if memory_bytes.is_none() => {
                    let multiplier = child_text(item, "AllocationUnits").and_then(unit_multiplier);
                    memory_bytes = quantity
                        .and_then(|quantity| quantity.parse::<u64>().ok())
                        .zip(multiplier)
                        .and_then(|(quantity, multiplier)| quantity.checked_mul(multiplier));
                }
                _ => {}
            }
        }
    }

    let vmware_efi = system.descendants().any(|node| {
        node.is_element()
            && matches!(node.tag_name().name(), "Config" | "ExtraConfig")
            && attribute(node, "key") == Some("firmware")
            && attribute(node, "value").is_some_and(|value| value.eq_ignore_ascii_case("efi"))
    });
    let virtualbox_efi = descendants(system, "Firmware")
        .any(|node| attribute(node, "type").is_some_and(|kind| kind.to_ascii_uppercase().starts_with("EFI")));
    let firmware = if vmware_efi || virtualbox_efi {
        Firmware::Uefi
    } else {
        Firmware::Bios
    };

    Ok(OvfHints {
        name,
        cpu_count,
        memory_bytes,
        firmware,
        disks,
        virtual_systems: systems.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::{Firmware, parse_ovf, unit_multiplier};

    #[test]
    fn units_parse() {
        assert_eq!(unit_multiplier("byte * 2^20"), Some(1 << 20));
        assert_eq!(unit_multiplier("byte*2^30"), Some(1 << 30));
        assert_eq!(unit_multiplier("byte * 10^6"), Some(1_000_000));
        assert_eq!(unit_multiplier("MegaBytes"), Some(1 << 20));
        assert_eq!(unit_multiplier("hertz * 10^6"), None);
    }

    /// Shape of a VirtualBox 7 export: no prefixes on the envelope's default namespace, memory in
    /// MegaBytes, firmware in the vbox:Machine section.
    #[test]
    fn virtualbox_export() {
        let ovf = r#"<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="vm-disk001.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="21474836480" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <VirtualSystem ovf:id="vm">
    <Info>A virtual machine</Info>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <Item><rasd:Caption>2 virtual CPU</rasd:Caption><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" name="vm"><Hardware><Firmware type="EFI64"/></Hardware></vbox:Machine>
  </VirtualSystem>
</Envelope>"#;
        let hints = parse_ovf(ovf).unwrap();
        assert_eq!(hints.name.as_deref(), Some("vm"));
        assert_eq!(hints.cpu_count, Some(2));
        assert_eq!(hints.memory_bytes, Some(2048 << 20));
        assert_eq!(hints.firmware, Firmware::Uefi);
        assert_eq!(hints.disks.len(), 1);
        assert_eq!(hints.disks[0].file.as_deref(), Some("vm-disk001.vmdk"));
        assert_eq!(hints.disks[0].capacity_bytes, Some(20 << 30));
    }

    #[test]
    fn dtds_and_non_ovf_are_refused() {
        let bomb = r#"<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]><Envelope>&lol;</Envelope>"#;
        assert!(parse_ovf(bomb).unwrap_err().contains("not valid XML"));
        assert!(parse_ovf("<Other/>").unwrap_err().contains("<Other>"));
    }
}
