//! Wire structures of the NVMe Base and NVM Command Set specifications:
//! submission and completion queue entries, Identify data, log pages,
//! Copy source-range descriptors, opcodes and status codes.
//!
//! Every structure is `#[repr(C)]` with little-endian field types (alignment
//! 1, so no padding), zerocopy-derived, and has its size and the offsets of
//! the fields the driver uses checked at compile time, as Linux's
//! `_nvme_check_size` does. Reserved ranges are named by byte offset.

use std::fmt;
use std::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Admin command opcodes (NVMe Base 2.0, figure 84).
pub mod admin_opc {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Doorbell Buffer Config (shadow doorbells).
    pub const DBBUF_CONFIG: u8 = 0x7C;
}

/// OACS bit 8: Doorbell Buffer Config supported.
pub const OACS_DBBUF: u16 = 1 << 8;

/// NVM command set opcodes (NVM Command Set 1.0, figure 17).
pub mod nvm_opc {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
    /// Copy.
    pub const COPY: u8 = 0x19;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u8 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
}

/// Feature identifiers.
pub mod fid {
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
}

/// Log page identifiers.
pub mod lid {
    /// Error Information.
    pub const ERROR_INFO: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART: u8 = 0x02;
}

/// Submission queue entry (NVMe Base 2.0, 4.2, figure 88): 64 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Default, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SubmissionEntry {
    /// Opcode.
    pub opc: u8,
    /// Fused operation (bits 1:0), PSDT (bits 7:6; 0 = PRPs).
    pub flags: u8,
    /// Command identifier.
    pub cid: U16,
    /// Namespace identifier.
    pub nsid: U32,
    /// Command dword 2.
    pub cdw2: U32,
    /// Command dword 3.
    pub cdw3: U32,
    /// Metadata pointer.
    pub mptr: U64,
    /// PRP entry 1.
    pub prp1: U64,
    /// PRP entry 2.
    pub prp2: U64,
    /// Command dword 10.
    pub cdw10: U32,
    /// Command dword 11.
    pub cdw11: U32,
    /// Command dword 12.
    pub cdw12: U32,
    /// Command dword 13.
    pub cdw13: U32,
    /// Command dword 14.
    pub cdw14: U32,
    /// Command dword 15.
    pub cdw15: U32,
}

const _: () = {
    assert!(size_of::<SubmissionEntry>() == 64);
    assert!(offset_of!(SubmissionEntry, cid) == 2);
    assert!(offset_of!(SubmissionEntry, nsid) == 4);
    assert!(offset_of!(SubmissionEntry, mptr) == 16);
    assert!(offset_of!(SubmissionEntry, prp1) == 24);
    assert!(offset_of!(SubmissionEntry, prp2) == 32);
    assert!(offset_of!(SubmissionEntry, cdw10) == 40);
    assert!(offset_of!(SubmissionEntry, cdw15) == 60);
};

impl SubmissionEntry {
    /// An entry with `opc` and `nsid`, everything else zero.
    pub fn new(opc: u8, nsid: u32) -> SubmissionEntry {
        SubmissionEntry {
            opc,
            nsid: nsid.into(),
            ..Default::default()
        }
    }

    /// Sets CDW10..CDW15 from `dw` (in order; missing ones stay zero).
    #[must_use]
    pub fn with_cdws(mut self, dw: &[u32]) -> SubmissionEntry {
        let slots = [
            &mut self.cdw10,
            &mut self.cdw11,
            &mut self.cdw12,
            &mut self.cdw13,
            &mut self.cdw14,
            &mut self.cdw15,
        ];
        for (s, v) in slots.into_iter().zip(dw) {
            *s = (*v).into();
        }
        self
    }
}

/// Completion queue entry (NVMe Base 2.0, 4.6, figure 89): 16 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Default, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CompletionEntry {
    /// Command specific dword 0.
    pub dw0: U32,
    /// Command specific dword 1.
    pub dw1: U32,
    /// SQ head pointer.
    pub sqhd: U16,
    /// SQ identifier.
    pub sqid: U16,
    /// Command identifier.
    pub cid: U16,
    /// Phase tag (bit 0) and status field (bits 15:1).
    pub status: U16,
}

const _: () = {
    assert!(size_of::<CompletionEntry>() == 16);
    assert!(offset_of!(CompletionEntry, sqhd) == 8);
    assert!(offset_of!(CompletionEntry, cid) == 12);
    assert!(offset_of!(CompletionEntry, status) == 14);
};

/// Status code types.
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status.
    pub const PATH: u8 = 3;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// A command's status (the completion's status field without the phase
/// tag): status code type, status code, More and Do Not Retry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct NvmeStatus {
    /// Status code type.
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// More: more status in the Error Information log.
    pub more: bool,
    /// Do Not Retry.
    pub dnr: bool,
}

impl NvmeStatus {
    /// Successful completion.
    pub const SUCCESS: NvmeStatus = NvmeStatus::generic(0x00);
    /// Invalid Command Opcode.
    pub const INVALID_OPCODE: NvmeStatus = NvmeStatus::generic(0x01).dnr();
    /// Invalid Field in Command.
    pub const INVALID_FIELD: NvmeStatus = NvmeStatus::generic(0x02).dnr();
    /// Command ID Conflict.
    pub const CID_CONFLICT: NvmeStatus = NvmeStatus::generic(0x03).dnr();
    /// Data Transfer Error.
    pub const DATA_TRANSFER_ERROR: NvmeStatus = NvmeStatus::generic(0x04);
    /// Internal Error.
    pub const INTERNAL_ERROR: NvmeStatus = NvmeStatus::generic(0x06);
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: NvmeStatus = NvmeStatus::generic(0x07);
    /// Command Aborted due to SQ Deletion: what the driver reports for
    /// commands outstanding when the controller was reset.
    pub const ABORTED_SQ_DELETION: NvmeStatus = NvmeStatus::generic(0x08);
    /// Invalid Namespace or Format.
    pub const INVALID_NAMESPACE: NvmeStatus = NvmeStatus::generic(0x0B).dnr();
    /// Invalid PRP Offset.
    pub const INVALID_PRP_OFFSET: NvmeStatus = NvmeStatus::generic(0x13).dnr();
    /// LBA Out of Range.
    pub const LBA_OUT_OF_RANGE: NvmeStatus = NvmeStatus::generic(0x80).dnr();
    /// Completion Queue Invalid.
    pub const CQ_INVALID: NvmeStatus = NvmeStatus::specific(0x00).dnr();
    /// Invalid Queue Identifier.
    pub const INVALID_QID: NvmeStatus = NvmeStatus::specific(0x01).dnr();
    /// Invalid Queue Size.
    pub const INVALID_QUEUE_SIZE: NvmeStatus = NvmeStatus::specific(0x02).dnr();
    /// Invalid Log Page.
    pub const INVALID_LOG_PAGE: NvmeStatus = NvmeStatus::specific(0x09).dnr();
    /// Invalid Format.
    pub const INVALID_FORMAT: NvmeStatus = NvmeStatus::specific(0x0A).dnr();
    /// Invalid Queue Deletion.
    pub const INVALID_QUEUE_DELETION: NvmeStatus = NvmeStatus::specific(0x0C).dnr();
    /// Command Size Limit Exceeded (Copy over MSSRL, MCL or MSRC).
    pub const CMD_SIZE_LIMIT: NvmeStatus = NvmeStatus::specific(0x83).dnr();
    /// Write Fault.
    pub const WRITE_FAULT: NvmeStatus = NvmeStatus::media(0x80);
    /// Unrecovered Read Error.
    pub const UNRECOVERED_READ: NvmeStatus = NvmeStatus::media(0x81);

    /// A generic status (SCT 0).
    pub const fn generic(sc: u8) -> NvmeStatus {
        NvmeStatus {
            sct: sct::GENERIC,
            sc,
            more: false,
            dnr: false,
        }
    }

    /// A command specific status (SCT 1).
    pub const fn specific(sc: u8) -> NvmeStatus {
        NvmeStatus {
            sct: sct::COMMAND_SPECIFIC,
            sc,
            more: false,
            dnr: false,
        }
    }

    /// A media error status (SCT 2).
    pub const fn media(sc: u8) -> NvmeStatus {
        NvmeStatus {
            sct: sct::MEDIA,
            sc,
            more: false,
            dnr: false,
        }
    }

    /// The same status with DNR set.
    pub const fn dnr(mut self) -> NvmeStatus {
        self.dnr = true;
        self
    }

    /// Decodes the 16-bit completion status field (phase tag in bit 0 is
    /// ignored).
    pub const fn from_field(field: u16) -> NvmeStatus {
        NvmeStatus {
            sc: (field >> 1) as u8,
            sct: ((field >> 9) & 0x7) as u8,
            more: field & (1 << 14) != 0,
            dnr: field & (1 << 15) != 0,
        }
    }

    /// Encodes as the completion status field with phase tag `phase`.
    pub const fn to_field(self, phase: bool) -> u16 {
        ((self.sc as u16) << 1)
            | (((self.sct & 0x7) as u16) << 9)
            | ((self.more as u16) << 14)
            | ((self.dnr as u16) << 15)
            | phase as u16
    }

    /// `(SCT << 8) | SC`, the form QEMU and nvme-cli print (0x183).
    pub const fn code(self) -> u16 {
        ((self.sct as u16) << 8) | self.sc as u16
    }

    /// Whether this is success.
    pub const fn is_success(self) -> bool {
        self.sct == 0 && self.sc == 0
    }

    /// Whether SCT/SC equal `other`'s (ignoring DNR and More).
    pub const fn same_code(self, other: NvmeStatus) -> bool {
        self.sct == other.sct && self.sc == other.sc
    }

    /// The status's name in the specification, or `None` if unknown.
    pub fn name(self) -> Option<&'static str> {
        Some(match (self.sct, self.sc) {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x03) => "Command ID Conflict",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x05) => "Commands Aborted due to Power Loss Notification",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x08) => "Command Aborted due to SQ Deletion",
            (0, 0x09) => "Command Aborted due to Failed Fused Command",
            (0, 0x0A) => "Command Aborted due to Missing Fused Command",
            (0, 0x0B) => "Invalid Namespace or Format",
            (0, 0x0C) => "Command Sequence Error",
            (0, 0x0D) => "Invalid SGL Segment Descriptor",
            (0, 0x0F) => "Invalid Data SGL Length",
            (0, 0x13) => "Invalid PRP Offset",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x81) => "Capacity Exceeded",
            (0, 0x82) => "Namespace Not Ready",
            (1, 0x00) => "Completion Queue Invalid",
            (1, 0x01) => "Invalid Queue Identifier",
            (1, 0x02) => "Invalid Queue Size",
            (1, 0x03) => "Abort Command Limit Exceeded",
            (1, 0x05) => "Asynchronous Event Request Limit Exceeded",
            (1, 0x08) => "Invalid Interrupt Vector",
            (1, 0x09) => "Invalid Log Page",
            (1, 0x0A) => "Invalid Format",
            (1, 0x0C) => "Invalid Queue Deletion",
            (1, 0x0D) => "Feature Identifier Not Saveable",
            (1, 0x0E) => "Feature Not Changeable",
            (1, 0x80) => "Conflicting Attributes",
            (1, 0x82) => "Attempted Write to Read Only Range",
            (1, 0x83) => "Command Size Limit Exceeded",
            (2, 0x80) => "Write Fault",
            (2, 0x81) => "Unrecovered Read Error",
            (2, 0x82) => "End-to-end Guard Check Error",
            (2, 0x85) => "Compare Failure",
            (2, 0x86) => "Access Denied",
            (2, 0x87) => "Deallocated or Unwritten Logical Block",
            _ => return None,
        })
    }
}

impl fmt::Display for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}")?,
            None => write!(f, "unknown status")?,
        }
        write!(f, " (SCT {:#x} SC {:#04x}", self.sct, self.sc)?;
        if self.dnr {
            write!(f, ", DNR")?;
        }
        if self.more {
            write!(f, ", More")?;
        }
        write!(f, ")")
    }
}

impl fmt::Debug for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NvmeStatus({self})")
    }
}

/// Power state descriptor (32 bytes), opaque to this driver.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct PowerStateDescriptor {
    /// Raw bytes.
    pub raw: [u8; 32],
}

/// Identify Controller data structure (NVMe Base 2.0, figure 275): 4096 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: U16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: U16,
    /// Serial Number (ASCII, space padded).
    pub sn: [u8; 20],
    /// Model Number (ASCII, space padded).
    pub mn: [u8; 40],
    /// Firmware Revision.
    pub fr: [u8; 8],
    /// Recommended Arbitration Burst.
    pub rab: u8,
    /// IEEE OUI Identifier.
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities.
    pub cmic: u8,
    /// Maximum Data Transfer Size (2^n units of CAP.MPSMIN; 0 = no limit).
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: U16,
    /// Version.
    pub ver: U32,
    /// RTD3 Resume Latency.
    pub rtd3r: U32,
    /// RTD3 Entry Latency.
    pub rtd3e: U32,
    /// Optional Asynchronous Events Supported.
    pub oaes: U32,
    /// Controller Attributes.
    pub ctratt: U32,
    /// Read Recovery Levels Supported.
    pub rrls: U16,
    /// Reserved, bytes 102..111.
    pub _rsvd102: [u8; 9],
    /// Controller Type.
    pub cntrltype: u8,
    /// FRU Globally Unique Identifier.
    pub fguid: [u8; 16],
    /// Command Retry Delay Times.
    pub crdt: [U16; 3],
    /// Reserved, bytes 134..255.
    pub _rsvd134: [u8; 122],
    /// Optional Admin Command Support.
    pub oacs: U16,
    /// Abort Command Limit (0's based).
    pub acl: u8,
    /// Asynchronous Event Request Limit (0's based).
    pub aerl: u8,
    /// Firmware Updates.
    pub frmw: u8,
    /// Log Page Attributes.
    pub lpa: u8,
    /// Error Log Page Entries (0's based).
    pub elpe: u8,
    /// Number of Power States Support (0's based).
    pub npss: u8,
    /// Admin Vendor Specific Command Configuration.
    pub avscc: u8,
    /// Autonomous Power State Transition Attributes.
    pub apsta: u8,
    /// Warning Composite Temperature Threshold.
    pub wctemp: U16,
    /// Critical Composite Temperature Threshold.
    pub cctemp: U16,
    /// Bytes 270..511 (MTFA .. reserved), kept raw.
    pub _rsvd270: [u8; 242],
    /// Submission Queue Entry Size (min in bits 3:0, max in 7:4, log2).
    pub sqes: u8,
    /// Completion Queue Entry Size.
    pub cqes: u8,
    /// Maximum Outstanding Commands.
    pub maxcmd: U16,
    /// Number of Namespaces (highest NSID).
    pub nn: U32,
    /// Optional NVM Command Support (bit 8: Copy).
    pub oncs: U16,
    /// Fused Operation Support.
    pub fuses: U16,
    /// Format NVM Attributes.
    pub fna: u8,
    /// Volatile Write Cache.
    pub vwc: u8,
    /// Atomic Write Unit Normal.
    pub awun: U16,
    /// Atomic Write Unit Power Fail.
    pub awupf: U16,
    /// I/O Command Set Vendor Specific Command Configuration.
    pub icsvscc: u8,
    /// Namespace Write Protection Capabilities.
    pub nwpc: u8,
    /// Atomic Compare & Write Unit.
    pub acwu: U16,
    /// Optional Copy Formats Supported (bit n: format n).
    pub ocfs: U16,
    /// SGL Support.
    pub sgls: U32,
    /// Maximum Number of Allowed Namespaces.
    pub mnan: U32,
    /// Bytes 544..767, reserved.
    pub _rsvd544: [u8; 224],
    /// NVM Subsystem NVMe Qualified Name.
    pub subnqn: [u8; 256],
    /// Bytes 1024..1791, reserved.
    pub _rsvd1024: [u8; 768],
    /// I/O Queue Command Capsule Supported Size (fabrics; 16-byte units).
    pub ioccsz: U32,
    /// I/O Queue Response Capsule Supported Size (fabrics; 16-byte units).
    pub iorcsz: U32,
    /// In Capsule Data Offset (fabrics; 16-byte units).
    pub icdoff: U16,
    /// Fabrics Controller Attributes.
    pub fcatt: u8,
    /// Maximum SGL Data Block Descriptors.
    pub msdbd: u8,
    /// Optional Fabric Commands Supported.
    pub ofcs: U16,
    /// Bytes 1806..2047, reserved.
    pub _rsvd1806: [u8; 242],
    /// Power State Descriptors.
    pub psd: [PowerStateDescriptor; 32],
    /// Vendor Specific.
    pub vs: [u8; 1024],
}

const _: () = {
    assert!(size_of::<IdentifyController>() == 4096);
    assert!(offset_of!(IdentifyController, sn) == 4);
    assert!(offset_of!(IdentifyController, mn) == 24);
    assert!(offset_of!(IdentifyController, fr) == 64);
    assert!(offset_of!(IdentifyController, mdts) == 77);
    assert!(offset_of!(IdentifyController, cntlid) == 78);
    assert!(offset_of!(IdentifyController, ver) == 80);
    assert!(offset_of!(IdentifyController, cntrltype) == 111);
    assert!(offset_of!(IdentifyController, oacs) == 256);
    assert!(offset_of!(IdentifyController, wctemp) == 266);
    assert!(offset_of!(IdentifyController, sqes) == 512);
    assert!(offset_of!(IdentifyController, nn) == 516);
    assert!(offset_of!(IdentifyController, oncs) == 520);
    assert!(offset_of!(IdentifyController, vwc) == 525);
    assert!(offset_of!(IdentifyController, ocfs) == 534);
    assert!(offset_of!(IdentifyController, sgls) == 536);
    assert!(offset_of!(IdentifyController, subnqn) == 768);
    assert!(offset_of!(IdentifyController, ioccsz) == 1792);
    assert!(offset_of!(IdentifyController, icdoff) == 1800);
    assert!(offset_of!(IdentifyController, msdbd) == 1803);
    assert!(offset_of!(IdentifyController, psd) == 2048);
    assert!(offset_of!(IdentifyController, vs) == 3072);
};

/// ONCS bit 8: Copy supported.
pub const ONCS_COPY: u16 = 1 << 8;
/// ONCS bit 3: Write Zeroes supported.
pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
/// ONCS bit 2: Dataset Management supported.
pub const ONCS_DSM: u16 = 1 << 2;

/// Trims an ASCII identify string (space or NUL padded).
pub fn ascii_field(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

impl IdentifyController {
    /// Serial number, trimmed.
    pub fn serial(&self) -> String {
        ascii_field(&self.sn)
    }
    /// Model number, trimmed.
    pub fn model(&self) -> String {
        ascii_field(&self.mn)
    }
    /// Firmware revision, trimmed.
    pub fn firmware(&self) -> String {
        ascii_field(&self.fr)
    }
}

/// LBA Format data structure (NVM Command Set, figure 98).
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct LbaFormat {
    /// Metadata Size.
    pub ms: U16,
    /// LBA Data Size, log2 (9 = 512 bytes; below 9 = not in use).
    pub lbads: u8,
    /// Relative Performance (bits 1:0).
    pub rp: u8,
}

/// Identify Namespace data structure (NVM Command Set 1.0, figure 97):
/// 4096 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct IdentifyNamespace {
    /// Namespace Size (blocks).
    pub nsze: U64,
    /// Namespace Capacity.
    pub ncap: U64,
    /// Namespace Utilization.
    pub nuse: U64,
    /// Namespace Features.
    pub nsfeat: u8,
    /// Number of LBA Formats (0's based).
    pub nlbaf: u8,
    /// Formatted LBA Size (bits 3:0 and 6:5 index the format).
    pub flbas: u8,
    /// Metadata Capabilities.
    pub mc: u8,
    /// End-to-end Data Protection Capabilities.
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings.
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities.
    pub nmic: u8,
    /// Reservation Capabilities.
    pub rescap: u8,
    /// Format Progress Indicator.
    pub fpi: u8,
    /// Deallocate Logical Block Features.
    pub dlfeat: u8,
    /// Namespace Atomic Write Unit Normal.
    pub nawun: U16,
    /// Namespace Atomic Write Unit Power Fail.
    pub nawupf: U16,
    /// Namespace Atomic Compare & Write Unit.
    pub nacwu: U16,
    /// Namespace Atomic Boundary Size Normal.
    pub nabsn: U16,
    /// Namespace Atomic Boundary Offset.
    pub nabo: U16,
    /// Namespace Atomic Boundary Size Power Fail.
    pub nabspf: U16,
    /// Namespace Optimal I/O Boundary.
    pub noiob: U16,
    /// NVM Capacity (bytes, 128 bit).
    pub nvmcap: [u8; 16],
    /// Namespace Preferred Write Granularity.
    pub npwg: U16,
    /// Namespace Preferred Write Alignment.
    pub npwa: U16,
    /// Namespace Preferred Deallocate Granularity.
    pub npdg: U16,
    /// Namespace Preferred Deallocate Alignment.
    pub npda: U16,
    /// Namespace Optimal Write Size.
    pub nows: U16,
    /// Maximum Single Source Range Length (blocks; 0 = no limit reported).
    pub mssrl: U16,
    /// Maximum Copy Length (blocks).
    pub mcl: U32,
    /// Maximum Source Range Count (0's based).
    pub msrc: u8,
    /// Bytes 81..91, reserved.
    pub _rsvd81: [u8; 11],
    /// ANA Group Identifier.
    pub anagrpid: U32,
    /// Bytes 96..98, reserved.
    pub _rsvd96: [u8; 3],
    /// Namespace Attributes.
    pub nsattr: u8,
    /// NVM Set Identifier.
    pub nvmsetid: U16,
    /// Endurance Group Identifier.
    pub endgid: U16,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier.
    pub eui64: [u8; 8],
    /// LBA formats 0..63.
    pub lbaf: [LbaFormat; 64],
    /// Vendor specific (bytes 384..4095).
    pub vs: [u8; 3712],
}

const _: () = {
    assert!(size_of::<IdentifyNamespace>() == 4096);
    assert!(offset_of!(IdentifyNamespace, nlbaf) == 25);
    assert!(offset_of!(IdentifyNamespace, flbas) == 26);
    assert!(offset_of!(IdentifyNamespace, nvmcap) == 48);
    assert!(offset_of!(IdentifyNamespace, mssrl) == 74);
    assert!(offset_of!(IdentifyNamespace, mcl) == 76);
    assert!(offset_of!(IdentifyNamespace, msrc) == 80);
    assert!(offset_of!(IdentifyNamespace, anagrpid) == 92);
    assert!(offset_of!(IdentifyNamespace, nguid) == 104);
    assert!(offset_of!(IdentifyNamespace, eui64) == 120);
    assert!(offset_of!(IdentifyNamespace, lbaf) == 128);
};

impl IdentifyNamespace {
    /// Index of the formatted LBA format (FLBAS bits 3:0, 6:5).
    pub fn lba_format_index(&self) -> usize {
        (self.flbas & 0xf) as usize | (((self.flbas >> 5) & 0x3) as usize) << 4
    }

    /// The block size in bytes, or `None` if FLBAS points at a format the
    /// namespace does not list or whose size is not 512 B..=64 KiB (garbage).
    pub fn block_size(&self) -> Option<u32> {
        let i = self.lba_format_index();
        if i > self.nlbaf as usize {
            return None;
        }
        let lbads = self.lbaf.get(i)?.lbads;
        (9..=16).contains(&lbads).then(|| 1u32 << lbads)
    }
}

/// Copy source range descriptor, format 0 (NVM Command Set, figure 39):
/// 32 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CopyRangeFormat0 {
    /// Bytes 0..7, reserved.
    pub _rsvd0: [u8; 8],
    /// Starting LBA.
    pub slba: U64,
    /// Number of logical blocks, 0's based.
    pub nlb: U16,
    /// Bytes 18..23, reserved.
    pub _rsvd18: [u8; 6],
    /// Expected initial logical block reference tag.
    pub eilbrt: U32,
    /// Expected logical block application tag.
    pub elbat: U16,
    /// Expected logical block application tag mask.
    pub elbatm: U16,
}

const _: () = {
    assert!(size_of::<CopyRangeFormat0>() == 32);
    assert!(offset_of!(CopyRangeFormat0, slba) == 8);
    assert!(offset_of!(CopyRangeFormat0, nlb) == 16);
    assert!(offset_of!(CopyRangeFormat0, eilbrt) == 24);
};

/// Copy source range descriptor, format 1 (for namespaces formatted with
/// 64-bit guard protection information): 40 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct CopyRangeFormat1 {
    /// Bytes 0..7, reserved.
    pub _rsvd0: [u8; 8],
    /// Starting LBA.
    pub slba: U64,
    /// Number of logical blocks, 0's based.
    pub nlb: U16,
    /// Bytes 18..25, reserved.
    pub _rsvd18: [u8; 8],
    /// Expected initial logical block storage and reference tag (80 bits).
    pub elbst_eilbrt: [u8; 10],
    /// Expected logical block application tag.
    pub elbat: U16,
    /// Expected logical block application tag mask.
    pub elbatm: U16,
}

const _: () = {
    assert!(size_of::<CopyRangeFormat1>() == 40);
    assert!(offset_of!(CopyRangeFormat1, slba) == 8);
    assert!(offset_of!(CopyRangeFormat1, nlb) == 16);
    assert!(offset_of!(CopyRangeFormat1, elbst_eilbrt) == 26);
    assert!(offset_of!(CopyRangeFormat1, elbat) == 36);
};

/// Dataset Management range (NVM Command Set, figure 38): 16 bytes.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct DsmRange {
    /// Context attributes.
    pub cattr: U32,
    /// Length in logical blocks (1's based).
    pub nlb: U32,
    /// Starting LBA.
    pub slba: U64,
}

const _: () = assert!(size_of::<DsmRange>() == 16);

/// Error Information log entry (NVMe Base 2.0, figure 205): 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ErrorLogEntry {
    /// Error Count (0 = entry unused).
    pub error_count: U64,
    /// Submission Queue ID.
    pub sqid: U16,
    /// Command ID.
    pub cid: U16,
    /// Status Field (bit 0 is the phase tag of the completion).
    pub status_field: U16,
    /// Parameter Error Location.
    pub parm_error_location: U16,
    /// LBA.
    pub lba: U64,
    /// Namespace.
    pub nsid: U32,
    /// Vendor Specific Information Available.
    pub vs: u8,
    /// Transport Type.
    pub trtype: u8,
    /// Bytes 30..31, reserved.
    pub _rsvd30: [u8; 2],
    /// Command Specific Information.
    pub csi: U64,
    /// Transport Type Specific Information.
    pub trtype_specific: U16,
    /// Bytes 42..63, reserved.
    pub _rsvd42: [u8; 22],
}

const _: () = {
    assert!(size_of::<ErrorLogEntry>() == 64);
    assert!(offset_of!(ErrorLogEntry, lba) == 16);
    assert!(offset_of!(ErrorLogEntry, nsid) == 24);
    assert!(offset_of!(ErrorLogEntry, csi) == 32);
};

/// SMART / Health Information log (NVMe Base 2.0, figure 207): 512 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct SmartLog {
    /// Critical Warning.
    pub critical_warning: u8,
    /// Composite Temperature (Kelvin).
    pub temperature: U16,
    /// Available Spare (%).
    pub avail_spare: u8,
    /// Available Spare Threshold (%).
    pub spare_thresh: u8,
    /// Percentage Used.
    pub percent_used: u8,
    /// Endurance Group Critical Warning Summary.
    pub endu_grp_crit_warn_sumry: u8,
    /// Bytes 7..31, reserved.
    pub _rsvd7: [u8; 25],
    /// Data Units Read (thousands of 512-byte units, 128 bit).
    pub data_units_read: [u8; 16],
    /// Data Units Written.
    pub data_units_written: [u8; 16],
    /// Host Read Commands.
    pub host_reads: [u8; 16],
    /// Host Write Commands.
    pub host_writes: [u8; 16],
    /// Controller Busy Time.
    pub ctrl_busy_time: [u8; 16],
    /// Power Cycles.
    pub power_cycles: [u8; 16],
    /// Power On Hours.
    pub power_on_hours: [u8; 16],
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: [u8; 16],
    /// Media and Data Integrity Errors.
    pub media_errors: [u8; 16],
    /// Number of Error Information Log Entries.
    pub num_err_log_entries: [u8; 16],
    /// Bytes 192..511 (temperatures, reserved).
    pub _rsvd192: [u8; 320],
}

const _: () = {
    assert!(size_of::<SmartLog>() == 512);
    assert!(offset_of!(SmartLog, temperature) == 1);
    assert!(offset_of!(SmartLog, data_units_read) == 32);
    assert!(offset_of!(SmartLog, host_reads) == 64);
    assert!(offset_of!(SmartLog, num_err_log_entries) == 176);
};

/// 128-bit little-endian counter from a log page, saturated to `u64`.
pub fn le128_saturating(bytes: &[u8; 16]) -> u64 {
    let lo = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8]));
    let hi = u64::from_le_bytes(bytes[8..].try_into().unwrap_or([0; 8]));
    if hi != 0 { u64::MAX } else { lo }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::FromZeros;

    #[test]
    fn status_roundtrip_and_names() {
        let s = NvmeStatus::CMD_SIZE_LIMIT;
        assert_eq!(s.code(), 0x183);
        assert_eq!(s.name(), Some("Command Size Limit Exceeded"));
        for phase in [false, true] {
            let f = s.to_field(phase);
            assert_eq!(f & 1, phase as u16);
            assert_eq!(NvmeStatus::from_field(f), s);
        }
        // QEMU's NVME_LBA_RANGE | NVME_DNR, shifted into the field.
        let f = (0x0080u16 | 0x4000) << 1;
        let s = NvmeStatus::from_field(f);
        assert_eq!(s, NvmeStatus::LBA_OUT_OF_RANGE);
        assert!(s.to_string().contains("LBA Out of Range"), "{s}");
        assert!(s.to_string().contains("DNR"));
        let u = NvmeStatus::from_field(0xffff);
        assert_eq!((u.sct, u.sc, u.more, u.dnr), (7, 0xff, true, true));
        assert!(u.to_string().contains("unknown"));
        assert!(NvmeStatus::SUCCESS.is_success());
        assert!(NvmeStatus::WRITE_FAULT.same_code(NvmeStatus::media(0x80).dnr()));
    }

    #[test]
    fn namespace_block_size_is_checked() {
        let mut ns = IdentifyNamespace::new_zeroed();
        assert_eq!(ns.block_size(), None, "lbads 0 is garbage");
        ns.lbaf[0].lbads = 9;
        assert_eq!(ns.block_size(), Some(512));
        ns.flbas = 3;
        assert_eq!(ns.block_size(), None, "format 3 beyond nlbaf");
        ns.nlbaf = 3;
        ns.lbaf[3].lbads = 12;
        assert_eq!(ns.block_size(), Some(4096));
        ns.lbaf[3].lbads = 40;
        assert_eq!(ns.block_size(), None);
        ns.flbas = 0x60 | 0xf;
        ns.nlbaf = 63;
        assert_eq!(ns.lba_format_index(), 63);
    }

    #[test]
    fn cdw_builder_and_strings() {
        let e = SubmissionEntry::new(nvm_opc::READ, 1).with_cdws(&[1, 2, 3]);
        assert_eq!(
            (e.cdw10.get(), e.cdw11.get(), e.cdw12.get(), e.cdw13.get()),
            (1, 2, 3, 0)
        );
        assert_eq!(e.as_bytes()[40..44], [1, 0, 0, 0]);
        assert_eq!(ascii_field(b"QEMU NVMe Ctrl   \0\0"), "QEMU NVMe Ctrl");
        let mut c = [0u8; 16];
        c[0] = 5;
        assert_eq!(le128_saturating(&c), 5);
        c[9] = 1;
        assert_eq!(le128_saturating(&c), u64::MAX);
    }
}
