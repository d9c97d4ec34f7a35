//! Guest-side rig setup: reference captures, vfio-pci binding, LIO.

use crate::runner::wait_for;
use crate::topology::{
    GuestDriver, LioLun, NVMET_PORT, NvmeController, NvmetBacking, NvmetSubsystem, Topology,
};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where setup records what it found, for the tests to read.
pub const DEVICES_PATH: &str = "/run/ustor/devices.json";
/// Where reference-tool output captured during setup is kept.
pub const REFERENCE_DIR: &str = "/run/ustor/ref";

const PCI_DEVICES: &str = "/sys/bus/pci/devices";
const PCI_DRIVERS_PROBE: &str = "/sys/bus/pci/drivers_probe";
const CONFIGFS_TARGET: &str = "/sys/kernel/config/target";
const SCSI_GENERIC: &str = "/sys/class/scsi_generic";
/// NVMe over PCIe: mass storage, non-volatile memory, NVMe interface.
const NVME_CLASS: &str = "0x010802";
const DEVICE_WAIT: Duration = Duration::from_secs(30);

/// An NVMe controller as the tests find it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NvmeDevice {
    /// PCI address, e.g. `0000:00:04.0`.
    pub pci_address: String,
    /// The topology entry it came from.
    pub spec: NvmeController,
    /// Name the kernel gave the controller before it was unbound (`nvme0`).
    pub kernel_name: String,
    /// Directory holding reference-tool output captured from the kernel
    /// driver before the controller was handed to vfio-pci.
    pub reference_dir: PathBuf,
}

/// A SCSI device reachable through sg.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ScsiDevice {
    /// The sg node, e.g. `/dev/sg1`.
    pub sg_path: PathBuf,
    /// The block node, e.g. `/dev/sdb`, when sd claimed it.
    pub block_path: Option<PathBuf>,
    /// SCSI address host:channel:target:lun.
    pub hctl: String,
    /// Expected logical block size.
    pub block_size: u32,
    /// Expected size in bytes.
    pub size_bytes: u64,
    /// The LUN's unit serial, for LIO LUNs.
    pub serial: Option<String>,
}

/// Everything setup found, saved for the tests.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Devices {
    /// NVMe controllers, now bound to vfio-pci, in topology order.
    pub nvme: Vec<NvmeDevice>,
    /// LIO LUNs, in topology order.
    pub lio: Vec<ScsiDevice>,
    /// virtio-scsi disks, in topology order.
    pub virtio: Vec<ScsiDevice>,
    /// nvmet subsystems served over TCP, in topology order.
    #[serde(default)]
    pub nvmet: Vec<NvmetDevice>,
}

/// An nvmet subsystem served over TCP on loopback.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NvmetDevice {
    /// The subsystem NQN.
    pub nqn: String,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The block device or file behind its namespace.
    pub backing_path: String,
    /// Namespace size in bytes.
    pub size_bytes: u64,
    /// Block size.
    pub block_size: u32,
}

impl NvmetDevice {
    /// The `nvme-tcp:` leaf spec of its namespace 1.
    pub fn spec(&self) -> String {
        format!("nvme-tcp:{}/{}/1", self.addr, self.nqn)
    }
}

impl Devices {
    /// Saves the device map where the tests look for it.
    pub fn save(&self) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        write(DEVICES_PATH, &text)
    }

    /// Loads the device map setup saved.
    pub fn load() -> Result<Devices, String> {
        let text =
            fs::read_to_string(DEVICES_PATH).map_err(|e| format!("reading {DEVICES_PATH}: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("parsing {DEVICES_PATH}: {e}"))
    }
}

fn write(path: impl AsRef<Path>, text: &str) -> Result<(), String> {
    let path = path.as_ref();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    fs::write(path, text).map_err(|e| format!("writing {:?} to {}: {e}", text, path.display()))
}

fn read_trimmed(path: impl AsRef<Path>) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

/// Runs a reference tool and returns its standard output; a non-zero exit
/// is an error carrying its standard error.
pub fn tool_output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Prepares every device of `topology` and returns what it found.
pub fn prepare(topology: &Topology) -> Result<Devices, String> {
    let mut devices = Devices::default();
    for ctrl in &topology.nvme {
        devices.nvme.push(prepare_nvme(ctrl)?);
    }
    devices.lio = prepare_lio(&topology.lio_luns)?;
    devices.virtio = find_virtio_disks(topology)?;
    devices.nvmet = prepare_nvmet(&topology.nvmet)?;
    Ok(devices)
}

/// The host identity both NVMe/TCP initiators use (nvme-cli and ours read
/// these files).
const HOST_NQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6e7573746f722d677565737400000001";
const HOST_ID: &str = "6e757374-6f72-2d67-7565-737400000001";
const NVMET: &str = "/sys/kernel/config/nvmet";
const NULLB: &str = "/sys/kernel/config/nullb";

fn modprobe(module: &str) -> Result<(), String> {
    tool_output("modprobe", &[module]).map(|_| ())
}

/// Serves `subsystems` with nvmet over TCP on 127.0.0.1.
fn prepare_nvmet(subsystems: &[NvmetSubsystem]) -> Result<Vec<NvmetDevice>, String> {
    if subsystems.is_empty() {
        return Ok(Vec::new());
    }
    tool_output("ifconfig", &["lo", "127.0.0.1", "up"])?;
    write("/etc/nvme/hostnqn", &format!("{HOST_NQN}\n"))?;
    write("/etc/nvme/hostid", &format!("{HOST_ID}\n"))?;
    // null_blk with no devices of its own: they are made in configfs,
    // sized in MiB and keeping what is written.
    tool_output("modprobe", &["null_blk", "nr_devices=0"])?;
    for m in ["nvmet", "nvmet_tcp", "nvme_tcp"] {
        modprobe(m)?;
    }
    let port = format!("{NVMET}/ports/1");
    fs::create_dir_all(&port).map_err(|e| format!("creating {port}: {e}"))?;
    write(format!("{port}/addr_trtype"), "tcp")?;
    write(format!("{port}/addr_adrfam"), "ipv4")?;
    write(format!("{port}/addr_traddr"), "127.0.0.1")?;
    write(format!("{port}/addr_trsvcid"), &NVMET_PORT.to_string())?;
    let mut out = Vec::new();
    for (i, sub) in subsystems.iter().enumerate() {
        let size = sub.size_mib << 20;
        let backing_path = match sub.backing {
            NvmetBacking::NullBlk => {
                let dev = format!("{NULLB}/ustor{i}");
                fs::create_dir_all(&dev).map_err(|e| format!("creating {dev}: {e}"))?;
                write(format!("{dev}/size"), &sub.size_mib.to_string())?;
                // 4 KiB, as the file backend's (tmpfs's block size): one
                // stripe can take both, and the store's 4 KiB blocks fit.
                write(format!("{dev}/blocksize"), "4096")?;
                write(format!("{dev}/memory_backed"), "1")?;
                write(format!("{dev}/power"), "1")?;
                let index = read_trimmed(format!("{dev}/index"))
                    .ok_or_else(|| format!("{dev}/index unreadable"))?;
                // Kernels name a configfs device nullbINDEX, or, newer
                // ones, after its configfs directory.
                let names = [format!("/dev/nullb{index}"), format!("/dev/ustor{i}")];
                let mut found = None;
                wait_for(
                    &format!("{} or {} to appear", names[0], names[1]),
                    DEVICE_WAIT,
                    || {
                        found = names.iter().find(|p| Path::new(p).exists()).cloned();
                        found.is_some()
                    },
                )?;
                found.unwrap_or_default()
            }
            NvmetBacking::File => {
                let path = format!("/run/ustor/nvmet{i}.img");
                fs::create_dir_all("/run/ustor")
                    .map_err(|e| format!("creating /run/ustor: {e}"))?;
                let f = fs::File::create(&path).map_err(|e| format!("creating {path}: {e}"))?;
                f.set_len(size).map_err(|e| format!("sizing {path}: {e}"))?;
                path
            }
        };
        let subsys = format!("{NVMET}/subsystems/{}", sub.nqn);
        fs::create_dir_all(&subsys).map_err(|e| format!("creating {subsys}: {e}"))?;
        write(format!("{subsys}/attr_allow_any_host"), "1")?;
        let ns = format!("{subsys}/namespaces/1");
        fs::create_dir_all(&ns).map_err(|e| format!("creating {ns}: {e}"))?;
        write(format!("{ns}/device_path"), &backing_path)?;
        if sub.backing == NvmetBacking::File {
            // tmpfs has no O_DIRECT.
            write(format!("{ns}/buffered_io"), "1")?;
        }
        write(format!("{ns}/enable"), "1")?;
        let link = format!("{port}/subsystems/{}", sub.nqn);
        std::os::unix::fs::symlink(&subsys, &link)
            .map_err(|e| format!("linking {link} -> {subsys}: {e}"))?;
        out.push(NvmetDevice {
            nqn: sub.nqn.clone(),
            addr: format!("127.0.0.1:{NVMET_PORT}"),
            backing_path,
            size_bytes: size,
            block_size: 4096,
        });
    }
    Ok(out)
}

fn driver_of(pci_address: &str) -> Option<String> {
    let link = fs::read_link(format!("{PCI_DEVICES}/{pci_address}/driver")).ok()?;
    link.file_name().map(|n| n.to_string_lossy().into_owned())
}

fn prepare_nvme(ctrl: &NvmeController) -> Result<NvmeDevice, String> {
    let addr = ctrl.pci_address();
    let dev = format!("{PCI_DEVICES}/{addr}");
    let class = read_trimmed(format!("{dev}/class"))
        .ok_or_else(|| format!("no PCI device at {addr}: the topology asked for one"))?;
    if class != NVME_CLASS {
        return Err(format!("{addr} has class {class}, not NVMe ({NVME_CLASS})"));
    }
    // The kernel nvme driver is built in and claims the controller at boot;
    // capture its view for the cross-checks before taking it away.
    let nvme_dir = format!("{dev}/nvme");
    wait_for(&format!("the kernel to probe {addr}"), DEVICE_WAIT, || {
        fs::read_dir(&nvme_dir).is_ok_and(|mut d| d.next().is_some())
    })?;
    let kernel_name = fs::read_dir(&nvme_dir)
        .map_err(|e| format!("reading {nvme_dir}: {e}"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("nvme"))
        .ok_or_else(|| format!("{addr}: the kernel driver created no controller"))?;
    let node = format!("/dev/{kernel_name}");
    wait_for(&node, DEVICE_WAIT, || Path::new(&node).exists())?;
    let reference_dir = PathBuf::from(format!("{REFERENCE_DIR}/nvme/{addr}"));
    for (file, args) in [
        ("show-regs.txt", vec!["show-regs", node.as_str()]),
        (
            "show-regs-human.txt",
            vec!["show-regs", "-H", node.as_str()],
        ),
        ("id-ctrl.json", vec!["id-ctrl", "-o", "json", node.as_str()]),
    ] {
        let text = tool_output("nvme", &args)?;
        write(reference_dir.join(file), &text)?;
    }
    // Namespaces: the kernel names them <ctrl>n<nsid>.
    for nsid in 1..=ctrl.namespaces.len() {
        let ns_node = format!("/dev/{kernel_name}n{nsid}");
        wait_for(&ns_node, DEVICE_WAIT, || Path::new(&ns_node).exists())?;
        let text = tool_output("nvme", &["id-ns", "-o", "json", &ns_node])?;
        write(reference_dir.join(format!("id-ns-{nsid}.json")), &text)?;
    }

    if ctrl.driver == GuestDriver::Vfio {
        bind_vfio(&addr)?;
    }
    Ok(NvmeDevice {
        pci_address: addr,
        spec: ctrl.clone(),
        kernel_name,
        reference_dir,
    })
}

/// Hands a PCI device to `driver` (`vfio-pci`, `nvme`), unbinding it from
/// whatever holds it now. Benchmarks use it to run the kernel path and ours
/// on the same controller in one boot.
pub fn rebind(addr: &str, driver: &str) -> Result<(), String> {
    let dev = format!("{PCI_DEVICES}/{addr}");
    if driver_of(addr).as_deref() == Some(driver) {
        return Ok(());
    }
    if driver_of(addr).is_some() {
        write(format!("{dev}/driver/unbind"), addr)?;
    }
    write(format!("{dev}/driver_override"), driver)?;
    write(PCI_DRIVERS_PROBE, addr)?;
    wait_for(&format!("{driver} to bind {addr}"), DEVICE_WAIT, || {
        driver_of(addr).as_deref() == Some(driver)
    })
}

/// Hands the controller at `addr` to the kernel's nvme driver (if it is
/// not there already) and returns the block node of its namespace 1 once
/// it appears.
pub fn kernel_namespace(addr: &str) -> Result<String, String> {
    rebind(addr, "nvme")?;
    let dir = format!("{PCI_DEVICES}/{addr}/nvme");
    let mut node = None;
    wait_for(
        &format!("a namespace of {addr} under nvme"),
        DEVICE_WAIT,
        || {
            node = fs::read_dir(&dir).ok().and_then(|ctrls| {
                ctrls
                    .flatten()
                    .map(|c| format!("/dev/{}n1", c.file_name().to_string_lossy()))
                    .find(|n| Path::new(n).exists())
            });
            node.is_some()
        },
    )?;
    node.ok_or_else(|| format!("{addr}: no namespace block device"))
}

/// Hands a PCI device to vfio-pci and waits for its group node.
pub fn bind_vfio(addr: &str) -> Result<(), String> {
    let dev = format!("{PCI_DEVICES}/{addr}");
    rebind(addr, "vfio-pci")?;
    let group = fs::read_link(format!("{dev}/iommu_group"))
        .map_err(|e| format!("{addr} has no IOMMU group ({e}): is intel_iommu=on set?"))?;
    let group = group
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let node = format!("/dev/vfio/{group}");
    wait_for(&node, DEVICE_WAIT, || Path::new(&node).exists())
}

fn naa_wwn(seed: u64) -> String {
    // An NAA-5 (IEEE registered) style WWN; only needs to be well formed
    // and unique within the guest.
    format!("naa.5001405{seed:09x}")
}

fn prepare_lio(luns: &[LioLun]) -> Result<Vec<ScsiDevice>, String> {
    if luns.is_empty() {
        return Ok(Vec::new());
    }
    if !Path::new(CONFIGFS_TARGET).exists() {
        return Err(format!(
            "{CONFIGFS_TARGET} is missing: configfs not mounted or target_core_mod not loaded"
        ));
    }
    let target = naa_wwn(0x1);
    let tpg = format!("{CONFIGFS_TARGET}/loopback/{target}/tpgt_1");
    for (i, lun) in luns.iter().enumerate() {
        let backstore = format!("{CONFIGFS_TARGET}/core/fileio_0/ustor{i}");
        let image = format!("/run/ustor/lio/lun{i}.img");
        let size = lun.size_mib << 20;
        fs::create_dir_all("/run/ustor/lio")
            .map_err(|e| format!("creating /run/ustor/lio: {e}"))?;
        let file = fs::File::create(&image).map_err(|e| format!("creating {image}: {e}"))?;
        file.set_len(size)
            .map_err(|e| format!("sizing {image} to {size} bytes: {e}"))?;
        fs::create_dir_all(&backstore).map_err(|e| format!("creating {backstore}: {e}"))?;
        write(
            format!("{backstore}/control"),
            &format!("fd_dev_name={image},fd_dev_size={size}"),
        )?;
        // The serial must be set before enable and before the LUN is
        // linked, or VPD 0x83 carries no NAA designator.
        write(format!("{backstore}/wwn/vpd_unit_serial"), &lun.serial)?;
        write(
            format!("{backstore}/attrib/block_size"),
            &lun.block_size.to_string(),
        )?;
        write(format!("{backstore}/enable"), "1")?;
        fs::create_dir_all(format!("{tpg}/lun/lun_{i}"))
            .map_err(|e| format!("creating {tpg}/lun/lun_{i}: {e}"))?;
    }
    write(format!("{tpg}/nexus"), &naa_wwn(0x2))?;
    for i in 0..luns.len() {
        let backstore = format!("{CONFIGFS_TARGET}/core/fileio_0/ustor{i}");
        let link = format!("{tpg}/lun/lun_{i}/ustor{i}");
        std::os::unix::fs::symlink(&backstore, &link)
            .map_err(|e| format!("linking {link} -> {backstore}: {e}"))?;
    }

    let mut found = Vec::new();
    wait_for("the LIO LUNs to appear as sg devices", DEVICE_WAIT, || {
        found = scsi_devices_with_vendor("LIO-ORG");
        found.len() >= luns.len()
    })?;
    if found.len() != luns.len() {
        return Err(format!(
            "expected {} LIO LUNs, found {}",
            luns.len(),
            found.len()
        ));
    }
    // One nexus, so one SCSI host: the LUN number is the topology index.
    found.sort_by_key(|d| lun_number(&d.hctl));
    for (dev, (i, lun)) in found.iter_mut().zip(luns.iter().enumerate()) {
        if lun_number(&dev.hctl) != Some(i as u64) {
            return Err(format!(
                "LIO LUN {i} not found: {} is at {}",
                dev.sg_path.display(),
                dev.hctl
            ));
        }
        dev.block_size = lun.block_size;
        dev.size_bytes = lun.size_mib << 20;
        dev.serial = Some(lun.serial.clone());
    }
    Ok(found)
}

fn lun_number(hctl: &str) -> Option<u64> {
    hctl.rsplit(':').next()?.parse().ok()
}

fn hctl_tuple(hctl: &str) -> Vec<u64> {
    hctl.split(':').filter_map(|p| p.parse().ok()).collect()
}

fn find_virtio_disks(topology: &Topology) -> Result<Vec<ScsiDevice>, String> {
    let mut found = Vec::new();
    let want = topology.virtio_disks.len();
    wait_for("the virtio-scsi disks to appear", DEVICE_WAIT, || {
        found = scsi_devices_with_vendor("QEMU");
        found.len() >= want
    })?;
    if found.len() != want {
        return Err(format!(
            "expected {want} virtio-scsi disks, found {}",
            found.len()
        ));
    }
    found.sort_by_key(|d| hctl_tuple(&d.hctl));
    for (dev, disk) in found.iter_mut().zip(&topology.virtio_disks) {
        dev.block_size = 512;
        dev.size_bytes = disk.size_mib << 20;
    }
    Ok(found)
}

/// sg devices whose INQUIRY vendor (as sysfs reports it) is `vendor`.
fn scsi_devices_with_vendor(vendor: &str) -> Vec<ScsiDevice> {
    let Ok(entries) = fs::read_dir(SCSI_GENERIC) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let sg = entry.file_name().to_string_lossy().into_owned();
        let device = entry.path().join("device");
        if read_trimmed(device.join("vendor")).as_deref() != Some(vendor) {
            continue;
        }
        let Some(hctl) = fs::canonicalize(&device)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        else {
            continue;
        };
        let block_path = fs::read_dir(device.join("block"))
            .ok()
            .and_then(|mut d| d.next())
            .and_then(|e| e.ok())
            .map(|e| PathBuf::from("/dev").join(e.file_name()));
        let sg_path = PathBuf::from("/dev").join(&sg);
        if !sg_path.exists() {
            continue;
        }
        out.push(ScsiDevice {
            sg_path,
            block_path,
            hctl,
            block_size: 0,
            size_bytes: 0,
            serial: None,
        });
    }
    out
}
