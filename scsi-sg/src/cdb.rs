//! Command descriptor blocks: opcode constants, names, and builders.
//!
//! Builders return fixed-size arrays with every reserved and CONTROL byte
//! zero; multi-byte fields are big-endian as SPC-4 requires.

use std::fmt;

/// TEST UNIT READY (SPC-4).
pub const TEST_UNIT_READY: u8 = 0x00;
/// REQUEST SENSE (SPC-4).
pub const REQUEST_SENSE: u8 = 0x03;
/// FORMAT UNIT (SBC-3).
pub const FORMAT_UNIT: u8 = 0x04;
/// READ(6) (SBC-3).
pub const READ_6: u8 = 0x08;
/// WRITE(6) (SBC-3).
pub const WRITE_6: u8 = 0x0a;
/// INQUIRY (SPC-4).
pub const INQUIRY: u8 = 0x12;
/// MODE SELECT(6) (SPC-4).
pub const MODE_SELECT_6: u8 = 0x15;
/// RESERVE(6) (obsolete).
pub const RESERVE_6: u8 = 0x16;
/// RELEASE(6) (obsolete).
pub const RELEASE_6: u8 = 0x17;
/// MODE SENSE(6) (SPC-4).
pub const MODE_SENSE_6: u8 = 0x1a;
/// START STOP UNIT (SBC-3).
pub const START_STOP_UNIT: u8 = 0x1b;
/// RECEIVE DIAGNOSTIC RESULTS (SPC-4).
pub const RECEIVE_DIAGNOSTIC_RESULTS: u8 = 0x1c;
/// SEND DIAGNOSTIC (SPC-4).
pub const SEND_DIAGNOSTIC: u8 = 0x1d;
/// PREVENT ALLOW MEDIUM REMOVAL (SPC-4).
pub const PREVENT_ALLOW_MEDIUM_REMOVAL: u8 = 0x1e;
/// READ CAPACITY(10) (SBC-3).
pub const READ_CAPACITY_10: u8 = 0x25;
/// READ(10) (SBC-3).
pub const READ_10: u8 = 0x28;
/// WRITE(10) (SBC-3).
pub const WRITE_10: u8 = 0x2a;
/// WRITE AND VERIFY(10) (SBC-3).
pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
/// VERIFY(10) (SBC-3).
pub const VERIFY_10: u8 = 0x2f;
/// PRE-FETCH(10) (SBC-3).
pub const PRE_FETCH_10: u8 = 0x34;
/// SYNCHRONIZE CACHE(10) (SBC-3).
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
/// READ DEFECT DATA(10) (SBC-3).
pub const READ_DEFECT_DATA_10: u8 = 0x37;
/// WRITE BUFFER (SPC-4).
pub const WRITE_BUFFER: u8 = 0x3b;
/// READ BUFFER (SPC-4).
pub const READ_BUFFER: u8 = 0x3c;
/// WRITE SAME(10) (SBC-3).
pub const WRITE_SAME_10: u8 = 0x41;
/// UNMAP (SBC-3).
pub const UNMAP: u8 = 0x42;
/// SANITIZE (SBC-3); service action in byte 1.
pub const SANITIZE: u8 = 0x48;
/// LOG SELECT (SPC-4).
pub const LOG_SELECT: u8 = 0x4c;
/// LOG SENSE (SPC-4).
pub const LOG_SENSE: u8 = 0x4d;
/// MODE SELECT(10) (SPC-4).
pub const MODE_SELECT_10: u8 = 0x55;
/// MODE SENSE(10) (SPC-4).
pub const MODE_SENSE_10: u8 = 0x5a;
/// PERSISTENT RESERVE IN (SPC-4); service action in byte 1.
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
/// PERSISTENT RESERVE OUT (SPC-4); service action in byte 1.
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// Variable-length CDB (SPC-4); service action in bytes 8..10.
pub const VARIABLE_LENGTH: u8 = 0x7f;
/// THIRD-PARTY COPY OUT (EXTENDED COPY, POPULATE TOKEN, WRITE USING TOKEN;
/// SPC-4); service action in byte 1.
pub const THIRD_PARTY_COPY_OUT: u8 = 0x83;
/// THIRD-PARTY COPY IN (RECEIVE COPY ..., RECEIVE ROD TOKEN INFORMATION;
/// SPC-4); service action in byte 1.
pub const THIRD_PARTY_COPY_IN: u8 = 0x84;
/// ATA PASS-THROUGH(16) (SAT).
pub const ATA_PASS_THROUGH_16: u8 = 0x85;
/// READ(16) (SBC-3).
pub const READ_16: u8 = 0x88;
/// COMPARE AND WRITE (SBC-3).
pub const COMPARE_AND_WRITE: u8 = 0x89;
/// WRITE(16) (SBC-3).
pub const WRITE_16: u8 = 0x8a;
/// ORWRITE(16) (SBC-3).
pub const ORWRITE_16: u8 = 0x8b;
/// READ ATTRIBUTE (SPC-4).
pub const READ_ATTRIBUTE: u8 = 0x8c;
/// WRITE ATTRIBUTE (SPC-4).
pub const WRITE_ATTRIBUTE: u8 = 0x8d;
/// WRITE AND VERIFY(16) (SBC-3).
pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
/// VERIFY(16) (SBC-3).
pub const VERIFY_16: u8 = 0x8f;
/// PRE-FETCH(16) (SBC-3).
pub const PRE_FETCH_16: u8 = 0x90;
/// SYNCHRONIZE CACHE(16) (SBC-3).
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
/// WRITE SAME(16) (SBC-3).
pub const WRITE_SAME_16: u8 = 0x93;
/// SERVICE ACTION IN(16) (READ CAPACITY(16), GET LBA STATUS, ...);
/// service action in byte 1.
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
/// SERVICE ACTION OUT(16); service action in byte 1.
pub const SERVICE_ACTION_OUT_16: u8 = 0x9f;
/// REPORT LUNS (SPC-4).
pub const REPORT_LUNS: u8 = 0xa0;
/// ATA PASS-THROUGH(12) (SAT).
pub const ATA_PASS_THROUGH_12: u8 = 0xa1;
/// SECURITY PROTOCOL IN (SPC-4).
pub const SECURITY_PROTOCOL_IN: u8 = 0xa2;
/// MAINTENANCE IN (REPORT TARGET PORT GROUPS, REPORT SUPPORTED OPERATION
/// CODES, ...); service action in byte 1.
pub const MAINTENANCE_IN: u8 = 0xa3;
/// MAINTENANCE OUT; service action in byte 1.
pub const MAINTENANCE_OUT: u8 = 0xa4;
/// READ(12) (SBC-3).
pub const READ_12: u8 = 0xa8;
/// WRITE(12) (SBC-3).
pub const WRITE_12: u8 = 0xaa;
/// SECURITY PROTOCOL OUT (SPC-4).
pub const SECURITY_PROTOCOL_OUT: u8 = 0xb5;

/// SERVICE ACTION IN(16) service action: READ CAPACITY(16).
pub const SAI_READ_CAPACITY_16: u8 = 0x10;
/// SERVICE ACTION IN(16) service action: GET LBA STATUS.
pub const SAI_GET_LBA_STATUS: u8 = 0x12;
/// SERVICE ACTION IN(16) service action: REPORT REFERRALS.
pub const SAI_REPORT_REFERRALS: u8 = 0x13;

/// THIRD-PARTY COPY OUT service action: EXTENDED COPY(LID1).
pub const TPC_OUT_EXTENDED_COPY_LID1: u8 = 0x00;
/// THIRD-PARTY COPY OUT service action: EXTENDED COPY(LID4).
pub const TPC_OUT_EXTENDED_COPY_LID4: u8 = 0x01;
/// THIRD-PARTY COPY OUT service action: POPULATE TOKEN.
pub const TPC_OUT_POPULATE_TOKEN: u8 = 0x10;
/// THIRD-PARTY COPY OUT service action: WRITE USING TOKEN.
pub const TPC_OUT_WRITE_USING_TOKEN: u8 = 0x11;
/// THIRD-PARTY COPY OUT service action: COPY OPERATION ABORT.
pub const TPC_OUT_COPY_OPERATION_ABORT: u8 = 0x1c;

/// THIRD-PARTY COPY IN service action: RECEIVE COPY STATUS(LID1).
pub const TPC_IN_RECEIVE_COPY_STATUS_LID1: u8 = 0x00;
/// THIRD-PARTY COPY IN service action: RECEIVE COPY DATA(LID1).
pub const TPC_IN_RECEIVE_COPY_DATA_LID1: u8 = 0x01;
/// THIRD-PARTY COPY IN service action: RECEIVE COPY OPERATING PARAMETERS.
pub const TPC_IN_RECEIVE_COPY_OPERATING_PARAMETERS: u8 = 0x03;
/// THIRD-PARTY COPY IN service action: RECEIVE COPY FAILURE DETAILS(LID1).
pub const TPC_IN_RECEIVE_COPY_FAILURE_DETAILS_LID1: u8 = 0x04;
/// THIRD-PARTY COPY IN service action: RECEIVE COPY STATUS(LID4).
pub const TPC_IN_RECEIVE_COPY_STATUS_LID4: u8 = 0x05;
/// THIRD-PARTY COPY IN service action: RECEIVE COPY DATA(LID4).
pub const TPC_IN_RECEIVE_COPY_DATA_LID4: u8 = 0x06;
/// THIRD-PARTY COPY IN service action: RECEIVE ROD TOKEN INFORMATION.
pub const TPC_IN_RECEIVE_ROD_TOKEN_INFORMATION: u8 = 0x07;
/// THIRD-PARTY COPY IN service action: REPORT ALL ROD TOKENS.
pub const TPC_IN_REPORT_ALL_ROD_TOKENS: u8 = 0x08;

/// MAINTENANCE IN service action: REPORT IDENTIFYING INFORMATION.
pub const MI_REPORT_IDENTIFYING_INFORMATION: u8 = 0x05;
/// MAINTENANCE IN service action: REPORT TARGET PORT GROUPS.
pub const MI_REPORT_TARGET_PORT_GROUPS: u8 = 0x0a;
/// MAINTENANCE IN service action: REPORT SUPPORTED OPERATION CODES.
pub const MI_REPORT_SUPPORTED_OPERATION_CODES: u8 = 0x0c;
/// MAINTENANCE IN service action: REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS.
pub const MI_REPORT_SUPPORTED_TMFS: u8 = 0x0d;
/// MAINTENANCE IN service action: REPORT TIMESTAMP.
pub const MI_REPORT_TIMESTAMP: u8 = 0x0f;

/// Standard INQUIRY data length every device must return (SPC-4).
pub const STANDARD_INQUIRY_LEN: u16 = 36;
/// READ CAPACITY(16) parameter data length (SBC-3).
pub const READ_CAPACITY_16_LEN: u32 = 32;

/// Name of an operation code as sg3_utils would print it; for opcodes that
/// multiplex service actions, the name of the family (see
/// [`Command::name`] for the specific command).
pub fn opcode_name(opcode: u8) -> &'static str {
    match opcode {
        TEST_UNIT_READY => "TEST UNIT READY",
        REQUEST_SENSE => "REQUEST SENSE",
        FORMAT_UNIT => "FORMAT UNIT",
        READ_6 => "READ(6)",
        WRITE_6 => "WRITE(6)",
        INQUIRY => "INQUIRY",
        MODE_SELECT_6 => "MODE SELECT(6)",
        RESERVE_6 => "RESERVE(6)",
        RELEASE_6 => "RELEASE(6)",
        MODE_SENSE_6 => "MODE SENSE(6)",
        START_STOP_UNIT => "START STOP UNIT",
        RECEIVE_DIAGNOSTIC_RESULTS => "RECEIVE DIAGNOSTIC RESULTS",
        SEND_DIAGNOSTIC => "SEND DIAGNOSTIC",
        PREVENT_ALLOW_MEDIUM_REMOVAL => "PREVENT ALLOW MEDIUM REMOVAL",
        READ_CAPACITY_10 => "READ CAPACITY(10)",
        READ_10 => "READ(10)",
        WRITE_10 => "WRITE(10)",
        WRITE_AND_VERIFY_10 => "WRITE AND VERIFY(10)",
        VERIFY_10 => "VERIFY(10)",
        PRE_FETCH_10 => "PRE-FETCH(10)",
        SYNCHRONIZE_CACHE_10 => "SYNCHRONIZE CACHE(10)",
        READ_DEFECT_DATA_10 => "READ DEFECT DATA(10)",
        WRITE_BUFFER => "WRITE BUFFER",
        READ_BUFFER => "READ BUFFER",
        WRITE_SAME_10 => "WRITE SAME(10)",
        UNMAP => "UNMAP",
        SANITIZE => "SANITIZE",
        LOG_SELECT => "LOG SELECT",
        LOG_SENSE => "LOG SENSE",
        MODE_SELECT_10 => "MODE SELECT(10)",
        MODE_SENSE_10 => "MODE SENSE(10)",
        PERSISTENT_RESERVE_IN => "PERSISTENT RESERVE IN",
        PERSISTENT_RESERVE_OUT => "PERSISTENT RESERVE OUT",
        VARIABLE_LENGTH => "VARIABLE LENGTH",
        THIRD_PARTY_COPY_OUT => "THIRD-PARTY COPY OUT",
        THIRD_PARTY_COPY_IN => "THIRD-PARTY COPY IN",
        ATA_PASS_THROUGH_16 => "ATA PASS-THROUGH(16)",
        READ_16 => "READ(16)",
        COMPARE_AND_WRITE => "COMPARE AND WRITE",
        WRITE_16 => "WRITE(16)",
        ORWRITE_16 => "ORWRITE(16)",
        READ_ATTRIBUTE => "READ ATTRIBUTE",
        WRITE_ATTRIBUTE => "WRITE ATTRIBUTE",
        WRITE_AND_VERIFY_16 => "WRITE AND VERIFY(16)",
        VERIFY_16 => "VERIFY(16)",
        PRE_FETCH_16 => "PRE-FETCH(16)",
        SYNCHRONIZE_CACHE_16 => "SYNCHRONIZE CACHE(16)",
        WRITE_SAME_16 => "WRITE SAME(16)",
        SERVICE_ACTION_IN_16 => "SERVICE ACTION IN(16)",
        SERVICE_ACTION_OUT_16 => "SERVICE ACTION OUT(16)",
        REPORT_LUNS => "REPORT LUNS",
        ATA_PASS_THROUGH_12 => "ATA PASS-THROUGH(12)",
        SECURITY_PROTOCOL_IN => "SECURITY PROTOCOL IN",
        MAINTENANCE_IN => "MAINTENANCE IN",
        MAINTENANCE_OUT => "MAINTENANCE OUT",
        READ_12 => "READ(12)",
        WRITE_12 => "WRITE(12)",
        SECURITY_PROTOCOL_OUT => "SECURITY PROTOCOL OUT",
        0xc0..=0xff => "VENDOR SPECIFIC",
        _ => "UNKNOWN OPERATION CODE",
    }
}

/// Whether `opcode` carries a service action in byte 1 (bits 4..0).
fn has_byte1_service_action(opcode: u8) -> bool {
    matches!(
        opcode,
        SANITIZE
            | PERSISTENT_RESERVE_IN
            | PERSISTENT_RESERVE_OUT
            | THIRD_PARTY_COPY_OUT
            | THIRD_PARTY_COPY_IN
            | SERVICE_ACTION_IN_16
            | SERVICE_ACTION_OUT_16
            | MAINTENANCE_IN
            | MAINTENANCE_OUT
    )
}

/// Which command a CDB is: the operation code and, for opcodes that
/// multiplex several commands, the service action. Errors carry this so they
/// can say "READ CAPACITY(16)" rather than "SERVICE ACTION IN(16)".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Command {
    /// Operation code (CDB byte 0).
    pub opcode: u8,
    /// Service action, for opcodes that have one.
    pub service_action: Option<u16>,
}

impl Command {
    /// A command without a service action.
    pub const fn new(opcode: u8) -> Self {
        Command {
            opcode,
            service_action: None,
        }
    }

    /// A command with a service action.
    pub const fn with_service_action(opcode: u8, service_action: u16) -> Self {
        Command {
            opcode,
            service_action: Some(service_action),
        }
    }

    /// Identify the command in a CDB. Never panics: a CDB too short to hold
    /// its service action gives `service_action: None`, an empty CDB gives
    /// opcode 0.
    pub fn from_cdb(cdb: &[u8]) -> Self {
        let opcode = cdb.first().copied().unwrap_or(0);
        let service_action = if opcode == VARIABLE_LENGTH {
            match cdb.get(8..10) {
                Some(&[hi, lo]) => Some(u16::from_be_bytes([hi, lo])),
                _ => None,
            }
        } else if has_byte1_service_action(opcode) {
            cdb.get(1).map(|b| u16::from(b & 0x1f))
        } else {
            None
        };
        Command {
            opcode,
            service_action,
        }
    }

    /// The command's name, e.g. "READ CAPACITY(16)" or "EXTENDED COPY(LID1)";
    /// falls back to [`opcode_name`] for unknown service actions.
    pub fn name(&self) -> &'static str {
        let Some(sa) = self.service_action else {
            return opcode_name(self.opcode);
        };
        match (self.opcode, u8::try_from(sa).ok()) {
            (SERVICE_ACTION_IN_16, Some(SAI_READ_CAPACITY_16)) => "READ CAPACITY(16)",
            (SERVICE_ACTION_IN_16, Some(SAI_GET_LBA_STATUS)) => "GET LBA STATUS",
            (SERVICE_ACTION_IN_16, Some(SAI_REPORT_REFERRALS)) => "REPORT REFERRALS",
            (THIRD_PARTY_COPY_OUT, Some(TPC_OUT_EXTENDED_COPY_LID1)) => "EXTENDED COPY(LID1)",
            (THIRD_PARTY_COPY_OUT, Some(TPC_OUT_EXTENDED_COPY_LID4)) => "EXTENDED COPY(LID4)",
            (THIRD_PARTY_COPY_OUT, Some(TPC_OUT_POPULATE_TOKEN)) => "POPULATE TOKEN",
            (THIRD_PARTY_COPY_OUT, Some(TPC_OUT_WRITE_USING_TOKEN)) => "WRITE USING TOKEN",
            (THIRD_PARTY_COPY_OUT, Some(TPC_OUT_COPY_OPERATION_ABORT)) => "COPY OPERATION ABORT",
            (THIRD_PARTY_COPY_IN, Some(TPC_IN_RECEIVE_COPY_STATUS_LID1)) => {
                "RECEIVE COPY STATUS(LID1)"
            }
            (THIRD_PARTY_COPY_IN, Some(TPC_IN_RECEIVE_COPY_DATA_LID1)) => "RECEIVE COPY DATA(LID1)",
            (THIRD_PARTY_COPY_IN, Some(TPC_IN_RECEIVE_COPY_OPERATING_PARAMETERS)) => {
                "RECEIVE COPY OPERATING PARAMETERS"
            }
            (THIRD_PARTY_COPY_IN, Some(TPC_IN_RECEIVE_COPY_FAILURE_DETAILS_LID1)) => {
                "RECEIVE COPY FAILURE DETAILS(LID1)"
            }
            (THIRD_PARTY_COPY_IN, Some(TPC_IN_RECEIVE_COPY_STATUS_LID4)) => {
                "RECEIVE COPY STATUS(LID4)"
            }
            (THIRD_PARTY_COPY_IN, Some(TPC_IN_RECEIVE_COPY_DATA_LID4)) => "RECEIVE COPY DATA(LID4)",
            (THIRD_PARTY_COPY_IN, Some(TPC_IN_RECEIVE_ROD_TOKEN_INFORMATION)) => {
                "RECEIVE ROD TOKEN INFORMATION"
            }
            (THIRD_PARTY_COPY_IN, Some(TPC_IN_REPORT_ALL_ROD_TOKENS)) => "REPORT ALL ROD TOKENS",
            (MAINTENANCE_IN, Some(MI_REPORT_IDENTIFYING_INFORMATION)) => {
                "REPORT IDENTIFYING INFORMATION"
            }
            (MAINTENANCE_IN, Some(MI_REPORT_TARGET_PORT_GROUPS)) => "REPORT TARGET PORT GROUPS",
            (MAINTENANCE_IN, Some(MI_REPORT_SUPPORTED_OPERATION_CODES)) => {
                "REPORT SUPPORTED OPERATION CODES"
            }
            (MAINTENANCE_IN, Some(MI_REPORT_SUPPORTED_TMFS)) => {
                "REPORT SUPPORTED TASK MANAGEMENT FUNCTIONS"
            }
            (MAINTENANCE_IN, Some(MI_REPORT_TIMESTAMP)) => "REPORT TIMESTAMP",
            (VARIABLE_LENGTH, _) => match sa {
                0x0009 => "READ(32)",
                0x000a => "VERIFY(32)",
                0x000b => "WRITE(32)",
                0x000c => "WRITE AND VERIFY(32)",
                0x000d => "WRITE SAME(32)",
                0x000e => "ORWRITE(32)",
                _ => "VARIABLE LENGTH",
            },
            _ => opcode_name(self.opcode),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.service_action {
            Some(sa) => write!(f, "{} [{:#04x}/{:#04x}]", self.name(), self.opcode, sa),
            None => write!(f, "{} [{:#04x}]", self.name(), self.opcode),
        }
    }
}

/// INQUIRY (SPC-4): `[0x12, EVPD, page, alloc_len(be16), CONTROL]`.
///
/// With `evpd == false` the page code must be 0 or the device answers
/// ILLEGAL REQUEST / INVALID FIELD IN CDB; the builder encodes what it is
/// given so that tests can provoke exactly that.
pub fn inquiry(evpd: bool, page: u8, alloc_len: u16) -> [u8; 6] {
    let [len_hi, len_lo] = alloc_len.to_be_bytes();
    [INQUIRY, u8::from(evpd), page, len_hi, len_lo, 0]
}

/// READ CAPACITY(16) (SBC-3): SERVICE ACTION IN(16) with service
/// action 0x10, allocation length in bytes 10..14, PMI and the obsolete
/// LOGICAL BLOCK ADDRESS zero.
pub fn read_capacity16(alloc_len: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = SERVICE_ACTION_IN_16;
    cdb[1] = SAI_READ_CAPACITY_16;
    cdb[10..14].copy_from_slice(&alloc_len.to_be_bytes());
    cdb
}

/// TEST UNIT READY (SPC-4): six zero bytes.
pub fn test_unit_ready() -> [u8; 6] {
    [TEST_UNIT_READY, 0, 0, 0, 0, 0]
}

/// Bytes of VPD data the crate asks for by default (the largest
/// allocation length INQUIRY can carry that is also page-sized friendly).
pub const VPD_ALLOC_LEN: u16 = 4096;
/// RECEIVE COPY OPERATING PARAMETERS allocation length. LIO rejects less
/// than 54 bytes (target_core_xcopy.c); 256 leaves room for long lists of
/// implemented descriptor codes.
pub const RCOP_ALLOC_LEN: u32 = 256;
/// RECEIVE ROD TOKEN INFORMATION allocation length: header (32), sense
/// (up to 252), token descriptor header (6) and a 512-byte token.
pub const RRTI_ALLOC_LEN: u32 = 1024;

/// INQUIRY for a VPD page (EVPD=1).
pub fn inquiry_vpd(page: u8, alloc_len: u16) -> [u8; 6] {
    inquiry(true, page, alloc_len)
}

fn rw16(opcode: u8, lba: u64, blocks: u32, byte1: u8) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = opcode;
    cdb[1] = byte1;
    cdb[2..10].copy_from_slice(&lba.to_be_bytes());
    cdb[10..14].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// READ(16) (SBC-3): LBA in bytes 2..10, TRANSFER LENGTH (blocks) in
/// 10..14; `fua` sets byte 1 bit 3.
pub fn read16(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
    rw16(READ_16, lba, blocks, if fua { 0x08 } else { 0 })
}

/// WRITE(16) (SBC-3), same layout as [`read16`].
pub fn write16(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
    rw16(WRITE_16, lba, blocks, if fua { 0x08 } else { 0 })
}

/// SYNCHRONIZE CACHE(16) (SBC-3): LBA and NUMBER OF LOGICAL BLOCKS
/// (0: to the end of the medium); IMMED off.
pub fn synchronize_cache16(lba: u64, blocks: u32) -> [u8; 16] {
    rw16(SYNCHRONIZE_CACHE_16, lba, blocks, 0)
}

/// WRITE SAME(16) (SBC-3): one block of data written to `blocks` blocks
/// from `lba`; `unmap` sets the UNMAP bit (byte 1 bit 3), asking the
/// device to deallocate instead when the data is zeros.
pub fn write_same16(lba: u64, blocks: u32, unmap: bool) -> [u8; 16] {
    rw16(WRITE_SAME_16, lba, blocks, if unmap { 0x08 } else { 0 })
}

/// UNMAP (SBC-3): `[0x42, ANCHOR=0, 0, 0, 0, 0, group, len(be16), CONTROL]`.
pub fn unmap(param_len: u16) -> [u8; 10] {
    let [hi, lo] = param_len.to_be_bytes();
    [UNMAP, 0, 0, 0, 0, 0, 0, hi, lo, 0]
}

/// UNMAP parameter list (SBC-3): 8-byte header, then one 16-byte block
/// descriptor per `(lba, blocks)` range. `None` if the list would not fit
/// the CDB's 16-bit PARAMETER LIST LENGTH.
pub fn unmap_parameters(ranges: &[(u64, u32)]) -> Option<Vec<u8>> {
    let desc_len = u16::try_from(ranges.len().checked_mul(16)?).ok()?;
    let total = desc_len.checked_add(8)?;
    let mut v = Vec::with_capacity(usize::from(total));
    v.extend_from_slice(&(total - 2).to_be_bytes());
    v.extend_from_slice(&desc_len.to_be_bytes());
    v.extend_from_slice(&[0; 4]);
    for &(lba, blocks) in ranges {
        v.extend_from_slice(&lba.to_be_bytes());
        v.extend_from_slice(&blocks.to_be_bytes());
        v.extend_from_slice(&[0; 4]);
    }
    Some(v)
}

/// REPORT LUNS (SPC-4): SELECT REPORT 0 (all LUNs), allocation length in
/// bytes 6..10.
pub fn report_luns(alloc_len: u32) -> [u8; 12] {
    let mut cdb = [0u8; 12];
    cdb[0] = REPORT_LUNS;
    cdb[6..10].copy_from_slice(&alloc_len.to_be_bytes());
    cdb
}

/// A THIRD-PARTY COPY OUT CDB (EXTENDED COPY, POPULATE TOKEN, WRITE USING
/// TOKEN): service action in byte 1, LIST IDENTIFIER in 6..10 (ignored by
/// EXTENDED COPY(LID1), which carries it in the parameter list),
/// PARAMETER LIST LENGTH in 10..14.
pub fn third_party_copy_out(service_action: u8, list_id: u32, param_len: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = THIRD_PARTY_COPY_OUT;
    cdb[1] = service_action & 0x1f;
    cdb[6..10].copy_from_slice(&list_id.to_be_bytes());
    cdb[10..14].copy_from_slice(&param_len.to_be_bytes());
    cdb
}

/// EXTENDED COPY(LID1) with a parameter list of `param_len` bytes.
pub fn extended_copy_lid1(param_len: u32) -> [u8; 16] {
    third_party_copy_out(TPC_OUT_EXTENDED_COPY_LID1, 0, param_len)
}

/// POPULATE TOKEN (SBC-3) for list identifier `list_id`.
pub fn populate_token(list_id: u32, param_len: u32) -> [u8; 16] {
    third_party_copy_out(TPC_OUT_POPULATE_TOKEN, list_id, param_len)
}

/// WRITE USING TOKEN (SBC-3) for list identifier `list_id`.
pub fn write_using_token(list_id: u32, param_len: u32) -> [u8; 16] {
    third_party_copy_out(TPC_OUT_WRITE_USING_TOKEN, list_id, param_len)
}

/// A THIRD-PARTY COPY IN CDB (RECEIVE COPY RESULTS family): service action
/// in byte 1, LIST IDENTIFIER in byte 2 for the LID1 service actions and
/// in bytes 2..6 for the LID4 ones (RRTI), ALLOCATION LENGTH in 10..14.
fn third_party_copy_in(service_action: u8, list_id: u32, lid4: bool, alloc_len: u32) -> [u8; 16] {
    let mut cdb = [0u8; 16];
    cdb[0] = THIRD_PARTY_COPY_IN;
    cdb[1] = service_action & 0x1f;
    if lid4 {
        cdb[2..6].copy_from_slice(&list_id.to_be_bytes());
    } else {
        cdb[2] = list_id.to_be_bytes()[3];
    }
    cdb[10..14].copy_from_slice(&alloc_len.to_be_bytes());
    cdb
}

/// RECEIVE COPY OPERATING PARAMETERS (SPC-4, service action 0x03).
pub fn receive_copy_operating_parameters(alloc_len: u32) -> [u8; 16] {
    third_party_copy_in(
        TPC_IN_RECEIVE_COPY_OPERATING_PARAMETERS,
        0,
        false,
        alloc_len,
    )
}

/// RECEIVE COPY STATUS(LID1) (SPC-4, service action 0x00) for an 8-bit list
/// identifier.
pub fn receive_copy_status_lid1(list_id: u8, alloc_len: u32) -> [u8; 16] {
    third_party_copy_in(
        TPC_IN_RECEIVE_COPY_STATUS_LID1,
        u32::from(list_id),
        false,
        alloc_len,
    )
}

/// RECEIVE ROD TOKEN INFORMATION (SPC-4, service action 0x07) for the
/// 32-bit list identifier of a POPULATE TOKEN or WRITE USING TOKEN.
pub fn receive_rod_token_information(list_id: u32, alloc_len: u32) -> [u8; 16] {
    third_party_copy_in(
        TPC_IN_RECEIVE_ROD_TOKEN_INFORMATION,
        list_id,
        true,
        alloc_len,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inquiry_bytes() {
        assert_eq!(inquiry(false, 0, 36), [0x12, 0, 0, 0, 36, 0]);
        assert_eq!(inquiry(true, 0x83, 0x1234), [0x12, 1, 0x83, 0x12, 0x34, 0]);
        assert_eq!(inquiry(true, 0xb0, 0xffff), [0x12, 1, 0xb0, 0xff, 0xff, 0]);
    }

    #[test]
    fn read_capacity16_bytes() {
        assert_eq!(
            read_capacity16(32),
            [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0]
        );
        assert_eq!(
            read_capacity16(0x0102_0304),
            [0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 0, 0]
        );
    }

    #[test]
    fn test_unit_ready_bytes() {
        assert_eq!(test_unit_ready(), [0u8; 6]);
    }

    #[test]
    fn command_names() {
        assert_eq!(
            Command::from_cdb(&read_capacity16(32)).name(),
            "READ CAPACITY(16)"
        );
        assert_eq!(Command::from_cdb(&inquiry(false, 0, 36)).name(), "INQUIRY");
        assert_eq!(
            Command::from_cdb(&[0x83, 0x00]).name(),
            "EXTENDED COPY(LID1)"
        );
        assert_eq!(Command::from_cdb(&[0x83, 0x11]).name(), "WRITE USING TOKEN");
        assert_eq!(
            Command::from_cdb(&[0x84, 0x07]).name(),
            "RECEIVE ROD TOKEN INFORMATION"
        );
        assert_eq!(Command::from_cdb(&[0x9e]).name(), "SERVICE ACTION IN(16)");
        assert_eq!(Command::from_cdb(&[]).name(), "TEST UNIT READY");
        assert_eq!(
            Command::from_cdb(&[0x7f, 0, 0, 0, 0, 0, 0, 0x18, 0, 0x09]).name(),
            "READ(32)"
        );
        assert_eq!(opcode_name(0xc5), "VENDOR SPECIFIC");
        assert_eq!(
            Command::from_cdb(&read_capacity16(32)).to_string(),
            "READ CAPACITY(16) [0x9e/0x10]"
        );
        assert_eq!(Command::new(INQUIRY).to_string(), "INQUIRY [0x12]");
    }

    #[test]
    fn io_cdbs() {
        let c = read16(0x0102_0304_0506_0708, 0x0a0b_0c0d, false);
        assert_eq!(
            c,
            [
                0x88, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0
            ]
        );
        assert_eq!(write16(5, 1, true)[..2], [0x8a, 0x08]);
        assert_eq!(write16(5, 1, true)[9], 5);
        assert_eq!(write_same16(0, 8, true)[..2], [0x93, 0x08]);
        assert_eq!(synchronize_cache16(0, 0)[0], 0x91);
        assert_eq!(unmap(24), [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]);
        let p = unmap_parameters(&[(7, 9)]).unwrap();
        assert_eq!(p.len(), 24);
        assert_eq!(&p[..4], &[0, 22, 0, 16]);
        assert_eq!(p[15], 7);
        assert_eq!(p[19], 9);
        assert!(unmap_parameters(&vec![(0, 0); 5000]).is_none());
        assert_eq!(report_luns(0x100)[..10], [0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn tpc_cdbs() {
        let x = extended_copy_lid1(76);
        assert_eq!(x[..2], [0x83, 0x00]);
        assert_eq!(x[10..14], [0, 0, 0, 76]);
        let p = populate_token(0x0102_0304, 48);
        assert_eq!(p[..2], [0x83, 0x10]);
        assert_eq!(p[6..10], [1, 2, 3, 4]);
        assert_eq!(write_using_token(9, 552)[1], 0x11);
        let r = receive_rod_token_information(0x0a0b_0c0d, 1024);
        assert_eq!(r[..6], [0x84, 0x07, 0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(r[10..14], [0, 0, 4, 0]);
        let o = receive_copy_operating_parameters(256);
        assert_eq!(o[..3], [0x84, 0x03, 0]);
        assert_eq!(receive_copy_status_lid1(7, 60)[..3], [0x84, 0x00, 7]);
        assert_eq!(
            Command::from_cdb(&o).name(),
            "RECEIVE COPY OPERATING PARAMETERS"
        );
    }
}
