//! Tests of the rig itself: the devices match the topology, faults reach the guest.

use super::{GuestEnv, GuestTest, Kind};
use crate::topology::{DEFAULT, FAULT_SECTOR, FAULTS, GuestDriver};
use std::time::Duration;

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "rig_devices_match_topology",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(30),
        run: rig_devices_match_topology,
    },
    GuestTest {
        name: "blkdebug_read_fault_reaches_the_guest",
        kind: Kind::Test,
        topology: FAULTS,
        timeout: Duration::from_secs(60),
        run: blkdebug_read_fault_reaches_the_guest,
    },
];

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
