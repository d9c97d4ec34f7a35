//! NVMe controller registers (NVMe Base Specification 2.x, section 3.1.4
//! "Controller Properties"; memory-based transports expose them in BAR0).
//!
//! Offsets are byte offsets into the register window. Multi-bit registers are
//! small newtypes with accessors (`Cap`, `Cc`, `Aqa`, `Version`); the pure flag
//! register CSTS is a [`bitflags`] type with an accessor for its two-bit
//! shutdown status field. Every decoder takes the raw value as read from the
//! device and never panics, whatever the device put there.

use std::fmt;
use std::time::Duration;

/// Controller Capabilities (64 bit).
pub const CAP: usize = 0x00;
/// Version (32 bit).
pub const VS: usize = 0x08;
/// Interrupt Mask Set (32 bit).
pub const INTMS: usize = 0x0C;
/// Interrupt Mask Clear (32 bit).
pub const INTMC: usize = 0x10;
/// Controller Configuration (32 bit).
pub const CC: usize = 0x14;
/// Controller Status (32 bit).
pub const CSTS: usize = 0x1C;
/// NVM Subsystem Reset (32 bit, optional: see [`Cap::nssrs`]).
pub const NSSR: usize = 0x20;
/// Admin Queue Attributes (32 bit).
pub const AQA: usize = 0x24;
/// Admin Submission Queue Base Address (64 bit).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue Base Address (64 bit).
pub const ACQ: usize = 0x30;
/// Controller Memory Buffer Location (32 bit, optional).
pub const CMBLOC: usize = 0x38;
/// Controller Memory Buffer Size (32 bit, optional).
pub const CMBSZ: usize = 0x3C;
/// Start of the doorbell registers: SQ 0 tail doorbell.
pub const DOORBELL_BASE: usize = 0x1000;

/// Value written to [`NSSR`] to start an NVM subsystem reset ("NVMe" in ASCII).
pub const NSSR_RESET_VALUE: u32 = 0x4E56_4D65;

/// Byte offset of the submission queue `qid` tail doorbell, for a doorbell
/// stride of `stride` bytes (see [`Cap::doorbell_stride`]).
///
/// The arithmetic saturates: an offset that does not fit in `usize` comes out
/// as `usize::MAX`, which every [`crate::RegisterAccess`] implementation
/// rejects as out of range. Callers still check `qid` against what the BAR
/// holds (e.g. [`crate::vfio::VfioPci::max_doorbell_qid`]) before creating a
/// queue.
pub const fn sq_tail_doorbell(qid: u16, stride: usize) -> usize {
    doorbell(2 * qid as usize, stride)
}

/// Byte offset of the completion queue `qid` head doorbell, for a doorbell
/// stride of `stride` bytes. Saturates like [`sq_tail_doorbell`].
pub const fn cq_head_doorbell(qid: u16, stride: usize) -> usize {
    doorbell(2 * qid as usize + 1, stride)
}

const fn doorbell(index: usize, stride: usize) -> usize {
    DOORBELL_BASE.saturating_add(index.saturating_mul(stride))
}

const fn bits64(v: u64, lo: u32, width: u32) -> u64 {
    (v >> lo) & ((1u64 << width) - 1)
}

const fn bits32(v: u32, lo: u32, width: u32) -> u32 {
    (v >> lo) & ((1u32 << width) - 1)
}

const fn set_bits32(v: u32, lo: u32, width: u32, field: u32) -> u32 {
    let mask = ((1u32 << width) - 1) << lo;
    (v & !mask) | ((field << lo) & mask)
}

/// CAP: Controller Capabilities (offset 0x00, read-only).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cap(pub u64);

impl Cap {
    /// CSS bit 0: the NVM command set.
    pub const CSS_NVM: u8 = 1 << 0;
    /// CSS bit 6: one or more I/O command sets (CC.CSS = 110b).
    pub const CSS_IO_COMMAND_SETS: u8 = 1 << 6;
    /// CSS bit 7: admin command set only (CC.CSS = 111b).
    pub const CSS_ADMIN_ONLY: u8 = 1 << 7;

    /// MQES, bits 15:0: Maximum Queue Entries Supported, 0's based (raw).
    pub const fn mqes(self) -> u16 {
        bits64(self.0, 0, 16) as u16
    }

    /// Maximum entries of an I/O queue (MQES + 1; at least 2 on a
    /// conforming controller, up to 65536).
    pub const fn max_queue_entries(self) -> u32 {
        self.mqes() as u32 + 1
    }

    /// CQR, bit 16: Contiguous Queues Required.
    pub const fn cqr(self) -> bool {
        bits64(self.0, 16, 1) != 0
    }

    /// AMS, bits 18:17: Arbitration Mechanism Supported (bit 0 = weighted
    /// round robin with urgent, bit 1 = vendor specific).
    pub const fn ams(self) -> u8 {
        bits64(self.0, 17, 2) as u8
    }

    /// TO, bits 31:24: worst-case time to wait for CSTS.RDY to change after
    /// CC.EN changes, raw, in units of 500 ms.
    pub const fn to(self) -> u8 {
        bits64(self.0, 24, 8) as u8
    }

    /// [`Cap::to`] as a duration (`TO × 500 ms`; zero if the device says 0).
    pub const fn ready_timeout(self) -> Duration {
        Duration::from_millis(self.to() as u64 * 500)
    }

    /// DSTRD, bits 35:32: Doorbell Stride, raw (stride is `2^(2 + DSTRD)`).
    pub const fn dstrd(self) -> u8 {
        bits64(self.0, 32, 4) as u8
    }

    /// Doorbell stride in bytes: `4 << DSTRD` (4 to 128 KiB).
    pub const fn doorbell_stride(self) -> usize {
        4usize << self.dstrd()
    }

    /// NSSRS, bit 36: NVM Subsystem Reset Supported.
    pub const fn nssrs(self) -> bool {
        bits64(self.0, 36, 1) != 0
    }

    /// CSS, bits 44:37: Command Sets Supported (see the `CSS_*` constants).
    pub const fn css(self) -> u8 {
        bits64(self.0, 37, 8) as u8
    }

    /// Whether the NVM command set is supported (CSS bit 0).
    pub const fn css_nvm(self) -> bool {
        self.css() & Self::CSS_NVM != 0
    }

    /// Whether I/O command sets other than NVM may be selected with
    /// CC.CSS = 110b (CSS bit 6).
    pub const fn css_io_command_sets(self) -> bool {
        self.css() & Self::CSS_IO_COMMAND_SETS != 0
    }

    /// Whether the controller can run with the admin command set only
    /// (CSS bit 7).
    pub const fn css_admin_only(self) -> bool {
        self.css() & Self::CSS_ADMIN_ONLY != 0
    }

    /// BPS, bit 45: Boot Partition Support.
    pub const fn bps(self) -> bool {
        bits64(self.0, 45, 1) != 0
    }

    /// CPS, bits 47:46: Controller Power Scope.
    pub const fn cps(self) -> u8 {
        bits64(self.0, 46, 2) as u8
    }

    /// MPSMIN, bits 51:48: Memory Page Size Minimum, raw (`2^(12 + MPSMIN)`).
    pub const fn mpsmin(self) -> u8 {
        bits64(self.0, 48, 4) as u8
    }

    /// MPSMAX, bits 55:52: Memory Page Size Maximum, raw (`2^(12 + MPSMAX)`).
    pub const fn mpsmax(self) -> u8 {
        bits64(self.0, 52, 4) as u8
    }

    /// Minimum memory page size in bytes.
    pub const fn min_page_size(self) -> usize {
        1usize << (12 + self.mpsmin())
    }

    /// Maximum memory page size in bytes.
    pub const fn max_page_size(self) -> usize {
        1usize << (12 + self.mpsmax())
    }

    /// PMRS, bit 56: Persistent Memory Region Supported.
    pub const fn pmrs(self) -> bool {
        bits64(self.0, 56, 1) != 0
    }

    /// CMBS, bit 57: Controller Memory Buffer Supported.
    pub const fn cmbs(self) -> bool {
        bits64(self.0, 57, 1) != 0
    }

    /// NSSS, bit 58: NVM Subsystem Shutdown Supported.
    pub const fn nsss(self) -> bool {
        bits64(self.0, 58, 1) != 0
    }

    /// CRMS, bits 60:59: Controller Ready Modes Supported (bit 0 = with
    /// media, bit 1 = independent of media).
    pub const fn crms(self) -> u8 {
        bits64(self.0, 59, 2) as u8
    }
}

impl fmt::Debug for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cap")
            .field("raw", &format_args!("{:#018x}", self.0))
            .field("mqes", &self.mqes())
            .field("cqr", &self.cqr())
            .field("ams", &self.ams())
            .field("to", &self.to())
            .field("dstrd", &self.dstrd())
            .field("nssrs", &self.nssrs())
            .field("css", &format_args!("{:#04x}", self.css()))
            .field("bps", &self.bps())
            .field("mpsmin", &self.mpsmin())
            .field("mpsmax", &self.mpsmax())
            .field("pmrs", &self.pmrs())
            .field("cmbs", &self.cmbs())
            .finish()
    }
}

/// VS: Version (offset 0x08). Ordered by (major, minor, tertiary).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Version(pub u32);

impl Version {
    /// NVMe 1.0 (controllers before 1.2 may report tertiary as 0).
    pub const V1_0: Version = Version::new(1, 0, 0);
    /// NVMe 1.4 (QEMU 7.2's controller).
    pub const V1_4: Version = Version::new(1, 4, 0);
    /// NVMe 2.0.
    pub const V2_0: Version = Version::new(2, 0, 0);

    /// Builds a version from its parts.
    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Version {
        Version(((major as u32) << 16) | ((minor as u32) << 8) | tertiary as u32)
    }

    /// MJR, bits 31:16.
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// MNR, bits 15:8.
    pub const fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// TER, bits 7:0.
    pub const fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Version({self})")
    }
}

/// CC: Controller Configuration (offset 0x14).
///
/// Built with the `with_*` methods from [`Cc::default`] (all zero); each
/// setter masks its value to the field width.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cc(pub u32);

impl Cc {
    /// CC.CSS: NVM command set.
    pub const CSS_NVM: u8 = 0b000;
    /// CC.CSS: all supported I/O command sets.
    pub const CSS_ALL_IO: u8 = 0b110;
    /// CC.CSS: admin command set only.
    pub const CSS_ADMIN_ONLY: u8 = 0b111;
    /// CC.AMS: round robin.
    pub const AMS_ROUND_ROBIN: u8 = 0b000;
    /// CC.SHN: no notification.
    pub const SHN_NONE: u8 = 0b00;
    /// CC.SHN: normal shutdown.
    pub const SHN_NORMAL: u8 = 0b01;
    /// CC.SHN: abrupt shutdown.
    pub const SHN_ABRUPT: u8 = 0b10;
    /// log2 of the NVM command set submission queue entry size (64 bytes).
    pub const IOSQES_NVM: u8 = 6;
    /// log2 of the NVM command set completion queue entry size (16 bytes).
    pub const IOCQES_NVM: u8 = 4;

    /// EN, bit 0: Enable.
    pub const fn en(self) -> bool {
        bits32(self.0, 0, 1) != 0
    }

    /// CSS, bits 6:4: I/O Command Set Selected.
    pub const fn css(self) -> u8 {
        bits32(self.0, 4, 3) as u8
    }

    /// MPS, bits 10:7: Memory Page Size, raw (`2^(12 + MPS)`).
    pub const fn mps(self) -> u8 {
        bits32(self.0, 7, 4) as u8
    }

    /// AMS, bits 13:11: Arbitration Mechanism Selected.
    pub const fn ams(self) -> u8 {
        bits32(self.0, 11, 3) as u8
    }

    /// SHN, bits 15:14: Shutdown Notification.
    pub const fn shn(self) -> u8 {
        bits32(self.0, 14, 2) as u8
    }

    /// IOSQES, bits 19:16: I/O Submission Queue Entry Size, log2 bytes.
    pub const fn iosqes(self) -> u8 {
        bits32(self.0, 16, 4) as u8
    }

    /// IOCQES, bits 23:20: I/O Completion Queue Entry Size, log2 bytes.
    pub const fn iocqes(self) -> u8 {
        bits32(self.0, 20, 4) as u8
    }

    /// Sets EN.
    #[must_use]
    pub const fn with_en(self, en: bool) -> Cc {
        Cc(set_bits32(self.0, 0, 1, en as u32))
    }

    /// Sets CSS (3 bits).
    #[must_use]
    pub const fn with_css(self, css: u8) -> Cc {
        Cc(set_bits32(self.0, 4, 3, css as u32))
    }

    /// Sets MPS (4 bits, raw: page size is `2^(12 + mps)`).
    #[must_use]
    pub const fn with_mps(self, mps: u8) -> Cc {
        Cc(set_bits32(self.0, 7, 4, mps as u32))
    }

    /// Sets AMS (3 bits).
    #[must_use]
    pub const fn with_ams(self, ams: u8) -> Cc {
        Cc(set_bits32(self.0, 11, 3, ams as u32))
    }

    /// Sets SHN (2 bits).
    #[must_use]
    pub const fn with_shn(self, shn: u8) -> Cc {
        Cc(set_bits32(self.0, 14, 2, shn as u32))
    }

    /// Sets IOSQES (4 bits, log2 bytes).
    #[must_use]
    pub const fn with_iosqes(self, iosqes: u8) -> Cc {
        Cc(set_bits32(self.0, 16, 4, iosqes as u32))
    }

    /// Sets IOCQES (4 bits, log2 bytes).
    #[must_use]
    pub const fn with_iocqes(self, iocqes: u8) -> Cc {
        Cc(set_bits32(self.0, 20, 4, iocqes as u32))
    }
}

impl fmt::Debug for Cc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cc")
            .field("raw", &format_args!("{:#010x}", self.0))
            .field("en", &self.en())
            .field("css", &self.css())
            .field("mps", &self.mps())
            .field("ams", &self.ams())
            .field("shn", &self.shn())
            .field("iosqes", &self.iosqes())
            .field("iocqes", &self.iocqes())
            .finish()
    }
}

bitflags::bitflags! {
    /// CSTS: Controller Status (offset 0x1C).
    ///
    /// Read it with [`Csts::from_bits_retain`] so that reserved bits the
    /// device sets are kept, not dropped.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct Csts: u32 {
        /// RDY, bit 0: Ready.
        const RDY = 1 << 0;
        /// CFS, bit 1: Controller Fatal Status.
        const CFS = 1 << 1;
        /// SHST, bits 3:2: Shutdown Status field mask (use [`Csts::shst`]).
        const SHST_MASK = 0b11 << 2;
        /// NSSRO, bit 4: NVM Subsystem Reset Occurred.
        const NSSRO = 1 << 4;
        /// PP, bit 5: Processing Paused.
        const PP = 1 << 5;
        /// ST, bit 6: Shutdown Type.
        const ST = 1 << 6;
    }
}

/// CSTS.SHST: Shutdown Status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShutdownStatus {
    /// 00b: normal operation, no shutdown requested.
    Normal,
    /// 01b: shutdown processing occurring.
    Occurring,
    /// 10b: shutdown processing complete.
    Complete,
    /// 11b: reserved value.
    Reserved,
}

impl Csts {
    /// SHST, bits 3:2: Shutdown Status.
    pub const fn shst(self) -> ShutdownStatus {
        match (self.bits() >> 2) & 0b11 {
            0 => ShutdownStatus::Normal,
            1 => ShutdownStatus::Occurring,
            2 => ShutdownStatus::Complete,
            _ => ShutdownStatus::Reserved,
        }
    }
}

/// AQA: Admin Queue Attributes (offset 0x24). Sizes are 0's based.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Aqa(pub u32);

impl Aqa {
    /// Smallest admin queue: 2 entries.
    pub const MIN_ENTRIES: u16 = 2;
    /// Largest admin queue: 4096 entries.
    pub const MAX_ENTRIES: u16 = 4096;

    /// AQA for an admin SQ of `sq_entries` and an admin CQ of `cq_entries`
    /// entries (1-based counts). `None` unless both are in 2..=4096.
    pub const fn from_entries(sq_entries: u16, cq_entries: u16) -> Option<Aqa> {
        if sq_entries < Self::MIN_ENTRIES
            || sq_entries > Self::MAX_ENTRIES
            || cq_entries < Self::MIN_ENTRIES
            || cq_entries > Self::MAX_ENTRIES
        {
            return None;
        }
        Some(Aqa(
            ((cq_entries as u32 - 1) << 16) | (sq_entries as u32 - 1)
        ))
    }

    /// ASQS, bits 11:0: Admin Submission Queue Size, 0's based.
    pub const fn asqs(self) -> u16 {
        bits32(self.0, 0, 12) as u16
    }

    /// ACQS, bits 27:16: Admin Completion Queue Size, 0's based.
    pub const fn acqs(self) -> u16 {
        bits32(self.0, 16, 12) as u16
    }

    /// Admin submission queue entries (ASQS + 1).
    pub const fn sq_entries(self) -> u16 {
        self.asqs() + 1
    }

    /// Admin completion queue entries (ACQS + 1).
    pub const fn cq_entries(self) -> u16 {
        self.acqs() + 1
    }
}

impl fmt::Debug for Aqa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Aqa")
            .field("asqs", &self.asqs())
            .field("acqs", &self.acqs())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CAP as QEMU 7.2's NVMe controller reports it (`nvme show-regs`):
    /// MQES 0x7ff, CQR, TO 0xf, CSS = NVM | I/O sets | admin only, MPSMAX 4.
    const QEMU_CAP: u64 = 0x0040_1820_0f01_07ff;

    #[test]
    fn qemu_cap_decodes() {
        let cap = Cap(QEMU_CAP);
        assert_eq!(cap.mqes(), 2047);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.cqr());
        assert_eq!(cap.ams(), 0);
        assert_eq!(cap.to(), 15);
        assert_eq!(cap.ready_timeout(), Duration::from_millis(7500));
        assert_eq!(cap.dstrd(), 0);
        assert_eq!(cap.doorbell_stride(), 4);
        assert!(!cap.nssrs());
        assert_eq!(
            cap.css(),
            Cap::CSS_NVM | Cap::CSS_IO_COMMAND_SETS | Cap::CSS_ADMIN_ONLY
        );
        assert!(cap.css_nvm() && cap.css_io_command_sets() && cap.css_admin_only());
        assert!(!Cap(0).css_nvm());
        assert!(!cap.bps());
        assert_eq!(cap.mpsmin(), 0);
        assert_eq!(cap.mpsmax(), 4);
        assert_eq!(cap.min_page_size(), 4096);
        assert_eq!(cap.max_page_size(), 64 * 1024);
        assert!(!cap.pmrs());
        assert!(!cap.cmbs());
    }

    #[test]
    fn cap_fields_are_independent() {
        // Every single-bit / multi-bit field set on its own.
        assert_eq!(Cap(0xffff).mqes(), 0xffff);
        assert_eq!(Cap(0xffff).max_queue_entries(), 65536);
        assert_eq!(Cap(3 << 17).ams(), 3);
        assert_eq!(Cap(0xf << 32).dstrd(), 15);
        assert_eq!(Cap(0xf << 32).doorbell_stride(), 128 * 1024);
        assert_eq!(Cap(1 << 32).doorbell_stride(), 8);
        assert!(Cap(1 << 36).nssrs());
        assert!(Cap(1 << 45).bps());
        assert_eq!(Cap(0xf << 48).min_page_size(), 1 << 27);
        assert!(Cap(1 << 56).pmrs());
        assert!(Cap(1 << 57).cmbs());
        assert!(Cap(1 << 58).nsss());
        assert_eq!(Cap(3 << 59).crms(), 3);
        // All ones: no panic, every field saturated.
        let all = Cap(u64::MAX);
        assert_eq!(all.to(), 255);
        assert_eq!(all.ready_timeout(), Duration::from_millis(255 * 500));
        assert_eq!(all.css(), 0xff);
        assert_eq!(all.max_page_size(), 1 << 27);
    }

    #[test]
    fn version_decodes_and_displays() {
        let v = Version(0x0001_0400);
        assert_eq!((v.major(), v.minor(), v.tertiary()), (1, 4, 0));
        assert_eq!(v.to_string(), "1.4.0");
        assert_eq!(v, Version::V1_4);
        assert_eq!(Version(0x0002_0001).to_string(), "2.0.1");
        assert!(Version::V1_0 < Version::V1_4 && Version::V1_4 < Version::V2_0);
    }

    #[test]
    fn cc_roundtrip() {
        let cc = Cc::default()
            .with_en(true)
            .with_css(Cc::CSS_NVM)
            .with_mps(0)
            .with_ams(Cc::AMS_ROUND_ROBIN)
            .with_shn(Cc::SHN_NONE)
            .with_iosqes(Cc::IOSQES_NVM)
            .with_iocqes(Cc::IOCQES_NVM);
        // Linux's nvme driver writes 0x00460001 to enable a controller.
        assert_eq!(cc.0, 0x0046_0001);
        assert!(cc.en());
        assert_eq!(cc.iosqes(), 6);
        assert_eq!(cc.iocqes(), 4);
        let cc = cc.with_shn(Cc::SHN_NORMAL).with_en(false);
        assert_eq!(cc.0, 0x0046_4000);
        assert_eq!(cc.shn(), Cc::SHN_NORMAL);
        // Oversized values are masked to the field, not spilled.
        let cc = Cc::default().with_css(0xff).with_mps(0xff);
        assert_eq!(cc.css(), 7);
        assert_eq!(cc.mps(), 15);
        assert!(!cc.en());
        assert_eq!(cc.ams(), 0);
        assert_eq!(Cc::default().with_ams(7).ams(), 7);
    }

    #[test]
    fn csts_decodes() {
        let csts = Csts::from_bits_retain(0x1);
        assert!(csts.contains(Csts::RDY));
        assert!(!csts.contains(Csts::CFS));
        assert_eq!(csts.shst(), ShutdownStatus::Normal);
        assert_eq!(
            Csts::from_bits_retain(0b0100).shst(),
            ShutdownStatus::Occurring
        );
        assert_eq!(
            Csts::from_bits_retain(0b1000).shst(),
            ShutdownStatus::Complete
        );
        assert_eq!(
            Csts::from_bits_retain(0b1100).shst(),
            ShutdownStatus::Reserved
        );
        let csts = Csts::from_bits_retain(0xffff_ffff);
        assert!(csts.contains(Csts::CFS | Csts::NSSRO | Csts::PP | Csts::ST));
        assert_eq!(csts.bits(), 0xffff_ffff);
    }

    #[test]
    fn aqa_encodes() {
        let aqa = Aqa::from_entries(32, 64).expect("valid sizes");
        assert_eq!(aqa.0, (63 << 16) | 31);
        assert_eq!((aqa.asqs(), aqa.acqs()), (31, 63));
        assert_eq!((aqa.sq_entries(), aqa.cq_entries()), (32, 64));
        assert_eq!(
            Aqa::from_entries(4096, 4096).map(|a| a.0),
            Some(0x0fff_0fff)
        );
        assert!(Aqa::from_entries(1, 2).is_none());
        assert!(Aqa::from_entries(2, 4097).is_none());
    }

    #[test]
    fn doorbells() {
        assert_eq!(sq_tail_doorbell(0, 4), 0x1000);
        assert_eq!(cq_head_doorbell(0, 4), 0x1004);
        assert_eq!(sq_tail_doorbell(1, 4), 0x1008);
        assert_eq!(cq_head_doorbell(1, 4), 0x100C);
        assert_eq!(sq_tail_doorbell(3, 16), 0x1000 + 6 * 16);
        assert_eq!(cq_head_doorbell(3, 16), 0x1000 + 7 * 16);
        let stride = Cap(0xf << 32).doorbell_stride();
        assert_eq!(
            cq_head_doorbell(u16::MAX, stride),
            0x1000 + (2 * 65535 + 1) * 128 * 1024
        );
        assert_eq!(cq_head_doorbell(1, usize::MAX), usize::MAX);
    }

    #[test]
    fn register_offsets() {
        assert_eq!(
            [CAP, VS, INTMS, INTMC, CC, CSTS, NSSR, AQA, ASQ, ACQ],
            [0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C, 0x20, 0x24, 0x28, 0x30]
        );
        // 64-bit registers are naturally aligned.
        assert_eq!(CAP % 8 + ASQ % 8 + ACQ % 8, 0);
    }
}
