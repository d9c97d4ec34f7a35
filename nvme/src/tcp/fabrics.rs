//! NVMe over Fabrics commands and structures (NVMe Base 2.0, section 6;
//! NVMe/TCP 1.0): Connect, Property Get/Set, Keep Alive, the Discovery log
//! page, and the SGL descriptors NVMe/TCP commands carry instead of PRPs.

use std::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

use crate::spec::SubmissionEntry;

/// The Fabrics command opcode.
pub const FABRICS_OPC: u8 = 0x7F;
/// Keep Alive (admin opcode 0x18).
pub const KEEP_ALIVE_OPC: u8 = 0x18;

/// Fabrics command types (FCTYPE, byte 4).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
}

/// The well-known NQN of discovery controllers.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";
/// Discovery log page identifier.
pub const LID_DISCOVERY: u8 = 0x70;
/// The controller id asking for any (dynamic) controller in Connect.
pub const DYNAMIC_CNTLID: u16 = 0xFFFF;
/// PSDT bits of CDW0 byte 1: SGLs for data, metadata in one buffer.
pub const PSDT_SGL: u8 = 1 << 6;

/// SGL descriptor (16 bytes) in the data pointer of a capsule.
#[repr(C)]
#[derive(
    Clone, Copy, Default, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct SglDescriptor {
    /// Address (offset for in-capsule data, 0 for transport data).
    pub addr: U64,
    /// Length in bytes.
    pub length: U32,
    /// Reserved.
    pub _rsvd: [u8; 3],
    /// Descriptor type (bits 7:4) and sub type (bits 3:0).
    pub sgl_type: u8,
}

const _: () = assert!(size_of::<SglDescriptor>() == 16);

impl SglDescriptor {
    /// Data Block, offset sub type: data in the capsule at `offset`.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport SGL Data Block, transport-specific sub type A: data moved
    /// by C2HData / R2T and H2CData PDUs.
    pub const TRANSPORT: u8 = 0x5A;

    /// Data of `len` bytes in the capsule, right after the command.
    pub fn in_capsule(len: u32) -> SglDescriptor {
        SglDescriptor {
            length: len.into(),
            sgl_type: Self::IN_CAPSULE,
            ..Default::default()
        }
    }

    /// Data of `len` bytes moved by data PDUs (or none, `len` 0).
    pub fn transport(len: u32) -> SglDescriptor {
        SglDescriptor {
            length: len.into(),
            sgl_type: Self::TRANSPORT,
            ..Default::default()
        }
    }

    /// The descriptor of a submission entry (bytes 24..40).
    pub fn of(sqe: &SubmissionEntry) -> SglDescriptor {
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&sqe.prp1.get().to_le_bytes());
        raw[8..].copy_from_slice(&sqe.prp2.get().to_le_bytes());
        SglDescriptor::read_from_bytes(&raw).unwrap_or_default()
    }

    /// Puts this descriptor in `sqe`'s data pointer and marks it as SGL.
    pub fn apply(self, sqe: &mut SubmissionEntry) {
        let raw = self.as_bytes();
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&raw[..8]);
        hi.copy_from_slice(&raw[8..]);
        sqe.prp1 = u64::from_le_bytes(lo).into();
        sqe.prp2 = u64::from_le_bytes(hi).into();
        sqe.flags = (sqe.flags & !0xC0) | PSDT_SGL;
    }
}

/// CATTR bit 2: the host asks for SQ flow control off (it never has more
/// commands outstanding than the queue holds); a controller then need not
/// report SQ heads, and Linux nvmet completes reads with the C2HData
/// SUCCESS flag, without a response capsule.
pub const CATTR_DISABLE_SQ_FLOW: u8 = 1 << 2;
/// Byte offset of CATTR in Connect, as a refusal's IPO names it.
pub const CATTR_OFFSET: u32 = 46;

/// Connect command: queue `qid` of `sqsize` entries; `kato_ms` on the
/// admin queue; `cattr` attributes. The 1024 bytes of [`ConnectData`] go
/// in the capsule.
pub fn connect(qid: u16, entries: u16, kato_ms: u32, cattr: u8) -> SubmissionEntry {
    let mut sqe = fabrics(fctype::CONNECT);
    // RECFMT 0 (bytes 40-41), QID (42-43), SQSIZE 0's based (44-45),
    // CATTR (46), KATO (48-51).
    sqe.cdw10 = (u32::from(qid) << 16).into();
    sqe.cdw11 = (u32::from(entries.saturating_sub(1)) | u32::from(cattr) << 16).into();
    sqe.cdw12 = kato_ms.into();
    sqe
}

/// Property Get of the 4- or 8-byte property at `offset`.
pub fn property_get(offset: u32, eight_bytes: bool) -> SubmissionEntry {
    let mut sqe = fabrics(fctype::PROPERTY_GET);
    sqe.cdw10 = u32::from(eight_bytes).into();
    sqe.cdw11 = offset.into();
    sqe
}

/// Property Set of the 4-byte property at `offset`.
pub fn property_set(offset: u32, value: u32) -> SubmissionEntry {
    let mut sqe = fabrics(fctype::PROPERTY_SET);
    sqe.cdw11 = offset.into();
    sqe.cdw12 = value.into();
    sqe
}

/// Keep Alive.
pub fn keep_alive() -> SubmissionEntry {
    SubmissionEntry::new(KEEP_ALIVE_OPC, 0)
}

/// Get Log Page of `len` bytes (a multiple of 4) of log `lid` at `offset`.
pub fn get_log_page(lid: u8, len: u32, offset: u64) -> SubmissionEntry {
    let numd = len / 4 - 1;
    SubmissionEntry::new(crate::spec::admin_opc::GET_LOG_PAGE, 0).with_cdws(&[
        u32::from(lid) | (numd & 0xFFFF) << 16,
        numd >> 16,
        offset as u32,
        (offset >> 32) as u32,
    ])
}

fn fabrics(fctype: u8) -> SubmissionEntry {
    // FCTYPE sits in byte 4, where other commands have the NSID.
    SubmissionEntry::new(FABRICS_OPC, u32::from(fctype))
}

/// The Fabrics command type of `sqe`, if it is a Fabrics command.
pub fn fctype_of(sqe: &SubmissionEntry) -> Option<u8> {
    (sqe.opc == FABRICS_OPC).then(|| sqe.nsid.get() as u8)
}

/// Connect command data (1024 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ConnectData {
    /// Host identifier.
    pub hostid: [u8; 16],
    /// Controller id: [`DYNAMIC_CNTLID`] on the admin queue, the granted
    /// one on I/O queues.
    pub cntlid: U16,
    /// Reserved.
    pub _rsvd18: [u8; 238],
    /// Subsystem NQN (NUL padded).
    pub subnqn: [u8; 256],
    /// Host NQN (NUL padded).
    pub hostnqn: [u8; 256],
    /// Reserved.
    pub _rsvd768: [u8; 256],
}

const _: () = {
    assert!(size_of::<ConnectData>() == 1024);
    assert!(offset_of!(ConnectData, cntlid) == 16);
    assert!(offset_of!(ConnectData, subnqn) == 256);
    assert!(offset_of!(ConnectData, hostnqn) == 512);
};

/// The longest NQN (NVMe Base 2.0, 4.5: 223 bytes, UTF-8).
pub const NQN_MAX: usize = 223;

impl ConnectData {
    /// Connect data for `subnqn` from `hostnqn`/`hostid`. NQNs longer than
    /// [`NQN_MAX`] are refused by the caller before this.
    pub fn new(hostid: [u8; 16], cntlid: u16, subnqn: &str, hostnqn: &str) -> ConnectData {
        let mut d = ConnectData::new_zeroed();
        d.hostid = hostid;
        d.cntlid = cntlid.into();
        copy_nqn(&mut d.subnqn, subnqn);
        copy_nqn(&mut d.hostnqn, hostnqn);
        d
    }

    /// The subsystem NQN.
    pub fn subsystem(&self) -> String {
        nqn_field(&self.subnqn)
    }

    /// The host NQN.
    pub fn host(&self) -> String {
        nqn_field(&self.hostnqn)
    }
}

fn copy_nqn(dst: &mut [u8; 256], nqn: &str) {
    let n = nqn.len().min(NQN_MAX);
    dst[..n].copy_from_slice(&nqn.as_bytes()[..n]);
}

/// An NQN field up to its first NUL.
pub fn nqn_field(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim_end().to_owned()
}

/// Discovery log page header (the first 1024 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DiscoveryLogHeader {
    /// Generation counter: changes when the log changes.
    pub genctr: U64,
    /// Number of records.
    pub numrec: U64,
    /// Record format (0).
    pub recfmt: U16,
    /// Reserved.
    pub _rsvd: [u8; 1006],
}

/// One Discovery log page entry (1024 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct DiscoveryLogEntry {
    /// Transport type (3: TCP).
    pub trtype: u8,
    /// Address family (1: IPv4, 2: IPv6).
    pub adrfam: u8,
    /// Subsystem type (1: referral, 2: NVM, 3: current discovery).
    pub subtype: u8,
    /// Transport requirements.
    pub treq: u8,
    /// Port id.
    pub portid: U16,
    /// Controller id.
    pub cntlid: U16,
    /// Admin max SQ size.
    pub asqsz: U16,
    /// Reserved.
    pub _rsvd10: [u8; 22],
    /// Transport service id (the TCP port, as text).
    pub trsvcid: [u8; 32],
    /// Reserved.
    pub _rsvd64: [u8; 192],
    /// Subsystem NQN.
    pub subnqn: [u8; 256],
    /// Transport address (the IP address, as text).
    pub traddr: [u8; 256],
    /// Transport-specific address subtype.
    pub tsas: [u8; 256],
}

const _: () = {
    assert!(size_of::<DiscoveryLogHeader>() == 1024);
    assert!(size_of::<DiscoveryLogEntry>() == 1024);
    assert!(offset_of!(DiscoveryLogEntry, trsvcid) == 32);
    assert!(offset_of!(DiscoveryLogEntry, subnqn) == 256);
    assert!(offset_of!(DiscoveryLogEntry, traddr) == 512);
};

/// Transport type TCP.
pub const TRTYPE_TCP: u8 = 3;

/// A subsystem a discovery controller lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveryEntry {
    /// Transport type (3: TCP).
    pub trtype: u8,
    /// Address family (1: IPv4, 2: IPv6).
    pub adrfam: u8,
    /// Subsystem type (1: referral, 2: NVM, 3: current discovery).
    pub subtype: u8,
    /// Port id.
    pub portid: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Transport address.
    pub traddr: String,
    /// Transport service id (port).
    pub trsvcid: String,
}

impl DiscoveryEntry {
    /// The entry of a raw record.
    pub fn from_raw(e: &DiscoveryLogEntry) -> DiscoveryEntry {
        DiscoveryEntry {
            trtype: e.trtype,
            adrfam: e.adrfam,
            subtype: e.subtype,
            portid: e.portid.get(),
            subnqn: nqn_field(&e.subnqn),
            traddr: crate::spec::ascii_field(&e.traddr),
            trsvcid: crate::spec::ascii_field(&e.trsvcid),
        }
    }

    /// The subsystem type's name, as `nvme discover` prints it.
    pub fn subtype_name(&self) -> &'static str {
        match self.subtype {
            1 => "referral",
            2 => "nvme subsystem",
            3 => "current discovery subsystem",
            _ => "unknown",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fabrics_commands_put_their_fields_where_linux_does() {
        let c = connect(3, 128, 0, CATTR_DISABLE_SQ_FLOW);
        let raw = c.as_bytes();
        assert_eq!(raw[0], FABRICS_OPC);
        assert_eq!(raw[4], fctype::CONNECT);
        assert_eq!(u16::from_le_bytes([raw[42], raw[43]]), 3);
        assert_eq!(u16::from_le_bytes([raw[44], raw[45]]), 127);
        assert_eq!(raw[CATTR_OFFSET as usize], CATTR_DISABLE_SQ_FLOW);
        let c = connect(0, 32, 5000, 0);
        assert_eq!(
            u32::from_le_bytes([raw_at(&c, 48), raw_at(&c, 49), 0, 0]),
            5000
        );
        let g = property_get(0x1C, false);
        assert_eq!(g.as_bytes()[4], fctype::PROPERTY_GET);
        assert_eq!(g.as_bytes()[40], 0);
        assert_eq!(
            u32::from_le_bytes(g.as_bytes()[44..48].try_into().unwrap_or_default()),
            0x1C
        );
        assert_eq!(property_get(0, true).as_bytes()[40], 1);
        let s = property_set(0x14, 0x46_0001);
        assert_eq!(
            u64::from_le_bytes(s.as_bytes()[48..56].try_into().unwrap_or_default()),
            0x46_0001
        );
    }

    fn raw_at(sqe: &SubmissionEntry, at: usize) -> u8 {
        sqe.as_bytes()[at]
    }

    #[test]
    fn sgl_descriptors_round_trip_through_the_data_pointer() {
        let mut sqe = SubmissionEntry::new(0x01, 1);
        SglDescriptor::in_capsule(4096).apply(&mut sqe);
        assert_eq!(sqe.flags & 0xC0, PSDT_SGL);
        let d = SglDescriptor::of(&sqe);
        assert_eq!(
            (d.length.get(), d.sgl_type),
            (4096, SglDescriptor::IN_CAPSULE)
        );
        assert_eq!(sqe.as_bytes()[39], 0x01);
        SglDescriptor::transport(8192).apply(&mut sqe);
        assert_eq!(sqe.as_bytes()[39], 0x5A);
    }

    #[test]
    fn connect_data_carries_the_nqns() {
        let d = ConnectData::new([7; 16], DYNAMIC_CNTLID, "nqn.test:sub", "nqn.test:host");
        assert_eq!(d.subsystem(), "nqn.test:sub");
        assert_eq!(d.host(), "nqn.test:host");
        assert_eq!(d.as_bytes()[16..18], [0xFF, 0xFF]);
        let long = "n".repeat(400);
        let d = ConnectData::new([0; 16], 1, &long, "h");
        assert_eq!(d.subsystem().len(), NQN_MAX);
    }

    #[test]
    fn get_log_page_counts_dwords_zero_based() {
        let g = get_log_page(LID_DISCOVERY, 4096, 1024);
        assert_eq!(g.cdw10.get(), 0x70 | 1023 << 16);
        assert_eq!(g.cdw12.get(), 1024);
    }
}
