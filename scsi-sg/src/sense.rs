//! Sense data (SPC-4, "Sense data"): fixed (0x70/0x71) and descriptor
//! (0x72/0x73) formats, sense keys, and additional sense code names.
//!
//! Sense bytes come from the device and are untrusted: the parser honours
//! the ADDITIONAL SENSE LENGTH only as far as the bytes actually received,
//! never indexes blindly, and reports fields it could not see as absent.

use std::fmt;

use crate::ParseError;

/// Response code: fixed format, current error.
pub const RESPONSE_FIXED_CURRENT: u8 = 0x70;
/// Response code: fixed format, deferred error.
pub const RESPONSE_FIXED_DEFERRED: u8 = 0x71;
/// Response code: descriptor format, current error.
pub const RESPONSE_DESCRIPTOR_CURRENT: u8 = 0x72;
/// Response code: descriptor format, deferred error.
pub const RESPONSE_DESCRIPTOR_DEFERRED: u8 = 0x73;

/// Descriptor type: information.
pub const DESC_INFORMATION: u8 = 0x00;
/// Descriptor type: command-specific information.
pub const DESC_COMMAND_SPECIFIC: u8 = 0x01;
/// Descriptor type: sense-key specific.
pub const DESC_SENSE_KEY_SPECIFIC: u8 = 0x02;
/// Descriptor type: field replaceable unit.
pub const DESC_FRU: u8 = 0x03;
/// Descriptor type: stream commands (FILEMARK, EOM, ILI).
pub const DESC_STREAM_COMMANDS: u8 = 0x04;
/// Descriptor type: block commands (ILI).
pub const DESC_BLOCK_COMMANDS: u8 = 0x05;

/// The SENSE KEY field: the broad class of what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    /// 0x0: nothing to report (or only flags such as FILEMARK/ILI).
    NoSense = 0x0,
    /// 0x1: the command completed after recovery.
    RecoveredError = 0x1,
    /// 0x2: the logical unit is not accessible.
    NotReady = 0x2,
    /// 0x3: unrecovered error probably caused by a medium flaw.
    MediumError = 0x3,
    /// 0x4: non-recoverable hardware failure.
    HardwareError = 0x4,
    /// 0x5: bad CDB or parameter data; nothing was done.
    IllegalRequest = 0x5,
    /// 0x6: reset, changed parameters, changed capacity, ...
    UnitAttention = 0x6,
    /// 0x7: the operation is blocked by write/read protection.
    DataProtect = 0x7,
    /// 0x8: blank or formatted-but-unwritten medium.
    BlankCheck = 0x8,
    /// 0x9: vendor specific.
    VendorSpecific = 0x9,
    /// 0xA: EXTENDED COPY or another copy operation was aborted.
    CopyAborted = 0xa,
    /// 0xB: the device server aborted the command.
    AbortedCommand = 0xb,
    /// 0xC: reserved (was EQUAL).
    Reserved = 0xc,
    /// 0xD: a buffered device reached end of partition.
    VolumeOverflow = 0xd,
    /// 0xE: source and medium data did not match (VERIFY, COMPARE AND WRITE).
    Miscompare = 0xe,
    /// 0xF: the command completed; sense data carries completion details.
    Completed = 0xf,
}

impl SenseKey {
    /// The sense key in the low nibble of `b`.
    pub const fn from_nibble(b: u8) -> Self {
        match b & 0x0f {
            0x0 => SenseKey::NoSense,
            0x1 => SenseKey::RecoveredError,
            0x2 => SenseKey::NotReady,
            0x3 => SenseKey::MediumError,
            0x4 => SenseKey::HardwareError,
            0x5 => SenseKey::IllegalRequest,
            0x6 => SenseKey::UnitAttention,
            0x7 => SenseKey::DataProtect,
            0x8 => SenseKey::BlankCheck,
            0x9 => SenseKey::VendorSpecific,
            0xa => SenseKey::CopyAborted,
            0xb => SenseKey::AbortedCommand,
            0xc => SenseKey::Reserved,
            0xd => SenseKey::VolumeOverflow,
            0xe => SenseKey::Miscompare,
            _ => SenseKey::Completed,
        }
    }

    /// Name as SPC spells it, e.g. "ILLEGAL REQUEST".
    pub const fn name(self) -> &'static str {
        match self {
            SenseKey::NoSense => "NO SENSE",
            SenseKey::RecoveredError => "RECOVERED ERROR",
            SenseKey::NotReady => "NOT READY",
            SenseKey::MediumError => "MEDIUM ERROR",
            SenseKey::HardwareError => "HARDWARE ERROR",
            SenseKey::IllegalRequest => "ILLEGAL REQUEST",
            SenseKey::UnitAttention => "UNIT ATTENTION",
            SenseKey::DataProtect => "DATA PROTECT",
            SenseKey::BlankCheck => "BLANK CHECK",
            SenseKey::VendorSpecific => "VENDOR SPECIFIC",
            SenseKey::CopyAborted => "COPY ABORTED",
            SenseKey::AbortedCommand => "ABORTED COMMAND",
            SenseKey::Reserved => "RESERVED",
            SenseKey::VolumeOverflow => "VOLUME OVERFLOW",
            SenseKey::Miscompare => "MISCOMPARE",
            SenseKey::Completed => "COMPLETED",
        }
    }
}

impl fmt::Display for SenseKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of the two sense data layouts the device used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseFormat {
    /// Response code 0x70/0x71.
    Fixed,
    /// Response code 0x72/0x73.
    Descriptor,
}

/// Parsed sense data. Small and `Copy` so it can travel inside errors; the
/// raw bytes stay with [`crate::CommandOutcome`] for callers (EXTENDED COPY,
/// ROD tokens) that need descriptors this type does not model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sense {
    /// RESPONSE CODE (0x70..=0x73).
    pub response_code: u8,
    /// Fixed or descriptor format.
    pub format: SenseFormat,
    /// A deferred error (0x71/0x73): it belongs to an earlier command.
    pub deferred: bool,
    /// SENSE KEY.
    pub key: SenseKey,
    /// ADDITIONAL SENSE CODE (0 if the device sent too few bytes).
    pub asc: u8,
    /// ADDITIONAL SENSE CODE QUALIFIER (0 if the device sent too few bytes).
    pub ascq: u8,
    /// INFORMATION field, when the device marked it valid (fixed: VALID bit;
    /// descriptor: information descriptor with VALID set). For media errors
    /// this is usually the failing LBA.
    pub information: Option<u64>,
    /// COMMAND-SPECIFIC INFORMATION, when present.
    pub command_specific: Option<u64>,
    /// SENSE KEY SPECIFIC bytes (3), when SKSV is set: field pointer for
    /// ILLEGAL REQUEST, progress indication for NOT READY, segment pointer
    /// for COPY ABORTED, ...
    pub sense_key_specific: Option<[u8; 3]>,
    /// FIELD REPLACEABLE UNIT CODE (0: none).
    pub fru: u8,
    /// FILEMARK flag.
    pub filemark: bool,
    /// EOM flag.
    pub eom: bool,
    /// ILI (incorrect length indicator) flag.
    pub ili: bool,
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

impl Sense {
    /// Parse sense bytes as returned by the device (only the bytes actually
    /// written: `sb_len_wr`).
    ///
    /// Errors: empty input, or a response code other than 0x70..=0x73
    /// (including vendor-specific 0x7F). Like sg3_utils, truncated sense is
    /// accepted and fields beyond the received bytes read as absent/zero.
    pub fn parse(bytes: &[u8]) -> Result<Sense, ParseError> {
        let first = *bytes.first().ok_or(ParseError::Truncated {
            what: "sense data",
            needed: 1,
            available: 0,
        })?;
        let response_code = first & 0x7f;
        match response_code {
            RESPONSE_FIXED_CURRENT | RESPONSE_FIXED_DEFERRED => Ok(Self::parse_fixed(bytes)),
            RESPONSE_DESCRIPTOR_CURRENT | RESPONSE_DESCRIPTOR_DEFERRED => {
                Ok(Self::parse_descriptor(bytes))
            }
            _ => Err(ParseError::UnsupportedSenseFormat { response_code }),
        }
    }

    /// Limit `bytes` to 8 + ADDITIONAL SENSE LENGTH when byte 7 was received.
    fn effective(bytes: &[u8]) -> &[u8] {
        match bytes.get(7) {
            Some(&add_len) => {
                let len = bytes.len().min(8 + usize::from(add_len));
                bytes.get(..len).unwrap_or(bytes)
            }
            None => bytes,
        }
    }

    fn parse_fixed(bytes: &[u8]) -> Sense {
        let b = Self::effective(bytes);
        let b0 = byte(b, 0);
        let b2 = byte(b, 2);
        let information = if b0 & 0x80 != 0 {
            be_u32(b, 3).map(u64::from)
        } else {
            None
        };
        let sense_key_specific = match b.get(15..18) {
            Some(&[s0, s1, s2]) if s0 & 0x80 != 0 => Some([s0, s1, s2]),
            _ => None,
        };
        Sense {
            response_code: b0 & 0x7f,
            format: SenseFormat::Fixed,
            deferred: b0 & 0x7f == RESPONSE_FIXED_DEFERRED,
            key: SenseKey::from_nibble(b2),
            asc: byte(b, 12),
            ascq: byte(b, 13),
            information,
            command_specific: be_u32(b, 8).map(u64::from),
            sense_key_specific,
            fru: byte(b, 14),
            filemark: b2 & 0x80 != 0,
            eom: b2 & 0x40 != 0,
            ili: b2 & 0x20 != 0,
        }
    }

    fn parse_descriptor(bytes: &[u8]) -> Sense {
        let b = Self::effective(bytes);
        let b0 = byte(b, 0);
        let mut sense = Sense {
            response_code: b0 & 0x7f,
            format: SenseFormat::Descriptor,
            deferred: b0 & 0x7f == RESPONSE_DESCRIPTOR_DEFERRED,
            key: SenseKey::from_nibble(byte(b, 1)),
            asc: byte(b, 2),
            ascq: byte(b, 3),
            information: None,
            command_specific: None,
            sense_key_specific: None,
            fru: 0,
            filemark: false,
            eom: false,
            ili: false,
        };
        for desc in descriptors(b) {
            let kind = byte(desc, 0);
            match kind {
                DESC_INFORMATION if byte(desc, 2) & 0x80 != 0 => {
                    sense.information = be_u64(desc, 4);
                }
                DESC_COMMAND_SPECIFIC => sense.command_specific = be_u64(desc, 4),
                DESC_SENSE_KEY_SPECIFIC => {
                    if let Some(&[s0, s1, s2]) = desc.get(4..7)
                        && s0 & 0x80 != 0
                    {
                        sense.sense_key_specific = Some([s0, s1, s2]);
                    }
                }
                DESC_FRU => sense.fru = byte(desc, 3),
                DESC_STREAM_COMMANDS => {
                    let f = byte(desc, 3);
                    sense.filemark = f & 0x80 != 0;
                    sense.eom = f & 0x40 != 0;
                    sense.ili = f & 0x20 != 0;
                }
                DESC_BLOCK_COMMANDS => sense.ili = byte(desc, 3) & 0x20 != 0,
                _ => {}
            }
        }
        sense
    }

    /// Fixed-format sense (18 bytes) carrying this sense's key, ASC, ASCQ,
    /// information (if it fits in 32 bits), command-specific information,
    /// sense-key-specific bytes, FRU and flags. What a target (such as the
    /// in-process emulator) returns with CHECK CONDITION.
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut b = [0u8; 18];
        b[0] = if self.deferred {
            RESPONSE_FIXED_DEFERRED
        } else {
            RESPONSE_FIXED_CURRENT
        };
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80;
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = (self.key as u8)
            | if self.filemark { 0x80 } else { 0 }
            | if self.eom { 0x40 } else { 0 }
            | if self.ili { 0x20 } else { 0 };
        b[7] = 10;
        if let Some(cs) = self.command_specific.and_then(|c| u32::try_from(c).ok()) {
            b[8..12].copy_from_slice(&cs.to_be_bytes());
        }
        b[12] = self.asc;
        b[13] = self.ascq;
        b[14] = self.fru;
        if let Some(sks) = self.sense_key_specific {
            b[15..18].copy_from_slice(&sks);
            b[15] |= 0x80;
        }
        b
    }

    /// A current, fixed-format sense with just key, ASC and ASCQ.
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Sense {
        Sense {
            response_code: RESPONSE_FIXED_CURRENT,
            format: SenseFormat::Fixed,
            deferred: false,
            key,
            asc,
            ascq,
            information: None,
            command_specific: None,
            sense_key_specific: None,
            fru: 0,
            filemark: false,
            eom: false,
            ili: false,
        }
    }

    /// Name of the ASC/ASCQ pair, if known (see [`asc_ascq_name`]).
    pub fn asc_name(&self) -> Option<&'static str> {
        asc_ascq_name(self.asc, self.ascq)
    }

    /// UNIT ATTENTION: the device reports an event (reset, capacity change,
    /// ...) and did not execute the command; retrying is usually right.
    pub fn is_unit_attention(&self) -> bool {
        self.key == SenseKey::UnitAttention
    }

    /// For ILLEGAL REQUEST with SKSV: (field in CDB rather than parameter
    /// data, byte offset, bit pointer if valid).
    pub fn field_pointer(&self) -> Option<FieldPointer> {
        if self.key != SenseKey::IllegalRequest {
            return None;
        }
        let [s0, s1, s2] = self.sense_key_specific?;
        Some(FieldPointer {
            in_cdb: s0 & 0x40 != 0,
            byte: u16::from_be_bytes([s1, s2]),
            bit: if s0 & 0x08 != 0 {
                Some(s0 & 0x07)
            } else {
                None
            },
        })
    }
}

/// Where the error in an ILLEGAL REQUEST is (sense-key specific bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FieldPointer {
    /// C/D: the field is in the CDB (true) or in the parameter data (false).
    pub in_cdb: bool,
    /// Byte offset of the field.
    pub byte: u16,
    /// Bit within the byte, when BPV is set.
    pub bit: Option<u8>,
}

/// Iterate over the sense data descriptors of descriptor-format sense,
/// stopping at the first one that would run past the received bytes.
pub fn descriptors(sense: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = sense.get(8..).unwrap_or(&[]);
    std::iter::from_fn(move || {
        let len = usize::from(*rest.get(1)?) + 2;
        let desc = rest.get(..len)?;
        rest = rest.get(len..).unwrap_or(&[]);
        Some(desc)
    })
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.key)?;
        match self.asc_name() {
            Some(name) => write!(f, ": {name}")?,
            None => write!(f, ": ASC/ASCQ")?,
        }
        write!(f, " ({:#04x}/{:#04x})", self.asc, self.ascq)?;
        if let Some(info) = self.information {
            write!(f, ", information {info:#x}")?;
        }
        if self.deferred {
            write!(f, " [deferred]")?;
        }
        Ok(())
    }
}

/// ASC/ASCQ names from SPC (the T10 "ASC and ASCQ assignments" table),
/// covering what disks, LIO and copy managers report in practice.
const ASC_TABLE: &[(u8, u8, &str)] = &[
    (0x00, 0x00, "NO ADDITIONAL SENSE INFORMATION"),
    (0x00, 0x06, "I/O PROCESS TERMINATED"),
    (0x00, 0x16, "OPERATION IN PROGRESS"),
    (0x00, 0x17, "CLEANING REQUESTED"),
    (0x00, 0x1d, "ATA PASS THROUGH INFORMATION AVAILABLE"),
    (0x02, 0x00, "NO SEEK COMPLETE"),
    (0x03, 0x00, "PERIPHERAL DEVICE WRITE FAULT"),
    (0x04, 0x00, "LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE"),
    (0x04, 0x01, "LOGICAL UNIT IS IN PROCESS OF BECOMING READY"),
    (
        0x04,
        0x02,
        "LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED",
    ),
    (
        0x04,
        0x03,
        "LOGICAL UNIT NOT READY, MANUAL INTERVENTION REQUIRED",
    ),
    (0x04, 0x04, "LOGICAL UNIT NOT READY, FORMAT IN PROGRESS"),
    (0x04, 0x07, "LOGICAL UNIT NOT READY, OPERATION IN PROGRESS"),
    (0x04, 0x09, "LOGICAL UNIT NOT READY, SELF-TEST IN PROGRESS"),
    (
        0x04,
        0x0a,
        "LOGICAL UNIT NOT ACCESSIBLE, ASYMMETRIC ACCESS STATE TRANSITION",
    ),
    (
        0x04,
        0x0b,
        "LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN STANDBY STATE",
    ),
    (
        0x04,
        0x0c,
        "LOGICAL UNIT NOT ACCESSIBLE, TARGET PORT IN UNAVAILABLE STATE",
    ),
    (
        0x04,
        0x11,
        "LOGICAL UNIT NOT READY, NOTIFY (ENABLE SPINUP) REQUIRED",
    ),
    (0x04, 0x12, "LOGICAL UNIT NOT READY, OFFLINE"),
    (
        0x04,
        0x14,
        "LOGICAL UNIT NOT READY, SPACE ALLOCATION IN PROGRESS",
    ),
    (0x04, 0x1b, "LOGICAL UNIT NOT READY, SANITIZE IN PROGRESS"),
    (0x05, 0x00, "LOGICAL UNIT DOES NOT RESPOND TO SELECTION"),
    (0x08, 0x00, "LOGICAL UNIT COMMUNICATION FAILURE"),
    (0x08, 0x01, "LOGICAL UNIT COMMUNICATION TIME-OUT"),
    (0x08, 0x02, "LOGICAL UNIT COMMUNICATION PARITY ERROR"),
    (0x08, 0x04, "UNREACHABLE COPY TARGET"),
    (0x0b, 0x00, "WARNING"),
    (0x0b, 0x01, "WARNING - SPECIFIED TEMPERATURE EXCEEDED"),
    (0x0c, 0x00, "WRITE ERROR"),
    (0x0c, 0x01, "WRITE ERROR - RECOVERED WITH AUTO REALLOCATION"),
    (0x0c, 0x02, "WRITE ERROR - AUTO REALLOCATION FAILED"),
    (0x0c, 0x03, "WRITE ERROR - RECOMMEND REASSIGNMENT"),
    (
        0x0d,
        0x00,
        "ERROR DETECTED BY THIRD PARTY TEMPORARY INITIATOR",
    ),
    (0x0d, 0x01, "THIRD PARTY DEVICE FAILURE"),
    (0x0d, 0x02, "COPY TARGET DEVICE NOT REACHABLE"),
    (0x0d, 0x03, "INCORRECT COPY TARGET DEVICE TYPE"),
    (0x0d, 0x04, "COPY TARGET DEVICE DATA UNDERRUN"),
    (0x0d, 0x05, "COPY TARGET DEVICE DATA OVERRUN"),
    (0x0e, 0x00, "INVALID INFORMATION UNIT"),
    (0x0e, 0x01, "INFORMATION UNIT TOO SHORT"),
    (0x0e, 0x02, "INFORMATION UNIT TOO LONG"),
    (0x0e, 0x03, "INVALID FIELD IN COMMAND INFORMATION UNIT"),
    (0x10, 0x00, "ID CRC OR ECC ERROR"),
    (0x10, 0x01, "LOGICAL BLOCK GUARD CHECK FAILED"),
    (0x10, 0x02, "LOGICAL BLOCK APPLICATION TAG CHECK FAILED"),
    (0x10, 0x03, "LOGICAL BLOCK REFERENCE TAG CHECK FAILED"),
    (0x11, 0x00, "UNRECOVERED READ ERROR"),
    (0x11, 0x01, "READ RETRIES EXHAUSTED"),
    (0x11, 0x02, "ERROR TOO LONG TO CORRECT"),
    (
        0x11,
        0x04,
        "UNRECOVERED READ ERROR - AUTO REALLOCATE FAILED",
    ),
    (
        0x11,
        0x0b,
        "UNRECOVERED READ ERROR - RECOMMEND REASSIGNMENT",
    ),
    (
        0x11,
        0x0c,
        "UNRECOVERED READ ERROR - RECOMMEND REWRITE THE DATA",
    ),
    (0x14, 0x01, "RECORD NOT FOUND"),
    (0x15, 0x00, "RANDOM POSITIONING ERROR"),
    (0x1a, 0x00, "PARAMETER LIST LENGTH ERROR"),
    (0x1d, 0x00, "MISCOMPARE DURING VERIFY OPERATION"),
    (0x1d, 0x01, "MISCOMPARE VERIFY OF UNMAPPED LBA"),
    (0x20, 0x00, "INVALID COMMAND OPERATION CODE"),
    (0x20, 0x01, "ACCESS DENIED - INITIATOR PENDING-ENROLLED"),
    (0x20, 0x02, "ACCESS DENIED - NO ACCESS RIGHTS"),
    (0x21, 0x00, "LOGICAL BLOCK ADDRESS OUT OF RANGE"),
    (0x21, 0x01, "INVALID ELEMENT ADDRESS"),
    (0x21, 0x04, "UNALIGNED WRITE COMMAND"),
    (0x21, 0x05, "WRITE BOUNDARY VIOLATION"),
    (0x22, 0x00, "ILLEGAL FUNCTION (USE 20 00, 24 00, OR 26 00)"),
    (0x23, 0x00, "INVALID TOKEN OPERATION, CAUSE NOT REPORTABLE"),
    (
        0x23,
        0x01,
        "INVALID TOKEN OPERATION, UNSUPPORTED TOKEN TYPE",
    ),
    (
        0x23,
        0x02,
        "INVALID TOKEN OPERATION, REMOTE TOKEN USAGE NOT SUPPORTED",
    ),
    (
        0x23,
        0x03,
        "INVALID TOKEN OPERATION, REMOTE ROD TOKEN CREATION NOT SUPPORTED",
    ),
    (0x23, 0x04, "INVALID TOKEN OPERATION, TOKEN UNKNOWN"),
    (0x23, 0x05, "INVALID TOKEN OPERATION, TOKEN CORRUPT"),
    (0x23, 0x06, "INVALID TOKEN OPERATION, TOKEN REVOKED"),
    (0x23, 0x07, "INVALID TOKEN OPERATION, TOKEN EXPIRED"),
    (0x23, 0x08, "INVALID TOKEN OPERATION, TOKEN CANCELLED"),
    (0x23, 0x09, "INVALID TOKEN OPERATION, TOKEN DELETED"),
    (0x23, 0x0a, "INVALID TOKEN OPERATION, INVALID TOKEN LENGTH"),
    (0x24, 0x00, "INVALID FIELD IN CDB"),
    (0x24, 0x01, "CDB DECRYPTION ERROR"),
    (0x24, 0x08, "INVALID XCDB"),
    (0x25, 0x00, "LOGICAL UNIT NOT SUPPORTED"),
    (0x26, 0x00, "INVALID FIELD IN PARAMETER LIST"),
    (0x26, 0x01, "PARAMETER NOT SUPPORTED"),
    (0x26, 0x02, "PARAMETER VALUE INVALID"),
    (0x26, 0x03, "THRESHOLD PARAMETERS NOT SUPPORTED"),
    (0x26, 0x04, "INVALID RELEASE OF PERSISTENT RESERVATION"),
    (0x26, 0x05, "DATA DECRYPTION ERROR"),
    (0x26, 0x06, "TOO MANY TARGET DESCRIPTORS"),
    (0x26, 0x07, "UNSUPPORTED TARGET DESCRIPTOR TYPE CODE"),
    (0x26, 0x08, "TOO MANY SEGMENT DESCRIPTORS"),
    (0x26, 0x09, "UNSUPPORTED SEGMENT DESCRIPTOR TYPE CODE"),
    (0x26, 0x0a, "UNEXPECTED INEXACT SEGMENT"),
    (0x26, 0x0b, "INLINE DATA LENGTH EXCEEDED"),
    (
        0x26,
        0x0c,
        "INVALID OPERATION FOR COPY SOURCE OR DESTINATION",
    ),
    (0x26, 0x0d, "COPY SEGMENT GRANULARITY VIOLATION"),
    (0x26, 0x0e, "INVALID PARAMETER WHILE PORT IS ENABLED"),
    (0x26, 0x15, "COPY SOURCE OR COPY DESTINATION NOT AUTHORIZED"),
    (0x26, 0x16, "FAST COPY NOT POSSIBLE"),
    (0x27, 0x00, "WRITE PROTECTED"),
    (0x27, 0x01, "HARDWARE WRITE PROTECTED"),
    (0x27, 0x02, "LOGICAL UNIT SOFTWARE WRITE PROTECTED"),
    (0x27, 0x07, "SPACE ALLOCATION FAILED WRITE PROTECT"),
    (
        0x28,
        0x00,
        "NOT READY TO READY CHANGE, MEDIUM MAY HAVE CHANGED",
    ),
    (0x29, 0x00, "POWER ON, RESET, OR BUS DEVICE RESET OCCURRED"),
    (0x29, 0x01, "POWER ON OCCURRED"),
    (0x29, 0x02, "SCSI BUS RESET OCCURRED"),
    (0x29, 0x03, "BUS DEVICE RESET FUNCTION OCCURRED"),
    (0x29, 0x04, "DEVICE INTERNAL RESET"),
    (0x29, 0x05, "TRANSCEIVER MODE CHANGED TO SINGLE-ENDED"),
    (0x29, 0x06, "TRANSCEIVER MODE CHANGED TO LVD"),
    (0x29, 0x07, "I_T NEXUS LOSS OCCURRED"),
    (0x2a, 0x00, "PARAMETERS CHANGED"),
    (0x2a, 0x01, "MODE PARAMETERS CHANGED"),
    (0x2a, 0x02, "LOG PARAMETERS CHANGED"),
    (0x2a, 0x03, "RESERVATIONS PREEMPTED"),
    (0x2a, 0x04, "RESERVATIONS RELEASED"),
    (0x2a, 0x05, "REGISTRATIONS PREEMPTED"),
    (0x2a, 0x06, "ASYMMETRIC ACCESS STATE CHANGED"),
    (
        0x2a,
        0x07,
        "IMPLICIT ASYMMETRIC ACCESS STATE TRANSITION FAILED",
    ),
    (0x2a, 0x08, "PRIORITY CHANGED"),
    (0x2a, 0x09, "CAPACITY DATA HAS CHANGED"),
    (0x2a, 0x10, "TIMESTAMP CHANGED"),
    (0x2c, 0x00, "COMMAND SEQUENCE ERROR"),
    (0x2c, 0x07, "PREVIOUS BUSY STATUS"),
    (0x2c, 0x08, "PREVIOUS TASK SET FULL STATUS"),
    (0x2c, 0x09, "PREVIOUS RESERVATION CONFLICT STATUS"),
    (0x2c, 0x0b, "NOT RESERVED"),
    (0x2e, 0x01, "COMMAND TIMEOUT BEFORE PROCESSING"),
    (0x2e, 0x02, "COMMAND TIMEOUT DURING PROCESSING"),
    (0x2f, 0x00, "COMMANDS CLEARED BY ANOTHER INITIATOR"),
    (0x2f, 0x01, "COMMANDS CLEARED BY POWER LOSS NOTIFICATION"),
    (0x2f, 0x02, "COMMANDS CLEARED BY DEVICE SERVER"),
    (0x30, 0x00, "INCOMPATIBLE MEDIUM INSTALLED"),
    (0x31, 0x00, "MEDIUM FORMAT CORRUPTED"),
    (0x31, 0x01, "FORMAT COMMAND FAILED"),
    (0x32, 0x00, "NO DEFECT SPARE LOCATION AVAILABLE"),
    (0x37, 0x00, "ROUNDED PARAMETER"),
    (0x38, 0x07, "THIN PROVISIONING SOFT THRESHOLD REACHED"),
    (0x39, 0x00, "SAVING PARAMETERS NOT SUPPORTED"),
    (0x3a, 0x00, "MEDIUM NOT PRESENT"),
    (0x3a, 0x01, "MEDIUM NOT PRESENT - TRAY CLOSED"),
    (0x3a, 0x02, "MEDIUM NOT PRESENT - TRAY OPEN"),
    (0x3e, 0x00, "LOGICAL UNIT HAS NOT SELF-CONFIGURED YET"),
    (0x3e, 0x01, "LOGICAL UNIT FAILURE"),
    (0x3e, 0x02, "TIMEOUT ON LOGICAL UNIT"),
    (0x3e, 0x03, "LOGICAL UNIT FAILED SELF-TEST"),
    (0x3f, 0x00, "TARGET OPERATING CONDITIONS HAVE CHANGED"),
    (0x3f, 0x01, "MICROCODE HAS BEEN CHANGED"),
    (0x3f, 0x02, "CHANGED OPERATING DEFINITION"),
    (0x3f, 0x03, "INQUIRY DATA HAS CHANGED"),
    (0x3f, 0x05, "DEVICE IDENTIFIER CHANGED"),
    (0x3f, 0x0e, "REPORTED LUNS DATA HAS CHANGED"),
    (0x43, 0x00, "MESSAGE ERROR"),
    (0x44, 0x00, "INTERNAL TARGET FAILURE"),
    (0x44, 0x01, "PERSISTENT RESERVATION INFORMATION LOST"),
    (0x45, 0x00, "SELECT OR RESELECT FAILURE"),
    (0x47, 0x00, "SCSI PARITY ERROR"),
    (0x47, 0x01, "DATA PHASE CRC ERROR DETECTED"),
    (0x48, 0x00, "INITIATOR DETECTED ERROR MESSAGE RECEIVED"),
    (0x49, 0x00, "INVALID MESSAGE ERROR"),
    (0x4a, 0x00, "COMMAND PHASE ERROR"),
    (0x4b, 0x00, "DATA PHASE ERROR"),
    (0x4c, 0x00, "LOGICAL UNIT FAILED SELF-CONFIGURATION"),
    (0x4e, 0x00, "OVERLAPPED COMMANDS ATTEMPTED"),
    (0x53, 0x02, "MEDIUM REMOVAL PREVENTED"),
    (0x55, 0x00, "SYSTEM RESOURCE FAILURE"),
    (0x55, 0x01, "SYSTEM BUFFER FULL"),
    (0x55, 0x02, "INSUFFICIENT RESERVATION RESOURCES"),
    (0x55, 0x03, "INSUFFICIENT RESOURCES"),
    (0x55, 0x04, "INSUFFICIENT REGISTRATION RESOURCES"),
    (0x55, 0x05, "INSUFFICIENT ACCESS CONTROL RESOURCES"),
    (0x55, 0x06, "AUXILIARY MEMORY OUT OF SPACE"),
    (0x55, 0x0b, "INSUFFICIENT POWER FOR OPERATION"),
    (0x55, 0x0c, "INSUFFICIENT RESOURCES TO CREATE ROD"),
    (0x55, 0x0d, "INSUFFICIENT RESOURCES TO CREATE ROD TOKEN"),
    (0x5d, 0x00, "FAILURE PREDICTION THRESHOLD EXCEEDED"),
    (0x5d, 0xff, "FAILURE PREDICTION THRESHOLD EXCEEDED (FALSE)"),
    (0x5e, 0x00, "LOW POWER CONDITION ON"),
    (0x67, 0x0a, "SET TARGET PORT GROUPS COMMAND FAILED"),
];

/// Name of an ASC/ASCQ pair, if this crate knows it. Families whose ASCQ is
/// a parameter (0x40/0x80..=0xFF diagnostic failure on component NN, 0x4D
/// tagged overlapped commands) are matched by ASC alone.
pub fn asc_ascq_name(asc: u8, ascq: u8) -> Option<&'static str> {
    if let Some(&(_, _, name)) = ASC_TABLE.iter().find(|&&(a, q, _)| a == asc && q == ascq) {
        return Some(name);
    }
    match (asc, ascq) {
        (0x40, 0x80..=0xff) => Some("DIAGNOSTIC FAILURE ON COMPONENT NN (80H-FFH)"),
        (0x4d, _) => Some("TAGGED OVERLAPPED COMMANDS (NN = TASK TAG)"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_invalid_field_in_cdb_with_field_pointer() {
        // ILLEGAL REQUEST, INVALID FIELD IN CDB, SKSV|C/D, field byte 2.
        let raw = [
            0x70, 0x00, 0x05, 0x00, 0x00, 0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x24, 0x00,
            0x00, 0xc0, 0x00, 0x02,
        ];
        let s = Sense::parse(&raw).unwrap();
        assert_eq!(s.format, SenseFormat::Fixed);
        assert!(!s.deferred);
        assert_eq!(s.key, SenseKey::IllegalRequest);
        assert_eq!((s.asc, s.ascq), (0x24, 0x00));
        assert_eq!(s.asc_name(), Some("INVALID FIELD IN CDB"));
        assert_eq!(s.information, None);
        assert_eq!(
            s.field_pointer(),
            Some(FieldPointer {
                in_cdb: true,
                byte: 2,
                bit: None
            })
        );
        assert_eq!(s.to_fixed(), raw);
        assert_eq!(
            s.to_string(),
            "ILLEGAL REQUEST: INVALID FIELD IN CDB (0x24/0x00)"
        );
    }

    #[test]
    fn fixed_medium_error_with_information() {
        let raw = [
            0xf0, 0x00, 0x03, 0x00, 0x01, 0x23, 0x45, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x11, 0x00,
            0x00, 0x00, 0x00, 0x00,
        ];
        let s = Sense::parse(&raw).unwrap();
        assert_eq!(s.key, SenseKey::MediumError);
        assert_eq!(s.information, Some(0x12345));
        assert_eq!(s.asc_name(), Some("UNRECOVERED READ ERROR"));
        assert_eq!(s.to_fixed(), raw);
    }

    #[test]
    fn fixed_honours_additional_length() {
        // ADDITIONAL SENSE LENGTH 4: ASC/ASCQ at 12/13 are not part of it.
        let raw = [
            0x70, 0x00, 0x06, 0, 0, 0, 0, 0x04, 0, 0, 0, 0, 0x29, 0x00, 0, 0, 0, 0,
        ];
        let s = Sense::parse(&raw).unwrap();
        assert_eq!(s.key, SenseKey::UnitAttention);
        assert_eq!((s.asc, s.ascq), (0, 0));
    }

    #[test]
    fn fixed_truncated_is_lenient() {
        let s = Sense::parse(&[0x70, 0x00, 0x02]).unwrap();
        assert_eq!(s.key, SenseKey::NotReady);
        assert_eq!((s.asc, s.ascq), (0, 0));
        assert_eq!(s.command_specific, None);
    }

    #[test]
    fn descriptor_invalid_opcode() {
        let s = Sense::parse(&[0x72, 0x05, 0x20, 0x00, 0, 0, 0, 0]).unwrap();
        assert_eq!(s.format, SenseFormat::Descriptor);
        assert_eq!(s.key, SenseKey::IllegalRequest);
        assert_eq!(s.asc_name(), Some("INVALID COMMAND OPERATION CODE"));
    }

    #[test]
    fn descriptor_with_information_and_sks() {
        let raw = [
            0x73, 0x03, 0x11, 0x00, 0, 0, 0, 0x14, // header, 20 bytes follow
            0x00, 0x0a, 0x80, 0x00, 0, 0, 0, 0, 0x00, 0x12, 0x34, 0x56, // information
            0x02, 0x06, 0, 0, 0x80, 0x00, 0x10, 0, // sense key specific
        ];
        let s = Sense::parse(&raw).unwrap();
        assert!(s.deferred);
        assert_eq!(s.key, SenseKey::MediumError);
        assert_eq!(s.information, Some(0x12_3456));
        assert_eq!(s.sense_key_specific, Some([0x80, 0x00, 0x10]));
        assert_eq!(descriptors(&raw).count(), 2);
    }

    #[test]
    fn descriptor_truncated_descriptor_ignored() {
        // Information descriptor claims 10 bytes but only 4 arrived.
        let raw = [
            0x72, 0x03, 0x11, 0x00, 0, 0, 0, 0x0c, 0x00, 0x0a, 0x80, 0x00,
        ];
        let s = Sense::parse(&raw).unwrap();
        assert_eq!(s.information, None);
    }

    #[test]
    fn bad_response_codes() {
        assert!(matches!(
            Sense::parse(&[]),
            Err(ParseError::Truncated { .. })
        ));
        assert!(matches!(
            Sense::parse(&[0x7f, 0, 0]),
            Err(ParseError::UnsupportedSenseFormat {
                response_code: 0x7f
            })
        ));
        assert!(Sense::parse(&[0x00]).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(
            asc_ascq_name(0x21, 0x00),
            Some("LOGICAL BLOCK ADDRESS OUT OF RANGE")
        );
        assert_eq!(asc_ascq_name(0x2a, 0x09), Some("CAPACITY DATA HAS CHANGED"));
        assert_eq!(asc_ascq_name(0x3a, 0x00), Some("MEDIUM NOT PRESENT"));
        assert_eq!(asc_ascq_name(0x0c, 0x00), Some("WRITE ERROR"));
        assert!(asc_ascq_name(0x29, 0x01).is_some());
        assert!(asc_ascq_name(0x0d, 0x02).is_some());
        assert!(asc_ascq_name(0x26, 0x08).is_some());
        assert!(asc_ascq_name(0x55, 0x03).is_some());
        assert!(asc_ascq_name(0x4d, 0x17).is_some());
        assert_eq!(asc_ascq_name(0x7e, 0x7e), None);
        for (i, &(a, q, _)) in ASC_TABLE.iter().enumerate() {
            assert!(
                !ASC_TABLE[..i].iter().any(|&(a2, q2, _)| a2 == a && q2 == q),
                "duplicate {a:#x}/{q:#x}"
            );
        }
        assert_eq!(SenseKey::from_nibble(0xfa), SenseKey::CopyAborted);
        assert_eq!(SenseKey::CopyAborted.name(), "COPY ABORTED");
    }
}
