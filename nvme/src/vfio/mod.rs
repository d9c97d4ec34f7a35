//! VFIO/PCI transport: open an NVMe controller bound to vfio-pci, enable it
//! on the bus, map its registers (BAR0) and allocate DMA memory in its IOMMU
//! domain.
//!
//! Opening follows the kernel's VFIO model (Documentation/driver-api/vfio.rst):
//! one container (`/dev/vfio/vfio`, an IOMMU domain) per [`VfioPci`], the
//! device's IOMMU group (`/dev/vfio/<group>`) attached to it, then the
//! device fd. The [`vfio_ioctls`] crate does those steps; before calling it we
//! check the preconditions in sysfs so that every way it can fail gets a
//! precise [`Error`] with the fix in its message.
//!
//! Device memory (BAR0) is reached only through [`Bar`]'s
//! [`RegisterAccess`] implementation; host memory the device uses only
//! through [`DmaBuffer`].

mod iova;
mod pci;
pub(crate) mod sys;

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::ptr;
use std::sync::{Arc, Mutex, PoisonError};

use memmap2::{MmapOptions, MmapRaw};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_REQ_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioError};
use vmm_sys_util::eventfd::EventFd;

pub use crate::dma::{BASE_PAGE_SIZE, DmaBuffer, DmaContext, HUGE_PAGE_SIZE};
pub use iova::{IovaAllocator, IovaRange};
pub use pci::PciAddress;

use crate::error::{Error, Result};
use crate::mmio::{RegisterAccess, max_doorbell_qid};
use crate::regs::{self, Cap, Version};
use pci::SysRoot;

/// PCI configuration space: Command register offset.
pub const PCI_COMMAND: u64 = 0x04;
/// PCI Command: Memory Space Enable.
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// PCI Command: Bus Master Enable.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// PCI configuration space: Class Code (revision ID in the low byte).
pub const PCI_CLASS_REVISION: u64 = 0x08;
/// Class code of an NVMe controller (mass storage, NVM, NVM Express).
pub const PCI_CLASS_NVME: u32 = 0x01_08_02;

/// Converts a vfio-ioctls error to an `io::Error`, keeping the errno when
/// the error carries one and the message otherwise.
pub(crate) fn vfio_io_error(e: VfioError) -> io::Error {
    match e {
        VfioError::OpenContainer(e) | VfioError::OpenGroup(e, _) => e,
        VfioError::ContainerSetIOMMU(e)
        | VfioError::GroupGetDeviceFD(e)
        | VfioError::VfioDeviceGetInfo(e)
        | VfioError::VfioDeviceGetRegionInfo(e)
        | VfioError::IommuDmaMap(e)
        | VfioError::IommuDmaUnmap(e) => io::Error::from_raw_os_error(e.errno()),
        other => io::Error::other(other),
    }
}

/// An NVMe controller's BAR0, mmap'ed through the VFIO device fd.
///
/// Implements [`RegisterAccess`] with volatile accesses bounds-checked
/// against the mapping: an out-of-window or misaligned offset (a driver bug)
/// trips a `debug_assert!`, and in release builds reads return all ones and
/// writes are dropped, with an error logged. It is `Send + Sync`: registers
/// and doorbells are device state, and each access is a single volatile
/// load or store.
pub struct Bar {
    map: MmapRaw,
}

impl Bar {
    fn from_map(map: MmapRaw) -> Bar {
        Bar { map }
    }

    /// Lets go of the device's registers: the window becomes memory that
    /// reads all ones (as a removed device does) and takes writes
    /// harmlessly, so handles still holding the `Bar` keep working.
    fn retire(&self) -> io::Result<()> {
        sys::replace_with_ones(self.map.as_mut_ptr(), self.map.len())
    }

    #[inline]
    fn ptr_checked(&self, offset: usize, width: usize) -> Option<*mut u8> {
        if self.in_window(offset, width) {
            // SAFETY: offset + width ≤ window_len, inside the mapping.
            Some(unsafe { self.map.as_mut_ptr().add(offset) })
        } else {
            debug_assert!(
                false,
                "BAR0 access of {width} bytes at {offset:#x} outside a {:#x}-byte window \
                 or misaligned",
                self.map.len()
            );
            tracing::error!(
                offset,
                width,
                window = self.map.len(),
                "BAR0 access out of window or misaligned; ignored"
            );
            None
        }
    }
}

impl RegisterAccess for Bar {
    #[inline]
    fn window_len(&self) -> usize {
        self.map.len()
    }

    #[inline]
    fn read32(&self, offset: usize) -> u32 {
        match self.ptr_checked(offset, 4) {
            // SAFETY: in the mapping and 4-aligned (the mapping is
            // page-aligned); a volatile load is one MMIO read of the register.
            Some(p) => unsafe { ptr::read_volatile(p.cast::<u32>()) },
            None => u32::MAX,
        }
    }

    #[inline]
    fn write32(&self, offset: usize, value: u32) {
        if let Some(p) = self.ptr_checked(offset, 4) {
            // SAFETY: in the mapping and 4-aligned; one MMIO write.
            unsafe { ptr::write_volatile(p.cast::<u32>(), value) }
        }
    }

    #[inline]
    fn read64(&self, offset: usize) -> u64 {
        match self.ptr_checked(offset, 8) {
            // SAFETY: in the mapping and 8-aligned; one 64-bit MMIO read.
            Some(p) => unsafe { ptr::read_volatile(p.cast::<u64>()) },
            None => u64::MAX,
        }
    }

    #[inline]
    fn write64(&self, offset: usize, value: u64) {
        if let Some(p) = self.ptr_checked(offset, 8) {
            // SAFETY: in the mapping and 8-aligned; one 64-bit MMIO write.
            unsafe { ptr::write_volatile(p.cast::<u64>(), value) }
        }
    }
}

impl std::fmt::Debug for Bar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bar").field("len", &self.map.len()).finish()
    }
}

/// An NVMe controller opened through VFIO: container, group and device,
/// with memory space and bus mastering enabled and BAR0 mapped.
///
/// Dropping it unmaps BAR0 (unless a clone of [`VfioPci::bar0`] is still
/// alive) and closes the device and group. [`DmaBuffer`]s may outlive it;
/// they keep the container and unmap themselves.
pub struct VfioPci {
    // Field order is drop order: BAR first, then the device (which detaches
    // the group from the container), then our handle on the container.
    bar0: Arc<Bar>,
    /// `None` once released ([`Transport::release`](crate::Transport)).
    device: Mutex<Option<VfioDevice>>,
    /// Signalled by the kernel when it wants the device back (hot unplug,
    /// unbind): VFIO's device request interrupt.
    request: Option<EventFd>,
    dma: Arc<DmaContext>,
    addr: PciAddress,
    group: u32,
    config_offset: u64,
    config_size: u64,
    max_qid: u16,
}

impl VfioPci {
    /// Opens the controller at `addr` (`"0000:00:04.0"`) in a DMA context
    /// of its own. See [`VfioPci::open_addr`].
    pub fn open(addr: &str) -> Result<VfioPci> {
        Self::open_addr(addr.parse()?)
    }

    /// Opens the controller at `addr` in the shared DMA context `ctx` (a
    /// VFIO container from [`DmaContext::vfio`]): its IOMMU group joins the
    /// container, and every buffer of `ctx` is valid on it.
    pub fn open_in(ctx: &Arc<DmaContext>, addr: &str) -> Result<VfioPci> {
        Self::open_at(&SysRoot::default(), ctx, addr.parse()?)
    }

    /// Opens the controller at `addr`: checks sysfs, opens the VFIO
    /// container, group and device, enables memory space and bus mastering,
    /// maps BAR0 and reads the IOMMU's usable IOVA ranges.
    ///
    /// Errors: [`Error::NoSuchDevice`], [`Error::IommuAbsent`],
    /// [`Error::NotBoundToVfio`], [`Error::VfioUnavailable`],
    /// [`Error::NoType1Iommu`], [`Error::Permission`],
    /// [`Error::GroupNotViable`], [`Error::DeviceBusy`],
    /// [`Error::Bar0NotMappable`], [`Error::Bar0TooSmall`],
    /// [`Error::Vfio`] for anything else.
    pub fn open_addr(addr: PciAddress) -> Result<VfioPci> {
        let root = SysRoot::default();
        // Probe sysfs first: a missing or mis-bound device is reported as
        // such, not as a container error.
        pci::probe(&root, addr)?;
        let container = VfioContainer::new(None).map_err(|e| map_container_error(e, addr))?;
        let ctx = DmaContext::with_container(Arc::new(container));
        Self::open_at(&root, &ctx, addr)
    }

    fn open_at(root: &SysRoot, ctx: &Arc<DmaContext>, addr: PciAddress) -> Result<VfioPci> {
        let dev = pci::probe(root, addr)?;
        let group = dev.group;
        let target = addr.to_string();

        let Some(container) = ctx.container().cloned() else {
            return Err(Error::InvalidArgument(
                "a VFIO controller needs a VFIO DMA context (DmaContext::vfio)",
            ));
        };
        let device = VfioDevice::new(&dev.path, container.clone(), false)
            .map_err(|e| map_device_error(e, root, addr, group))?;
        let fd = device.as_raw_fd();

        // Configuration space: enable memory decoding and bus mastering.
        let config =
            sys::region_info(fd, VFIO_PCI_CONFIG_REGION_INDEX).map_err(|source| Error::Vfio {
                op: "VFIO_DEVICE_GET_REGION_INFO (config space)",
                target: target.clone(),
                source,
            })?;
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        if config.flags & rw != rw || config.size < 0x40 {
            return Err(Error::Vfio {
                op: "open config space",
                target,
                source: io::Error::other(format!(
                    "config region is {:#x} bytes with flags {:#x}",
                    config.size, config.flags
                )),
            });
        }

        let mut pci = ConfigSpace {
            fd,
            addr,
            config_offset: config.offset,
            config_size: config.size,
        };
        let class = pci.config_read_u32(PCI_CLASS_REVISION)? >> 8;
        if class != PCI_CLASS_NVME {
            tracing::warn!(%addr, class = format_args!("{class:#08x}"), "not an NVMe controller class code");
        }
        let cmd = pci.config_read_u16(PCI_COMMAND)?;
        let want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        if want != cmd {
            pci.config_write_u16(PCI_COMMAND, want)?;
        }
        let now = pci.config_read_u16(PCI_COMMAND)?;
        if now & (PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)
            != PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
        {
            return Err(Error::Vfio {
                op: "enable PCI memory space and bus mastering",
                target,
                source: io::Error::other(format!("command register reads back {now:#06x}")),
            });
        }

        // BAR0: the controller registers and doorbells.
        let bar =
            sys::region_info(fd, VFIO_PCI_BAR0_REGION_INDEX).map_err(|source| Error::Vfio {
                op: "VFIO_DEVICE_GET_REGION_INFO (BAR0)",
                target: target.clone(),
                source,
            })?;
        if bar.flags & VFIO_REGION_INFO_FLAG_MMAP == 0 || bar.flags & rw != rw {
            return Err(Error::Bar0NotMappable {
                addr,
                flags: bar.flags,
            });
        }
        // Registers up to ACQ plus the admin queue's doorbells, before we can
        // even read DSTRD; the full check follows.
        let min = regs::cq_head_doorbell(0, 4) as u64 + 4;
        if bar.size < min {
            return Err(Error::Bar0TooSmall {
                addr,
                size: bar.size,
                needed: min,
            });
        }
        let len = usize::try_from(bar.size).map_err(|_| Error::Bar0TooSmall {
            addr,
            size: bar.size,
            needed: min,
        })?;
        let map = MmapOptions::new()
            .offset(bar.offset)
            .len(len)
            .map_raw(fd)
            .map_err(|source| Error::Vfio {
                op: "mmap BAR0",
                target: target.clone(),
                source,
            })?;
        let bar0 = Arc::new(Bar::from_map(map));

        let cap = bar0.cap();
        if cap.0 == u64::MAX {
            return Err(Error::Vfio {
                op: "read CAP",
                target,
                source: io::Error::other("CAP reads all ones: the device is not responding"),
            });
        }
        let stride = cap.doorbell_stride();
        // The admin queue and at least one I/O queue must have doorbells.
        let needed = regs::cq_head_doorbell(1, stride).saturating_add(4);
        let max_qid = match max_doorbell_qid(len, stride) {
            Some(q) if q >= 1 => q,
            _ => {
                return Err(Error::Bar0TooSmall {
                    addr,
                    size: bar.size,
                    needed: needed as u64,
                });
            }
        };

        // The IOMMU domain: which IOVAs it translates, in which page sizes.
        let info = sys::iommu_info(container.as_raw_fd()).map_err(|source| Error::Vfio {
            op: "VFIO_IOMMU_GET_INFO",
            target: format!("container of {addr}"),
            source,
        })?;
        let granule = info
            .pgsizes
            .filter(|&p| p != 0)
            .map_or(BASE_PAGE_SIZE as u64, |p| 1u64 << p.trailing_zeros())
            .max(BASE_PAGE_SIZE as u64);
        let ranges = match info.iova_ranges {
            Some(r) => r,
            None => {
                tracing::info!(
                    %addr,
                    "IOMMU reports no IOVA ranges; using [{:#x}, {:#x})",
                    IovaAllocator::FALLBACK_RANGE.start(),
                    IovaAllocator::FALLBACK_RANGE.end()
                );
                vec![IovaAllocator::FALLBACK_RANGE]
            }
        };
        ctx.attach(&ranges, granule)?;
        tracing::info!(
            %addr,
            group,
            cap = ?cap,
            version = %bar0.version(),
            bar0_len = len,
            max_qid,
            iova_ranges = ?ctx.iova_ranges(),
            "opened NVMe controller through VFIO"
        );

        let request = device_request_notifier(&device, &target);
        Ok(VfioPci {
            bar0,
            device: Mutex::new(Some(device)),
            request,
            dma: Arc::clone(ctx),
            addr,
            group,
            config_offset: config.offset,
            config_size: config.size,
            max_qid,
        })
    }

    /// The device's PCI address.
    pub fn address(&self) -> PciAddress {
        self.addr
    }

    /// The device's IOMMU group.
    pub fn iommu_group(&self) -> u32 {
        self.group
    }

    /// The mapped BAR0. Clone the `Arc` to share it with queue pairs on
    /// other threads.
    pub fn bar0(&self) -> &Arc<Bar> {
        &self.bar0
    }

    /// Reads CAP.
    pub fn cap(&self) -> Cap {
        self.bar0.cap()
    }

    /// Reads VS.
    pub fn version(&self) -> Version {
        self.bar0.version()
    }

    /// Highest queue id whose doorbells fit in BAR0 at the device's stride
    /// (at least 1). Queue creation must not go above it.
    pub fn max_doorbell_qid(&self) -> u16 {
        self.max_qid
    }

    /// The IOVA ranges DMA buffers are allocated in.
    pub fn iova_ranges(&self) -> Vec<IovaRange> {
        self.dma.iova_ranges()
    }

    /// Allocates a zeroed DMA buffer of `len` bytes mapped for this device
    /// (and every other device of its context).
    pub fn dma_alloc(&self, len: usize) -> Result<DmaBuffer> {
        self.dma.alloc(len)
    }

    /// The DMA context the device is attached to.
    pub fn dma_context(&self) -> &Arc<DmaContext> {
        &self.dma
    }

    /// The PCI Command register.
    pub fn pci_command(&self) -> Result<u16> {
        self.config_space()?.config_read_u16(PCI_COMMAND)
    }

    /// Reads `buf.len()` bytes of PCI configuration space at `offset`.
    pub fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.config_space()?.config_read(offset, buf)
    }

    /// Writes `buf` to PCI configuration space at `offset` (VFIO filters
    /// what reaches the device).
    pub fn config_write(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.config_space()?.config_write(offset, buf)
    }

    fn device(&self) -> std::sync::MutexGuard<'_, Option<VfioDevice>> {
        // The slot is either the device or nothing: valid, poisoned or not.
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn config_space(&self) -> Result<ConfigSpace> {
        let fd = self
            .device()
            .as_ref()
            .map(|d| d.as_raw_fd())
            .ok_or_else(|| Error::DeviceRemoved {
                device: self.addr.to_string(),
            })?;
        Ok(ConfigSpace {
            fd,
            addr: self.addr,
            config_offset: self.config_offset,
            config_size: self.config_size,
        })
    }

    /// True once the kernel asked for the device back (VFIO device
    /// request: hot unplug or unbind). One non-blocking read.
    pub fn removal_requested(&self) -> bool {
        self.request.as_ref().is_some_and(|e| e.read().is_ok())
    }

    /// Hands the device back to the kernel: BAR0 becomes memory that reads
    /// all ones, the device request interrupt is disabled and the device
    /// closed, so an unplug can complete. Stop the controller first.
    pub fn release(&self) {
        let Some(device) = self.device().take() else {
            return;
        };
        if let Err(error) = self.bar0.retire() {
            tracing::error!(addr = %self.addr, %error, "cannot retire BAR0; keeping the device");
            *self.device() = Some(device);
            return;
        }
        if self.request.is_some()
            && let Err(error) = device.disable_irq(VFIO_PCI_REQ_IRQ_INDEX)
        {
            tracing::warn!(addr = %self.addr, ?error, "disabling the device request interrupt failed");
        }
        // Closing the device may detach its group from the container.
        self.dma.detach();
        drop(device);
        tracing::info!(addr = %self.addr, "device released to the kernel");
    }
}

/// An eventfd the kernel signals when it wants the device back, if the
/// device has VFIO's request interrupt.
fn device_request_notifier(device: &VfioDevice, target: &str) -> Option<EventFd> {
    let count = device
        .get_irq_info(VFIO_PCI_REQ_IRQ_INDEX)
        .map_or(0, |irq| irq.count);
    if count == 0 {
        tracing::info!(
            target,
            "no VFIO device request interrupt: removal is seen only as all-ones registers"
        );
        return None;
    }
    let event = match EventFd::new(libc::EFD_NONBLOCK) {
        Ok(e) => e,
        Err(error) => {
            tracing::warn!(target, %error, "eventfd for device requests failed");
            return None;
        }
    };
    match device.enable_irq(VFIO_PCI_REQ_IRQ_INDEX, vec![&event]) {
        Ok(()) => Some(event),
        Err(error) => {
            tracing::warn!(
                target,
                ?error,
                "enabling the device request interrupt failed"
            );
            None
        }
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        // Runs before the fields drop: closing the device detaches its group,
        // and the kernel then drops every DMA mapping of the container, so
        // buffers that outlive us must not try to unmap.
        if self.device().is_some() {
            self.dma.detach();
        }
    }
}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci")
            .field("addr", &self.addr)
            .field("group", &self.group)
            .field("bar0", &self.bar0)
            .field("max_qid", &self.max_qid)
            .finish_non_exhaustive()
    }
}

/// Config-space access on a device fd, used while opening and after.
struct ConfigSpace {
    fd: std::os::fd::RawFd,
    addr: PciAddress,
    config_offset: u64,
    config_size: u64,
}

impl ConfigSpace {
    fn err(&self, op: &'static str, source: io::Error) -> Error {
        Error::Vfio {
            op,
            target: self.addr.to_string(),
            source,
        }
    }

    fn bounds(&self, offset: u64, len: usize) -> Result<u64> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.config_size => Ok(self.config_offset + offset),
            _ => Err(self.err(
                "config space access",
                io::Error::new(io::ErrorKind::InvalidInput, "outside config space"),
            )),
        }
    }

    fn config_read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let at = self.bounds(offset, buf.len())?;
        sys::pread_exact(self.fd, buf, at).map_err(|e| self.err("config space read", e))
    }

    fn config_write(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let at = self.bounds(offset, buf.len())?;
        sys::pwrite_all(self.fd, buf, at).map_err(|e| self.err("config space write", e))
    }

    fn config_read_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.config_read(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn config_read_u32(&self, offset: u64) -> Result<u32> {
        let mut b = [0u8; 4];
        self.config_read(offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn config_write_u16(&mut self, offset: u64, value: u16) -> Result<()> {
        self.config_write(offset, &value.to_le_bytes())
    }
}

/// Container-creation errors when no device is named yet.
pub(crate) fn map_container_error_public(e: VfioError) -> Error {
    match e {
        VfioError::OpenContainer(source) => {
            let path = PathBuf::from("/dev/vfio/vfio");
            match source.kind() {
                io::ErrorKind::NotFound => Error::VfioUnavailable {
                    path,
                    addr: None,
                    source,
                },
                io::ErrorKind::PermissionDenied => Error::Permission { path, source },
                _ => Error::Vfio {
                    op: "open",
                    target: path.display().to_string(),
                    source,
                },
            }
        }
        VfioError::VfioExtension | VfioError::VfioType1V2 | VfioError::VfioInvalidType => {
            Error::NoType1Iommu { source: None }
        }
        other => Error::Vfio {
            op: "create container",
            target: "/dev/vfio/vfio".to_owned(),
            source: vfio_io_error(other),
        },
    }
}

fn map_container_error(e: VfioError, addr: PciAddress) -> Error {
    let node = PathBuf::from("/dev/vfio/vfio");
    match e {
        VfioError::OpenContainer(source) => match source.kind() {
            io::ErrorKind::NotFound => Error::VfioUnavailable {
                path: node,
                addr: Some(addr),
                source,
            },
            io::ErrorKind::PermissionDenied => Error::Permission { path: node, source },
            _ => Error::Vfio {
                op: "open",
                target: node.display().to_string(),
                source,
            },
        },
        VfioError::VfioExtension | VfioError::VfioType1V2 | VfioError::VfioInvalidType => {
            Error::NoType1Iommu { source: None }
        }
        other => Error::Vfio {
            op: "create container",
            target: format!("{} for {addr}", node.display()),
            source: vfio_io_error(other),
        },
    }
}

fn map_device_error(e: VfioError, root: &SysRoot, addr: PciAddress, group: u32) -> Error {
    let target = addr.to_string();
    match e {
        VfioError::OpenGroup(source, _) => {
            let path = PathBuf::from(format!("/dev/vfio/{group}"));
            match (source.kind(), source.raw_os_error()) {
                (io::ErrorKind::NotFound, _) => Error::VfioUnavailable {
                    path,
                    addr: Some(addr),
                    source,
                },
                (io::ErrorKind::PermissionDenied, _) => Error::Permission { path, source },
                (_, Some(libc::EBUSY)) => Error::DeviceBusy { addr, group },
                _ => Error::Vfio {
                    op: "open group",
                    target: path.display().to_string(),
                    source,
                },
            }
        }
        VfioError::GroupViable => Error::GroupNotViable {
            addr,
            group,
            offenders: pci::group_offenders(root, group),
        },
        VfioError::ContainerSetIOMMU(e) if e.errno() == libc::ENODEV => Error::NoType1Iommu {
            source: Some(io::Error::from_raw_os_error(libc::ENODEV)),
        },
        VfioError::GroupGetDeviceFD(e) if e.errno() == libc::EBUSY => {
            Error::DeviceBusy { addr, group }
        }
        other => {
            let op = match &other {
                VfioError::GetGroupStatus => "VFIO_GROUP_GET_STATUS",
                VfioError::GroupSetContainer => "VFIO_GROUP_SET_CONTAINER",
                VfioError::ContainerSetIOMMU(_) => "VFIO_SET_IOMMU",
                VfioError::GroupGetDeviceFD(_) => "VFIO_GROUP_GET_DEVICE_FD",
                VfioError::VfioDeviceGetInfo(_)
                | VfioError::VfioDeviceGetInfoPCI
                | VfioError::VfioDeviceGetInfoOther => "VFIO_DEVICE_GET_INFO",
                VfioError::VfioDeviceGetRegionInfo(_) => "VFIO_DEVICE_GET_REGION_INFO",
                VfioError::InvalidPath => "resolve IOMMU group",
                _ => "open device",
            };
            Error::Vfio {
                op,
                target,
                source: vfio_io_error(other),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anon_bar(len: usize) -> Bar {
        let m = MmapOptions::new().len(len).map_anon().expect("anon memory");
        Bar::from_map(MmapRaw::from(m))
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        fn send<T: Send>() {}
        check::<VfioPci>();
        check::<Bar>();
        check::<Arc<Bar>>();
        // DmaBuffer is Send but (like Cell) not Sync; see the `dma` module.
        send::<DmaBuffer>();
    }

    #[test]
    fn bar_reads_and_writes() {
        let bar = anon_bar(0x4000);
        assert_eq!(bar.window_len(), 0x4000);
        bar.write64(regs::CAP, 0x0040_1820_0f01_07ff);
        bar.write32(regs::VS, 0x0001_0400);
        assert_eq!(bar.cap().mqes(), 2047);
        assert_eq!(bar.version().to_string(), "1.4.0");
        bar.write32(regs::cq_head_doorbell(1535, 4), 7);
        assert_eq!(bar.read32(0x3FFC), 7);
        assert_eq!(bar.read32(regs::CAP), 0x0f01_07ff);
        assert_eq!(bar.read32(regs::CAP + 4), 0x0040_1820);
        // Through the blanket impls, generically.
        fn generic<R: RegisterAccess>(r: R) -> u32 {
            r.read32(regs::VS)
        }
        let shared = Arc::new(bar);
        assert_eq!(generic(&shared), 0x0001_0400);
        assert_eq!(generic(Arc::clone(&shared)), 0x0001_0400);
        assert_eq!(generic(&*shared), 0x0001_0400);
    }

    #[test]
    fn bar_window_checks() {
        let bar = anon_bar(0x2000);
        assert!(bar.in_window(0x1FFC, 4));
        assert!(!bar.in_window(0x1FFC, 8));
        assert!(!bar.in_window(0x2000, 4));
        assert!(!bar.in_window(0x1002, 4));
        assert!(!bar.in_window(usize::MAX - 1, 4));
    }

    #[test]
    #[cfg_attr(debug_assertions, should_panic(expected = "outside"))]
    fn bar_out_of_window_read() {
        let bar = anon_bar(0x2000);
        assert_eq!(bar.read32(0x2000), u32::MAX);
        bar.write64(usize::MAX, 1);
        assert_eq!(bar.read64(0x1004), u64::MAX);
    }

    #[test]
    fn open_missing_device_is_no_such_device() {
        match VfioPci::open("0000:ff:1f.7") {
            Err(Error::NoSuchDevice { addr, path }) => {
                assert_eq!(addr.to_string(), "0000:ff:1f.7");
                assert_eq!(path, PathBuf::from("/sys/bus/pci/devices/0000:ff:1f.7"));
            }
            other => panic!("expected NoSuchDevice, got {other:?}"),
        }
    }

    #[test]
    fn open_garbage_is_invalid_address() {
        assert!(matches!(
            VfioPci::open("nvme0"),
            Err(Error::InvalidPciAddress { .. })
        ));
    }

    #[test]
    fn vfio_errors_keep_errno() {
        let e = vfio_io_error(VfioError::OpenContainer(io::Error::from_raw_os_error(
            libc::EACCES,
        )));
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        let e = vfio_io_error(VfioError::GroupViable);
        assert!(e.to_string().contains("viable"));
    }

    #[test]
    fn container_errors_map() {
        let addr: PciAddress = "0000:00:04.0".parse().expect("valid");
        let e = map_container_error(
            VfioError::OpenContainer(io::Error::from_raw_os_error(libc::EACCES)),
            addr,
        );
        assert!(matches!(e, Error::Permission { ref path, .. } if path.ends_with("vfio")));
        let e = map_container_error(
            VfioError::OpenContainer(io::Error::from_raw_os_error(libc::ENOENT)),
            addr,
        );
        assert!(matches!(e, Error::VfioUnavailable { .. }));
        let e = map_container_error(VfioError::VfioExtension, addr);
        assert!(matches!(e, Error::NoType1Iommu { .. }));
    }

    #[test]
    fn device_errors_map() {
        let addr: PciAddress = "0000:00:04.0".parse().expect("valid");
        let root = SysRoot {
            sys: PathBuf::from("/nonexistent-sys"),
        };
        let e = map_device_error(
            VfioError::OpenGroup(io::Error::from_raw_os_error(libc::EPERM), "12".into()),
            &root,
            addr,
            12,
        );
        assert!(
            matches!(e, Error::Permission { ref path, .. } if path == &PathBuf::from("/dev/vfio/12"))
        );
        let e = map_device_error(
            VfioError::OpenGroup(io::Error::from_raw_os_error(libc::EBUSY), "12".into()),
            &root,
            addr,
            12,
        );
        assert!(matches!(e, Error::DeviceBusy { group: 12, .. }));
        let e = map_device_error(VfioError::GroupViable, &root, addr, 12);
        assert!(matches!(e, Error::GroupNotViable { group: 12, .. }));
        let e = map_device_error(VfioError::GroupSetContainer, &root, addr, 12);
        assert!(matches!(
            e,
            Error::Vfio {
                op: "VFIO_GROUP_SET_CONTAINER",
                ..
            }
        ));
    }
}
