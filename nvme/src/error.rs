//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::vfio::PciAddress;

/// Errors of the NVMe driver and its VFIO/PCI transport.
///
/// Each variant names the device, path or range it concerns. Messages for
/// set-up errors say how to fix the system, since that is what a user who
/// sees them needs. Underlying OS errors are kept as `#[source]` (not
/// repeated in the message), so `raw_os_error()` stays available.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A PCI address string did not parse.
    #[error("invalid PCI address {input:?}: {reason} (expected DDDD:BB:DD.F, e.g. 0000:00:04.0)")]
    InvalidPciAddress {
        /// The input, truncated to 64 characters.
        input: String,
        /// What was wrong with it.
        reason: &'static str,
    },

    /// No PCI device with this address.
    #[error("no PCI device {addr}: {} does not exist", .path.display())]
    NoSuchDevice {
        /// The address asked for.
        addr: PciAddress,
        /// The sysfs path that is missing.
        path: PathBuf,
    },

    /// The device is not bound to vfio-pci.
    #[error(
        "PCI device {addr} is {}, not vfio-pci; bind it with: \
         modprobe vfio-pci; modprobe vfio_iommu_type1; {}\
         echo vfio-pci > /sys/bus/pci/devices/{addr}/driver_override; \
         echo {addr} > /sys/bus/pci/drivers_probe",
        describe_driver(.driver),
        unbind_step(.addr, .driver)
    )]
    NotBoundToVfio {
        /// The device.
        addr: PciAddress,
        /// The driver it is bound to, if any.
        driver: Option<String>,
    },

    /// The device has no IOMMU group: the IOMMU is off or absent.
    #[error(
        "PCI device {addr} has no IOMMU group: enable the IOMMU \
         (kernel command line intel_iommu=on or amd_iommu=on, and VT-d/AMD-Vi in firmware; \
         in QEMU: -machine q35,kernel-irqchip=split -device intel-iommu,intremap=on,caching-mode=on)"
    )]
    IommuAbsent {
        /// The device.
        addr: PciAddress,
    },

    /// A VFIO device node does not exist (module not loaded, or the
    /// device not bound to vfio-pci).
    #[error(
        "{} does not exist: load VFIO and bind the controller to it: \
         modprobe vfio-pci; modprobe vfio_iommu_type1; \
         echo vfio-pci > /sys/bus/pci/devices/{addr}/driver_override; \
         echo {addr} > /sys/bus/pci/drivers_probe",
        .path.display(),
        addr = describe_addr(.addr)
    )]
    VfioUnavailable {
        /// The missing node, e.g. `/dev/vfio/vfio`.
        path: PathBuf,
        /// The controller being opened, where known.
        addr: Option<PciAddress>,
        /// The OS error (ENOENT).
        #[source]
        source: io::Error,
    },

    /// The kernel offers no type1 IOMMU backend for VFIO.
    #[error("VFIO type1 IOMMU backend unavailable: modprobe vfio_iommu_type1")]
    NoType1Iommu {
        /// The underlying error, if the kernel gave one.
        #[source]
        source: Option<io::Error>,
    },

    /// Opening a device node was refused.
    #[error(
        "permission denied opening {}: run as root, or give this user access to the \
         VFIO nodes (and a large enough RLIMIT_MEMLOCK for DMA memory)",
        .path.display()
    )]
    Permission {
        /// The node, e.g. `/dev/vfio/vfio` or `/dev/vfio/12`.
        path: PathBuf,
        /// The OS error (EACCES or EPERM).
        #[source]
        source: io::Error,
    },

    /// The IOMMU group holds devices not bound to vfio-pci.
    #[error(
        "IOMMU group {group} of {addr} is not viable: every device in \
         /sys/kernel/iommu_groups/{group}/devices must be bound to vfio-pci or unbound \
         (offending: {})",
        describe_list(.offenders)
    )]
    GroupNotViable {
        /// The device asked for.
        addr: PciAddress,
        /// The IOMMU group number.
        group: u32,
        /// Devices of the group bound to another driver, as `addr (driver)`.
        offenders: Vec<String>,
    },

    /// The group or device is already open (in this or another process).
    #[error("PCI device {addr} (IOMMU group {group}) is busy: already opened through VFIO")]
    DeviceBusy {
        /// The device.
        addr: PciAddress,
        /// Its IOMMU group.
        group: u32,
    },

    /// A VFIO ioctl or device access failed.
    #[error("VFIO {op} failed on {target}")]
    Vfio {
        /// The operation, e.g. `VFIO_DEVICE_GET_REGION_INFO`.
        op: &'static str,
        /// What it was done on: a PCI address or a device node.
        target: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// An emulated namespace's backing file could not be opened.
    #[error("emulated namespace backing file {}", .path.display())]
    BackingFile {
        /// The file.
        path: PathBuf,
        /// Why (the cause says what to do).
        #[source]
        source: io::Error,
    },

    /// Reading sysfs failed unexpectedly.
    #[error("cannot read {}", .path.display())]
    Sysfs {
        /// The path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// BAR0 cannot be mmap'ed (not a memory BAR, or VFIO refuses).
    #[error("BAR0 of {addr} cannot be mmap'ed (VFIO region flags {flags:#x})")]
    Bar0NotMappable {
        /// The device.
        addr: PciAddress,
        /// The VFIO region flags.
        flags: u32,
    },

    /// BAR0 is too small for the registers and the admin and one I/O
    /// queue's doorbells.
    #[error("BAR0 of {addr} is {size:#x} bytes; at least {needed:#x} are needed")]
    Bar0TooSmall {
        /// The device.
        addr: PciAddress,
        /// BAR0 size.
        size: u64,
        /// Size needed at the device's doorbell stride.
        needed: u64,
    },

    /// No free IOVA range can hold the allocation.
    #[error("IOVA space exhausted: no free range of {len:#x} bytes aligned to {align:#x}")]
    IovaExhausted {
        /// Bytes asked for (rounded to the IOMMU page size).
        len: u64,
        /// Alignment asked for.
        align: u64,
    },

    /// The IOMMU reports no usable IOVA range.
    #[error("the IOMMU reports no usable IOVA range")]
    NoIovaRange,

    /// Allocating DMA memory failed.
    #[error("cannot allocate {len} bytes of DMA memory")]
    DmaAlloc {
        /// Bytes asked for.
        len: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The IOMMU mapping hit the locked-memory limit (VFIO pins DMA memory
    /// and charges it to RLIMIT_MEMLOCK).
    #[error(
        "cannot pin {len} bytes of DMA memory: raise the locked-memory limit \
         (ulimit -l, or LimitMEMLOCK= in systemd) or run as root"
    )]
    MemlockLimit {
        /// Bytes being mapped.
        len: usize,
        /// The OS error (ENOMEM).
        #[source]
        source: io::Error,
    },

    /// A DMA buffer access falls outside the buffer.
    #[error("access of {len} bytes at offset {offset:#x} is outside a {size}-byte DMA buffer")]
    DmaOutOfBounds {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
        /// Buffer length.
        size: usize,
    },

    /// A typed DMA buffer access is not naturally aligned.
    #[error("offset {offset:#x} is not aligned to {align} bytes")]
    DmaMisaligned {
        /// Offset asked for.
        offset: usize,
        /// Alignment required.
        align: usize,
    },

    /// An argument is out of its valid range.
    #[error("invalid argument: {0}")]
    InvalidArgument(&'static str),

    /// The controller did not reach a state within its timeout.
    #[error("{device}: timed out after {waited_ms} ms waiting for {what}")]
    ControllerTimeout {
        /// The controller.
        device: String,
        /// What was awaited, e.g. "CSTS.RDY = 1".
        what: &'static str,
        /// How long we waited.
        waited_ms: u64,
    },

    /// The controller reports Controller Fatal Status (CSTS.CFS): it needs
    /// a reset.
    #[error("{device}: controller fatal status (CSTS.CFS = 1); reset the controller")]
    ControllerFatal {
        /// The controller.
        device: String,
    },

    /// The controller is gone: its registers read all ones (surprise
    /// removal, a link down), or its removal was requested (VFIO device
    /// request). Every outstanding command was failed; nothing more is
    /// sent to it.
    #[error(
        "{device}: controller removed (registers read all ones, or removal requested); open another device or re-attach it"
    )]
    DeviceRemoved {
        /// The controller.
        device: String,
    },

    /// An admin command completed with an error status.
    #[error("{device}: admin command {command} failed: {status}")]
    AdminCommand {
        /// The controller.
        device: String,
        /// The command, e.g. "Create I/O CQ 3".
        command: String,
        /// Its status.
        status: crate::spec::NvmeStatus,
    },

    /// An admin command did not complete in time.
    #[error("{device}: admin command {command} timed out after {waited_ms} ms")]
    AdminTimeout {
        /// The controller.
        device: String,
        /// The command.
        command: String,
        /// How long we waited.
        waited_ms: u64,
    },

    /// The device supplied data that violates the specification (a CID or
    /// SQ head out of range, an impossible identify field).
    #[error("{device}: bad data from the device: {what}")]
    BadDeviceData {
        /// The controller.
        device: String,
        /// What was wrong.
        what: String,
    },

    /// The controller lacks something the driver needs.
    #[error("{device}: unsupported: {what}")]
    Unsupported {
        /// The controller.
        device: String,
        /// What is missing.
        what: String,
    },

    /// An NVMe/TCP connection or its controller failed.
    #[error(transparent)]
    Tcp(Box<crate::tcp::TcpError>),

    /// No I/O queue id is free.
    #[error("{device}: all {granted} I/O queue pairs are in use")]
    NoFreeQueue {
        /// The controller.
        device: String,
        /// Queue pairs the controller granted.
        granted: u16,
    },
}

fn describe_addr(addr: &Option<PciAddress>) -> String {
    addr.map_or_else(|| "DDDD:BB:DD.F".to_owned(), |a| a.to_string())
}

fn describe_driver(driver: &Option<String>) -> String {
    match driver {
        Some(d) => format!("bound to {d}"),
        None => "not bound to any driver".to_owned(),
    }
}

fn unbind_step(addr: &PciAddress, driver: &Option<String>) -> String {
    match driver {
        Some(_) => format!("echo {addr} > /sys/bus/pci/devices/{addr}/driver/unbind; "),
        None => String::new(),
    }
}

fn describe_list(items: &[String]) -> String {
    if items.is_empty() {
        "unknown".to_owned()
    } else {
        items.join(", ")
    }
}

/// Result with [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_how_to_fix() {
        let addr: PciAddress = "0000:00:04.0".parse().expect("valid");
        let e = Error::NotBoundToVfio {
            addr,
            driver: Some("nvme".into()),
        };
        let msg = e.to_string();
        assert!(msg.contains("bound to nvme"), "{msg}");
        assert!(
            msg.contains("echo 0000:00:04.0 > /sys/bus/pci/devices/0000:00:04.0/driver/unbind")
        );
        assert!(msg.contains("echo vfio-pci > /sys/bus/pci/devices/0000:00:04.0/driver_override"));
        assert!(msg.contains("echo 0000:00:04.0 > /sys/bus/pci/drivers_probe"));
        assert!(msg.contains("modprobe vfio-pci") && msg.contains("vfio_iommu_type1"));

        let e = Error::NotBoundToVfio { addr, driver: None };
        let msg = e.to_string();
        assert!(msg.contains("not bound to any driver"), "{msg}");
        assert!(!msg.contains("unbind"), "{msg}");
        assert!(msg.contains("vfio_iommu_type1; echo vfio-pci > "), "{msg}");

        let e = Error::IommuAbsent { addr };
        assert!(e.to_string().contains("intel_iommu=on"));

        let e = Error::GroupNotViable {
            addr,
            group: 7,
            offenders: vec!["0000:00:05.0 (e1000)".into()],
        };
        let msg = e.to_string();
        assert!(
            msg.contains("group 7") && msg.contains("0000:00:05.0 (e1000)"),
            "{msg}"
        );
    }
}
