//! The devices a VM boot carries, declared once and shared by both sides of
//! the rig: the host turns a [`Topology`] into QEMU arguments, the guest
//! runner turns the same value into LIO configuration and device checks.
//!
//! A guest test names the topology it needs; the host boots one VM per
//! topology and runs the tests that asked for it.

use serde::{Deserialize, Serialize};

/// Name of the topology most tests run on.
pub const DEFAULT: &str = "default";
/// Controllers left to the kernel driver: one with a namespace that fails
/// reads at [`FAULT_SECTOR`] (QEMU blkdebug), to check the fault path end
/// to end, and one with a clean 4 KiB namespace with Copy limits for the
/// `ng:` leaf (io_uring passthrough on its generic node; the kernel has a
/// poll queue, `nvme.poll_queues=1`).
pub const FAULTS: &str = "faults";
/// Two controllers with one 512-byte namespace each, and two LIO LUNs:
/// block sizes that let every leaf join one stack.
pub const STACK: &str = "stack";
/// The `stack` topology with Copy limits large enough for 1 MiB commands
/// (16 ranges of up to 1 MiB, 16 MiB a command), as a drive would offer:
/// copy benchmarks measure the offload, not the rig's small limits.
pub const COPY: &str = "copy";
/// One controller whose namespace has no host I/O behind it (QEMU's null
/// driver), for the NVMe driver benchmarks: with an image file, QEMU's
/// file path (its thread pool) caps every driver at the same rate, so the
/// benchmark would measure the host, not the drivers.
pub const NVME_BENCH: &str = "nvme-bench";
/// The default rig's second controller alone, its 4 KiB namespace grown
/// to 1 GiB: the garbage-collector benchmark's store of 4 MiB segments
/// has as many segments as the embedded default's 256 MiB of 1 MiB ones.
pub const GC_BENCH: &str = "gc-bench";
/// The default rig's two controllers, the second behind a hot-pluggable
/// PCIe root port, so a test can have the host unplug it (`device_del`)
/// while I/O runs.
pub const HOTPLUG: &str = "hotplug";
/// Linux nvmet serving NVMe/TCP on the guest's loopback: a subsystem over
/// a null_blk device and one over a file, for the `nvme-tcp:` initiator
/// and the kernel's own (`nvme connect`) side by side. No QEMU devices.
pub const TCP: &str = "tcp";
/// The port nvmet listens on in the `tcp` topology.
pub const NVMET_PORT: u16 = 4420;
/// The 512-byte sector the `faults` topology fails reads of.
pub const FAULT_SECTOR: u64 = 2048;

/// Everything attached to one VM boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Name tests use to ask for this topology.
    pub name: String,
    /// QEMU NVMe controllers, bound to vfio-pci in the guest.
    pub nvme: Vec<NvmeController>,
    /// LIO fileio LUNs, all behind one tcm_loop nexus.
    pub lio_luns: Vec<LioLun>,
    /// virtio-scsi disks, left to the kernel (sd + sg).
    pub virtio_disks: Vec<VirtioDisk>,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Kernel command-line arguments added for this boot.
    pub kernel_args: Vec<String>,
    /// Linux nvmet subsystems served over TCP on 127.0.0.1.
    #[serde(default)]
    pub nvmet: Vec<NvmetSubsystem>,
}

/// One nvmet subsystem with one namespace, on port [`NVMET_PORT`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmetSubsystem {
    /// Its NQN.
    pub nqn: String,
    /// What backs its namespace.
    pub backing: NvmetBacking,
    /// Size in MiB.
    pub size_mib: u64,
}

/// What backs an nvmet namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NvmetBacking {
    /// A null_blk device that keeps what is written (`memory_backed`),
    /// served through nvmet's block-device backend.
    NullBlk,
    /// A file in the guest's tmpfs, served through nvmet's file backend
    /// (buffered: tmpfs has no O_DIRECT).
    File,
}

/// One QEMU NVMe controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeController {
    /// Serial number reported in Identify Controller.
    pub serial: String,
    /// PCI slot on bus 0, so the guest address is `0000:00:SLOT.0`; for a
    /// hot-pluggable controller, the slot of its root port.
    pub pci_slot: u8,
    /// Behind a hot-pluggable PCIe root port (QEMU device id `nvmeN`,
    /// unpluggable with `device_del`). A rig has at most one, which the
    /// guest kernel numbers bus 1.
    #[serde(default)]
    pub hotplug: bool,
    /// Namespaces, with NSIDs 1, 2, ... in order.
    pub namespaces: Vec<NvmeNamespace>,
    /// Which guest driver gets the controller.
    pub driver: GuestDriver,
}

/// Who drives a controller in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestDriver {
    /// Handed to vfio-pci, for our driver.
    Vfio,
    /// Left to the kernel's nvme driver (for reference runs and fault checks).
    Kernel,
}

impl NvmeController {
    /// The controller's PCI address in the guest.
    pub fn pci_address(&self) -> String {
        if self.hotplug {
            "0000:01:00.0".to_string()
        } else {
            format!("0000:00:{:02x}.0", self.pci_slot)
        }
    }
}

/// One namespace of a QEMU NVMe controller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NvmeNamespace {
    /// Logical block size in bytes (512 or 4096).
    pub block_size: u32,
    /// Size in MiB.
    pub size_mib: u64,
    /// What holds the namespace's data on the host.
    pub backing: NvmeBacking,
    /// Copy limits: maximum single source range length (blocks).
    pub mssrl: u16,
    /// Copy limits: maximum copy length (blocks).
    pub mcl: u32,
    /// Copy limits: maximum source range count (0's based).
    pub msrc: u8,
    /// blkdebug error rules; empty means a plain raw image.
    pub faults: Vec<BlkdebugRule>,
}

/// What holds a namespace's data on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NvmeBacking {
    /// A raw image file, created empty for each boot.
    Image,
    /// QEMU's null driver: reads return zeroes (copied into the reader's
    /// buffer), writes are dropped; no host I/O at all.
    Null,
}

/// A QEMU blkdebug `[inject-error]` rule on a namespace's backing image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlkdebugRule {
    /// blkdebug event, e.g. `read_aio` or `write_aio`.
    pub event: String,
    /// errno to inject (5 = EIO).
    pub errno: i32,
    /// 512-byte sector the rule applies to; `None` for every sector.
    pub sector: Option<u64>,
    /// Fire once, then disarm.
    pub once: bool,
}

/// One LIO fileio LUN behind the tcm_loop nexus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LioLun {
    /// `vpd_unit_serial`; LIO derives the NAA designator from its first 25
    /// hex digits, so serials must differ early.
    pub serial: String,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in MiB of the backing file (in guest memory).
    pub size_mib: u64,
}

/// One virtio-scsi disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDisk {
    /// Size of the backing image in MiB.
    pub size_mib: u64,
}

impl Topology {
    /// The rig's default: two NVMe controllers (two 512-byte namespaces on
    /// the first, one 4 KiB namespace on the second, all with Copy limits),
    /// two LIO LUNs behind one tcm_loop nexus, one virtio-scsi disk.
    pub fn default_rig() -> Topology {
        let ns = |block_size| NvmeNamespace {
            block_size,
            size_mib: 64,
            backing: NvmeBacking::Image,
            mssrl: 128,
            mcl: 256,
            msrc: 15,
            faults: Vec::new(),
        };
        Topology {
            name: DEFAULT.to_string(),
            nvme: vec![
                NvmeController {
                    serial: "USTORNVME0".to_string(),
                    pci_slot: 4,
                    hotplug: false,
                    namespaces: vec![ns(512), ns(512)],
                    driver: GuestDriver::Vfio,
                },
                NvmeController {
                    serial: "USTORNVME1".to_string(),
                    pci_slot: 5,
                    hotplug: false,
                    namespaces: vec![ns(4096)],
                    driver: GuestDriver::Vfio,
                },
            ],
            lio_luns: vec![
                LioLun {
                    serial: "01234567-89ab-4cde-8f01-23456789ab00".to_string(),
                    block_size: 512,
                    size_mib: 64,
                },
                LioLun {
                    serial: "11234567-89ab-4cde-8f01-23456789ab01".to_string(),
                    block_size: 512,
                    size_mib: 64,
                },
            ],
            virtio_disks: vec![VirtioDisk { size_mib: 32 }],
            memory_mib: 1024,
            kernel_args: Vec::new(),
            nvmet: Vec::new(),
        }
    }

    /// Two kernel-driven controllers: one whose namespace fails reads of
    /// [`FAULT_SECTOR`] with EIO, through QEMU's blkdebug; one clean, for
    /// the `ng:` leaf.
    pub fn faults() -> Topology {
        Topology {
            name: FAULTS.to_string(),
            nvme: vec![
                NvmeController {
                    serial: "USTORFAULT0".to_string(),
                    pci_slot: 4,
                    hotplug: false,
                    namespaces: vec![NvmeNamespace {
                        block_size: 512,
                        size_mib: 16,
                        backing: NvmeBacking::Image,
                        mssrl: 128,
                        mcl: 256,
                        msrc: 15,
                        faults: vec![BlkdebugRule {
                            event: "read_aio".to_string(),
                            errno: 5,
                            sector: Some(FAULT_SECTOR),
                            once: false,
                        }],
                    }],
                    driver: GuestDriver::Kernel,
                },
                NvmeController {
                    serial: "USTORKERNEL1".to_string(),
                    pci_slot: 5,
                    hotplug: false,
                    namespaces: vec![NvmeNamespace {
                        block_size: 4096,
                        size_mib: 64,
                        backing: NvmeBacking::Image,
                        mssrl: 128,
                        mcl: 256,
                        msrc: 15,
                        faults: Vec::new(),
                    }],
                    driver: GuestDriver::Kernel,
                },
            ],
            lio_luns: Vec::new(),
            virtio_disks: Vec::new(),
            memory_mib: 512,
            kernel_args: Vec::new(),
            nvmet: Vec::new(),
        }
    }

    /// Stacks across kinds and controllers: NVMe 0000:00:04.0 and
    /// 0000:00:05.0 with one 64 MiB, 512-byte namespace each (Copy limits
    /// as in the default), and the default's two LIO LUNs.
    pub fn stack() -> Topology {
        let mut topo = Topology::default_rig();
        topo.name = STACK.to_string();
        for ctrl in &mut topo.nvme {
            ctrl.namespaces.truncate(1);
            ctrl.namespaces[0].block_size = 512;
        }
        topo.virtio_disks.clear();
        topo
    }

    /// [`Topology::stack`] with large Copy limits (see [`COPY`]).
    pub fn copy() -> Topology {
        let mut topo = Topology::stack();
        topo.name = COPY.to_string();
        for ns in topo.nvme.iter_mut().flat_map(|c| c.namespaces.iter_mut()) {
            ns.mssrl = 2048;
            ns.mcl = 32768;
            ns.msrc = 15;
        }
        topo
    }

    /// The default rig's first controller alone, its namespace on the null
    /// driver (see [`NVME_BENCH`]); same controller model, same 512-byte
    /// format.
    pub fn nvme_bench() -> Topology {
        let mut topo = Topology::default_rig();
        topo.name = NVME_BENCH.to_string();
        topo.nvme.truncate(1);
        let ctrl = &mut topo.nvme[0];
        ctrl.namespaces.truncate(1);
        ctrl.namespaces[0].backing = NvmeBacking::Null;
        ctrl.namespaces[0].size_mib = 1024;
        topo.lio_luns.clear();
        topo.virtio_disks.clear();
        // Under TCG the kernel rejects the TSC and keeps time with the
        // HPET, each read of which is an emulated MMIO access: the kernel
        // I/O path (and fio) would pay that per clock read. QEMU's TSC
        // follows the host's, which is stable.
        topo.kernel_args.push("tsc=reliable".to_string());
        topo
    }

    /// The default rig's 4 KiB-namespace controller alone, the namespace
    /// 1 GiB (see [`GC_BENCH`]); same controller model, same Copy limits.
    pub fn gc_bench() -> Topology {
        let mut topo = Topology::default_rig();
        topo.name = GC_BENCH.to_string();
        topo.nvme
            .retain(|c| c.namespaces.first().is_some_and(|n| n.block_size == 4096));
        for ctrl in &mut topo.nvme {
            ctrl.namespaces.truncate(1);
            ctrl.namespaces[0].size_mib = 1024;
        }
        topo.lio_luns.clear();
        topo.virtio_disks.clear();
        topo
    }

    /// The default rig's controllers (one namespace each), the second
    /// behind a hot-pluggable root port (see [`HOTPLUG`]).
    pub fn hotplug() -> Topology {
        let mut topo = Topology::default_rig();
        topo.name = HOTPLUG.to_string();
        for ctrl in &mut topo.nvme {
            ctrl.namespaces.truncate(1);
            ctrl.namespaces[0].block_size = 512;
        }
        if let Some(second) = topo.nvme.get_mut(1) {
            second.hotplug = true;
        }
        topo.lio_luns.clear();
        topo.virtio_disks.clear();
        topo
    }

    /// nvmet over TCP on loopback (see [`TCP`]): no QEMU devices, a
    /// 256 MiB null_blk subsystem and a 64 MiB file subsystem, 4 KiB
    /// blocks.
    pub fn tcp() -> Topology {
        let mut topo = Topology::default_rig();
        topo.name = TCP.to_string();
        topo.nvme.clear();
        topo.lio_luns.clear();
        topo.virtio_disks.clear();
        topo.kernel_args.push("tsc=reliable".to_string());
        topo.nvmet = vec![
            NvmetSubsystem {
                nqn: "nqn.2026-01.io.ustor:nullb".to_string(),
                backing: NvmetBacking::NullBlk,
                size_mib: 256,
            },
            NvmetSubsystem {
                nqn: "nqn.2026-01.io.ustor:file".to_string(),
                backing: NvmetBacking::File,
                // As the rig's other stores: the gc test's workload makes
                // the cleaner run on 64 MiB.
                size_mib: 64,
            },
        ];
        topo
    }

    /// Looks a topology up by the name a test gave.
    pub fn named(name: &str) -> Option<Topology> {
        match name {
            DEFAULT => Some(Topology::default_rig()),
            FAULTS => Some(Topology::faults()),
            STACK => Some(Topology::stack()),
            COPY => Some(Topology::copy()),
            NVME_BENCH => Some(Topology::nvme_bench()),
            GC_BENCH => Some(Topology::gc_bench()),
            HOTPLUG => Some(Topology::hotplug()),
            TCP => Some(Topology::tcp()),
            _ => None,
        }
    }

    /// Names of every topology the rig knows.
    pub fn names() -> &'static [&'static str] {
        &[
            DEFAULT, FAULTS, STACK, COPY, NVME_BENCH, GC_BENCH, HOTPLUG, TCP,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_resolves_to_itself() {
        for name in Topology::names() {
            let topo = Topology::named(name).expect("listed topology resolves");
            assert_eq!(topo.name, *name);
        }
        assert!(Topology::named("no-such-topology").is_none());
    }

    #[test]
    fn lio_serials_differ_in_the_digits_lio_keeps() {
        // LIO keeps the first 25 hex digits of the serial for the NAA.
        for name in Topology::names() {
            let topo = Topology::named(name).unwrap();
            let keys: Vec<String> = topo
                .lio_luns
                .iter()
                .map(|l| {
                    l.serial
                        .chars()
                        .filter(|c| c.is_ascii_hexdigit())
                        .take(25)
                        .collect()
                })
                .collect();
            let mut unique = keys.clone();
            unique.sort();
            unique.dedup();
            assert_eq!(unique.len(), keys.len(), "NAA collision in {name}");
        }
    }

    #[test]
    fn pci_addresses_are_distinct_and_formatted() {
        let topo = Topology::default_rig();
        let addrs: Vec<String> = topo.nvme.iter().map(|c| c.pci_address()).collect();
        assert_eq!(addrs, ["0000:00:04.0", "0000:00:05.0"]);
    }
}
