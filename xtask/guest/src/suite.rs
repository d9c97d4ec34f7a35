//! The guest tests: each runs in its own process inside the VM, against the
//! devices setup prepared, and returns `Err` with a reason on failure.

use crate::reference::{SgInq, SgReadcap, ShowRegs};
use crate::runner::RunConfig;
use crate::setup::{Devices, NvmeDevice, ScsiDevice, tool_output};
use crate::topology::{DEFAULT, FAULT_SECTOR, FAULTS, GuestDriver};
use std::path::Path;
use std::time::Duration;

/// What a guest test sees: the run configuration and the devices found.
pub struct GuestEnv {
    /// What the host asked for.
    pub config: RunConfig,
    /// What setup found.
    pub devices: Devices,
}

impl GuestEnv {
    /// Loads the configuration and device map written before the test ran.
    pub fn load() -> Result<GuestEnv, String> {
        Ok(GuestEnv {
            config: RunConfig::load()?,
            devices: Devices::load()?,
        })
    }
}

/// One guest test.
pub struct GuestTest {
    /// Unique name, used for filtering and reporting.
    pub name: &'static str,
    /// The topology it needs.
    pub topology: &'static str,
    /// Wall-time bound; past it the runner kills the test.
    pub timeout: Duration,
    /// The test body.
    pub run: fn(&GuestEnv) -> Result<(), String>,
}

/// Every guest test, in the order they run.
pub static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "rig_devices_match_topology",
        topology: DEFAULT,
        timeout: Duration::from_secs(30),
        run: rig_devices_match_topology,
    },
    GuestTest {
        name: "vfio_open_map_bar0_dma_map",
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: vfio_open_map_bar0_dma_map,
    },
    GuestTest {
        name: "vfio_regs_match_nvme_show_regs",
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: vfio_regs_match_nvme_show_regs,
    },
    GuestTest {
        name: "sg_inquiry_matches_sg_inq",
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: sg_inquiry_matches_sg_inq,
    },
    GuestTest {
        name: "sg_readcap16_matches_sg_readcap",
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: sg_readcap16_matches_sg_readcap,
    },
    GuestTest {
        name: "blkdebug_read_fault_reaches_the_guest",
        topology: FAULTS,
        timeout: Duration::from_secs(60),
        run: blkdebug_read_fault_reaches_the_guest,
    },
];

/// Looks a test up by name.
pub fn find(name: &str) -> Option<&'static GuestTest> {
    TESTS.iter().find(|t| t.name == name)
}

macro_rules! ensure_eq {
    ($what:expr, $ours:expr, $theirs:expr) => {{
        let (ours, theirs) = (&$ours, &$theirs);
        if ours != theirs {
            return Err(format!(
                "{}: ours {:?}, reference {:?}",
                $what, ours, theirs
            ));
        }
        println!("ok {}: {:?}", $what, ours);
    }};
}

fn rig_devices_match_topology(env: &GuestEnv) -> Result<(), String> {
    let topo = &env.config.topology;
    let devs = &env.devices;
    ensure_eq!("NVMe controllers", devs.nvme.len(), topo.nvme.len());
    ensure_eq!("LIO LUNs", devs.lio.len(), topo.lio_luns.len());
    ensure_eq!(
        "virtio-scsi disks",
        devs.virtio.len(),
        topo.virtio_disks.len()
    );
    for ctrl in &devs.nvme {
        let sys = format!("/sys/bus/pci/devices/{}", ctrl.pci_address);
        let driver = std::fs::read_link(format!("{sys}/driver"))
            .map_err(|e| format!("{}: no driver link: {e}", ctrl.pci_address))?;
        let expected = match ctrl.spec.driver {
            GuestDriver::Vfio => "vfio-pci",
            GuestDriver::Kernel => "nvme",
        };
        ensure_eq!(
            format!("{} driver", ctrl.pci_address),
            driver.file_name().map(|n| n.to_string_lossy().into_owned()),
            Some(expected.to_string())
        );
        // Namespaces as the kernel saw them before the unbind.
        let id_ctrl = std::fs::read_to_string(ctrl.reference_dir.join("id-ctrl.json"))
            .map_err(|e| format!("{}: reference id-ctrl missing: {e}", ctrl.pci_address))?;
        let json: serde_json::Value = serde_json::from_str(&id_ctrl)
            .map_err(|e| format!("{}: id-ctrl JSON: {e}", ctrl.pci_address))?;
        ensure_eq!(
            format!("{} serial", ctrl.pci_address),
            json["sn"].as_str().map(str::trim),
            Some(ctrl.spec.serial.as_str())
        );
        for (i, spec) in ctrl.spec.namespaces.iter().enumerate() {
            let nsid = i + 1;
            let what = |f: &str| format!("{} ns {nsid} {f}", ctrl.pci_address);
            let text =
                std::fs::read_to_string(ctrl.reference_dir.join(format!("id-ns-{nsid}.json")))
                    .map_err(|e| format!("{}: reference id-ns missing: {e}", what("")))?;
            let ns: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("{}: JSON: {e}", what("id-ns")))?;
            let format_index = ns["flbas"].as_u64().map(|f| (f & 0xf) as usize);
            let lba_shift = format_index.and_then(|i| ns["lbafs"][i]["ds"].as_u64());
            ensure_eq!(
                what("block size"),
                lba_shift.map(|ds| 1u64 << ds),
                Some(u64::from(spec.block_size))
            );
            ensure_eq!(
                what("size"),
                ns["nsze"].as_u64().zip(lba_shift).map(|(n, ds)| n << ds),
                Some(spec.size_mib << 20)
            );
            ensure_eq!(
                what("MSSRL"),
                ns["mssrl"].as_u64(),
                Some(u64::from(spec.mssrl))
            );
            ensure_eq!(what("MCL"), ns["mcl"].as_u64(), Some(u64::from(spec.mcl)));
            ensure_eq!(
                what("MSRC"),
                ns["msrc"].as_u64(),
                Some(u64::from(spec.msrc))
            );
        }
    }
    for dev in devs.lio.iter().chain(&devs.virtio) {
        if !dev.sg_path.exists() {
            return Err(format!("{} is gone", dev.sg_path.display()));
        }
    }
    Ok(())
}

/// Reads one 512-byte sector of a kernel block device with O_DIRECT, so the
/// read reaches the device rather than the page cache.
fn read_sector_direct(path: &str, sector: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // O_DIRECT needs an aligned buffer: take a 4 KiB-aligned window of a
    // larger allocation.
    let mut backing = vec![0u8; 8192];
    let offset = backing.as_ptr().align_offset(4096);
    let buf = &mut backing[offset..offset + 512];
    file.read_exact_at(buf, sector * 512)?;
    Ok(buf.to_vec())
}

fn blkdebug_read_fault_reaches_the_guest(env: &GuestEnv) -> Result<(), String> {
    let ctrl = env
        .devices
        .nvme
        .first()
        .ok_or("the faults topology has no NVMe controller")?;
    let node = format!("/dev/{}n1", ctrl.kernel_name);
    read_sector_direct(&node, FAULT_SECTOR - 8)
        .map_err(|e| format!("{node}: a read next to the fault failed too: {e}"))?;
    println!("ok {node}: sector {} reads", FAULT_SECTOR - 8);
    match read_sector_direct(&node, FAULT_SECTOR) {
        Ok(_) => Err(format!(
            "{node}: sector {FAULT_SECTOR} read back although blkdebug fails it"
        )),
        // QEMU completes the failed read with Unrecovered Read Error, which
        // the kernel reports as a medium error: ENODATA, not a plain EIO.
        Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {
            println!("ok {node}: sector {FAULT_SECTOR} fails as a medium error");
            Ok(())
        }
        Err(e) => Err(format!(
            "{node}: sector {FAULT_SECTOR} failed, but not as a medium error: {e}"
        )),
    }
}

fn open_vfio(ctrl: &NvmeDevice) -> Result<nvme::vfio::VfioPci, String> {
    nvme::vfio::VfioPci::open(&ctrl.pci_address)
        .map_err(|e| format!("opening {} through VFIO: {e}", ctrl.pci_address))
}

fn vfio_open_map_bar0_dma_map(env: &GuestEnv) -> Result<(), String> {
    for ctrl in &env.devices.nvme {
        let addr = &ctrl.pci_address;
        let dev = open_vfio(ctrl)?;
        let command = dev
            .pci_command()
            .map_err(|e| format!("{addr}: reading the PCI command register: {e}"))?;
        // Bit 1: memory space enable; bit 2: bus master enable.
        if command & 0b110 != 0b110 {
            return Err(format!(
                "{addr}: PCI command {command:#06x} lacks memory/bus-master enable"
            ));
        }
        let cap = dev.cap();
        if !cap.css_nvm() {
            return Err(format!(
                "{addr}: CAP {:#x} does not offer the NVM command set",
                cap.0
            ));
        }
        if cap.mpsmin() > cap.mpsmax() {
            return Err(format!("{addr}: CAP {:#x} has MPSMIN > MPSMAX", cap.0));
        }
        println!("{addr}: CAP {:#018x} VS {}", cap.0, dev.version());

        // Keep every buffer alive to the end: a dropped one gives its IOVA
        // back, and the next may legitimately reuse it.
        let mut buffers = Vec::new();
        let mut ranges = Vec::new();
        for len in [4096usize, 2 << 20, 4096] {
            let buf = dev
                .dma_alloc(len)
                .map_err(|e| format!("{addr}: DMA-mapping {len} bytes: {e}"))?;
            let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            buf.write_bytes(0, &pattern)
                .map_err(|e| format!("{addr}: writing the DMA buffer: {e}"))?;
            let mut back = vec![0u8; len];
            buf.read_bytes(0, &mut back)
                .map_err(|e| format!("{addr}: reading the DMA buffer: {e}"))?;
            if back != pattern {
                return Err(format!(
                    "{addr}: DMA buffer of {len} bytes did not read back"
                ));
            }
            if buf.iova() % 4096 != 0 {
                return Err(format!(
                    "{addr}: IOVA {:#x} is not page aligned",
                    buf.iova()
                ));
            }
            println!("{addr}: mapped {len} bytes at IOVA {:#x}", buf.iova());
            ranges.push((buf.iova(), len as u64));
            buffers.push(buf);
        }
        ranges.sort();
        for pair in ranges.windows(2) {
            if pair[0].0 + pair[0].1 > pair[1].0 {
                return Err(format!("{addr}: live DMA mappings overlap: {ranges:x?}"));
            }
        }
        let iommu = dev.iova_ranges();
        for (iova, len) in &ranges {
            if !iommu
                .iter()
                .any(|r| r.start() <= *iova && iova + len <= r.end())
            {
                return Err(format!(
                    "{addr}: IOVA {iova:#x}+{len:#x} lies outside the IOMMU's ranges {iommu:x?}"
                ));
            }
        }
        drop(buffers);
    }
    Ok(())
}

fn read_reference(dir: &Path, file: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(file))
        .map_err(|e| format!("reading reference {}: {e}", dir.join(file).display()))
}

fn vfio_regs_match_nvme_show_regs(env: &GuestEnv) -> Result<(), String> {
    for ctrl in &env.devices.nvme {
        let addr = &ctrl.pci_address;
        let reference = ShowRegs::parse(
            &read_reference(&ctrl.reference_dir, "show-regs.txt")?,
            &read_reference(&ctrl.reference_dir, "show-regs-human.txt")?,
        )
        .map_err(|e| format!("{addr}: {e}"))?;
        let dev = open_vfio(ctrl)?;
        let cap = dev.cap();
        let vs = dev.version();
        ensure_eq!(format!("{addr} CAP"), cap.0, reference.cap);
        ensure_eq!(
            format!("{addr} CAP.MQES (entries)"),
            cap.max_queue_entries() as u64,
            reference.mqes_decoded
        );
        ensure_eq!(
            format!("{addr} CAP.DSTRD (bytes)"),
            cap.doorbell_stride() as u64,
            reference.doorbell_stride_bytes
        );
        ensure_eq!(format!("{addr} VS"), vs.0, reference.version);
        ensure_eq!(
            format!("{addr} VS (major.minor)"),
            format!("{}.{}", vs.major(), vs.minor()),
            reference.spec_version
        );
    }
    Ok(())
}

fn scsi_devices(env: &GuestEnv) -> impl Iterator<Item = (&'static str, &ScsiDevice)> {
    let lio = env.devices.lio.iter().map(|d| ("LIO", d));
    let virtio = env.devices.virtio.iter().map(|d| ("virtio-scsi", d));
    lio.chain(virtio)
}

fn sg_inquiry_matches_sg_inq(env: &GuestEnv) -> Result<(), String> {
    for (kind, dev) in scsi_devices(env) {
        let path = dev.sg_path.display().to_string();
        let sg = scsi_sg::SgDevice::open(&dev.sg_path).map_err(|e| format!("{path}: {e}"))?;
        let ours = sg.inquiry().map_err(|e| format!("{path}: INQUIRY: {e}"))?;
        let theirs =
            SgInq::parse(&tool_output("sg_inq", &[&path])?).map_err(|e| format!("{path}: {e}"))?;
        let what = |field: &str| format!("{path} ({kind}) {field}");
        ensure_eq!(
            what("PQual"),
            ours.peripheral_qualifier,
            theirs.peripheral_qualifier
        );
        ensure_eq!(
            what("PDT"),
            ours.peripheral_device_type,
            theirs.peripheral_device_type
        );
        ensure_eq!(what("RMB"), ours.removable, theirs.removable);
        ensure_eq!(what("version"), ours.version, theirs.version);
        ensure_eq!(
            what("response data format"),
            ours.response_data_format,
            theirs.response_data_format
        );
        ensure_eq!(what("NormACA"), ours.normaca, theirs.normaca);
        ensure_eq!(what("HiSUP"), ours.hisup, theirs.hisup);
        ensure_eq!(what("SCCS"), ours.sccs, theirs.sccs);
        ensure_eq!(what("TPGS"), ours.tpgs, theirs.tpgs);
        ensure_eq!(what("3PC"), ours.third_party_copy, theirs.third_party_copy);
        ensure_eq!(what("Protect"), ours.protect, theirs.protect);
        ensure_eq!(what("CmdQue"), ours.cmdque, theirs.cmdque);
        ensure_eq!(what("vendor"), ours.vendor, theirs.vendor);
        ensure_eq!(what("product"), ours.product, theirs.product);
        ensure_eq!(what("revision"), ours.revision, theirs.revision);
        // What the rig built, independent of both parsers.
        let (vendor, tpc) = match kind {
            "LIO" => ("LIO-ORG", true),
            _ => ("QEMU", false),
        };
        ensure_eq!(what("expected vendor"), ours.vendor.as_str(), vendor);
        ensure_eq!(what("expected 3PC"), ours.third_party_copy, tpc);
    }
    Ok(())
}

fn sg_readcap16_matches_sg_readcap(env: &GuestEnv) -> Result<(), String> {
    for (kind, dev) in scsi_devices(env) {
        let path = dev.sg_path.display().to_string();
        let sg = scsi_sg::SgDevice::open(&dev.sg_path).map_err(|e| format!("{path}: {e}"))?;
        let ours = sg
            .read_capacity16()
            .map_err(|e| format!("{path}: READ CAPACITY(16): {e}"))?;
        let theirs = SgReadcap::parse(&tool_output("sg_readcap", &["-16", &path])?)
            .map_err(|e| format!("{path}: {e}"))?;
        let what = |field: &str| format!("{path} ({kind}) {field}");
        ensure_eq!(what("last LBA"), ours.returned_lba, theirs.last_lba);
        ensure_eq!(
            what("block count"),
            ours.block_count(),
            Some(theirs.block_count)
        );
        ensure_eq!(
            what("block length"),
            ours.logical_block_length,
            theirs.block_length
        );
        ensure_eq!(what("prot_en"), ours.prot_en, theirs.prot_en);
        ensure_eq!(what("p_type"), ours.p_type, theirs.p_type);
        ensure_eq!(what("lbpme"), ours.lbpme, theirs.lbpme);
        ensure_eq!(what("lbprz"), ours.lbprz, theirs.lbprz);
        ensure_eq!(what("LBPPBE"), ours.lbppbe, theirs.lbppbe);
        ensure_eq!(
            what("lowest aligned LBA"),
            ours.lowest_aligned_lba,
            theirs.lowest_aligned_lba
        );
        ensure_eq!(
            what("expected block length"),
            ours.logical_block_length,
            dev.block_size
        );
        ensure_eq!(
            what("expected size"),
            ours.capacity_bytes(),
            Some(dev.size_bytes)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_topologies_known() {
        let mut names: Vec<_> = TESTS.iter().map(|t| t.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), TESTS.len());
        for t in TESTS {
            assert!(
                crate::topology::Topology::named(t.topology).is_some(),
                "{}",
                t.name
            );
            assert!(!t.name.contains(char::is_whitespace));
        }
    }
}
