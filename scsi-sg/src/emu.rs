//! An in-process emulated SCSI target: direct-access LUNs on memory or a
//! file, and a copy manager with EXTENDED COPY(LID1) and ROD tokens.
//!
//! It speaks CDBs and parameter lists, not Rust calls: every command goes
//! through [`ScsiTransport::execute`] with the bytes an initiator would
//! send, and errors come back as CHECK CONDITION with fixed-format sense,
//! as SPC-4/SBC-3 and LIO / FreeBSD CTL answer them. So the crate's typed
//! commands and the [`crate::conformance`] checks run unchanged here and
//! against real targets.
//!
//! Copy manager defaults follow LIO ([`CopyOperatingParameters::lio`]);
//! ROD tokens follow SBC-3: POPULATE TOKEN makes a point-in-time token of
//! source ranges, WRITE USING TOKEN writes from it (OFFSET INTO ROD
//! honoured), RECEIVE ROD TOKEN INFORMATION returns it. A token expires
//! when unused for its inactivity timeout (the target's clock can be
//! advanced by tests), is revoked when a source block is written after it
//! was made, and is deleted by DEL_TKN. Faults can be injected per command,
//! including a ROD-token command that ends GOOD having done less than asked
//! ([`FaultAction::ShortTransfer`]).
//!
//! Each target is its own copy manager, and its LUNs' NAA designators come
//! from the target's identity in this process (the address of its shared
//! state), not from its name: two targets given one name are still two,
//! and EXTENDED COPY on one cannot reach a LUN of the other.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use backing_store::SparseMemory;
use tracing::{debug, trace};

use crate::cdb::{self, Command};
use crate::sense::{Sense, SenseKey};
use crate::status::ScsiStatus;
use crate::tpc::{
    BlockRange, COPY_STATUS_COMPLETED, COPY_STATUS_COMPLETED_WITH_RESIDUAL,
    CopyOperatingParameters, CopyStatusLid1, ExtendedCopy, PopulateToken, ROD_TOKEN_LEN,
    ROD_TYPE_PIT_DEFAULT, RodToken, RodTokenInformation, WriteUsingToken, XcopyParseError,
};
use crate::vpd::{self, BlockLimits, Designator, Provisioning, RodLimits, ThirdPartyCopy};
use crate::{Capacity16, CommandOutcome, DataTransfer, Error, ScsiTransport};

/// Blocks per READ or WRITE (Block Limits' MAXIMUM TRANSFER LENGTH); a
/// longer command is refused as real targets refuse it, so a command's
/// answer is bounded whatever size the LUN has.
const MAX_TRANSFER_BLOCKS: u32 = 8192;
/// Blocks per UNMAP descriptor (MAXIMUM UNMAP LBA COUNT).
const MAX_UNMAP_BLOCKS: u32 = 8192;
/// Blocks per WRITE SAME (MAXIMUM WRITE SAME LENGTH).
const MAX_WRITE_SAME_BLOCKS: u64 = 0xffff;

/// How the target is built.
#[derive(Debug, Clone)]
pub struct EmuConfig {
    /// Copy manager limits reported by RECEIVE COPY OPERATING PARAMETERS
    /// and enforced by EXTENDED COPY.
    pub copy: CopyOperatingParameters,
    /// ROD-token support and limits; `None` makes the target answer the
    /// token commands like LIO (INVALID COMMAND OPERATION CODE) and omit
    /// VPD 0x8F.
    pub rod: Option<RodLimits>,
    /// Vendor in INQUIRY.
    pub vendor: [u8; 8],
    /// Product in INQUIRY.
    pub product: [u8; 16],
    /// PERIPHERAL DEVICE TYPE in INQUIRY (0: direct access; others model
    /// devices the probe must refuse).
    pub peripheral_device_type: u8,
}

impl Default for EmuConfig {
    fn default() -> Self {
        EmuConfig {
            copy: CopyOperatingParameters::lio(),
            rod: Some(RodLimits {
                max_range_descriptors: 8,
                max_inactivity_timeout: 600,
                default_inactivity_timeout: 30,
                max_token_transfer_size: 1 << 24,
                optimal_transfer_count: 2048,
            }),
            vendor: *b"USTOR   ",
            product: *b"EMU DISK        ",
            peripheral_device_type: 0,
        }
    }
}

/// What an injected fault does to the command it hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// CHECK CONDITION with this sense; the command is not executed.
    Sense(Sense),
    /// This status without sense (BUSY, TASK SET FULL, ...).
    Status(ScsiStatus),
    /// The transport reports a timeout.
    Timeout,
    /// The command runs on only the first `blocks` blocks of its ranges
    /// and ends GOOD, as a copy manager that stops early or caps a ROD
    /// does; RECEIVE ROD TOKEN INFORMATION reports the smaller TRANSFER
    /// COUNT with COPY OPERATION STATUS "completed with residual data".
    /// WRITE USING TOKEN writes that many blocks; POPULATE TOKEN makes a
    /// token that represents that many. Other commands run unchanged.
    ShortTransfer {
        /// Blocks the command gets through.
        blocks: u64,
    },
}

/// A fault injected into matching commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The LUN it applies to (`None`: any).
    pub lun: Option<usize>,
    /// Operation code to match.
    pub opcode: u8,
    /// Service action to match (`None`: any).
    pub service_action: Option<u16>,
    /// What happens.
    pub action: FaultAction,
    /// How many commands it hits before it disarms.
    pub count: u32,
}

enum Backing {
    Memory(SparseMemory),
    File(File),
}

struct LunState {
    backing: Backing,
    block_len: u32,
    blocks: u64,
    naa: [u8; 16],
    serial: String,
    unit_attention: Option<Sense>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenState {
    Valid,
    Revoked,
    Deleted,
}

struct TokenEntry {
    bytes: [u8; ROD_TOKEN_LEN],
    lun: usize,
    ranges: Vec<BlockRange>,
    timeout: Duration,
    last_used: Instant,
    state: TokenState,
}

struct Inner {
    config: EmuConfig,
    luns: Vec<LunState>,
    tokens: HashMap<u64, TokenEntry>,
    next_token: u64,
    rrti: HashMap<u32, RodTokenInformation>,
    copy_status: HashMap<u8, CopyStatusLid1>,
    faults: Vec<Fault>,
    clock_base: Instant,
    clock_offset: Duration,
    commands: u64,
    /// Set by a [`FaultAction::ShortTransfer`] for the command it hit.
    short_transfer: Option<u64>,
}

/// What every handle of one emulated target shares. Opaque: outside this
/// module it serves as the target's identity, e.g. as the copy-offload
/// domain of the target's LUNs (two handles are one target exactly when
/// their states are one allocation; see [`EmuTarget::state`]).
pub struct EmuTargetState {
    inner: Mutex<Inner>,
    name: Box<str>,
}

impl std::fmt::Debug for EmuTargetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuTargetState")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The emulated target: a set of LUNs sharing one copy manager. Cheap to
/// clone (a handle).
#[derive(Clone)]
pub struct EmuTarget {
    state: Arc<EmuTargetState>,
}

impl std::fmt::Debug for EmuTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmuTarget")
            .field("name", &self.state.name)
            .finish()
    }
}

/// One LUN of an [`EmuTarget`]: the transport the crate's commands use.
#[derive(Clone, Debug)]
pub struct EmuLun {
    target: EmuTarget,
    index: usize,
    path: PathBuf,
}

/// A command's answer before it becomes a [`CommandOutcome`].
type Answer = Result<Vec<u8>, Sense>;

fn illegal(asc: u8, ascq: u8) -> Sense {
    Sense::new(SenseKey::IllegalRequest, asc, ascq)
}

/// INVALID FIELD IN CDB pointing at `byte`.
fn bad_cdb_field(byte: u16) -> Sense {
    let mut s = illegal(0x24, 0x00);
    let [hi, lo] = byte.to_be_bytes();
    s.sense_key_specific = Some([0xc0, hi, lo]);
    s
}

/// INVALID FIELD IN PARAMETER LIST pointing at `byte`.
fn bad_param_field(byte: u16) -> Sense {
    let mut s = illegal(0x26, 0x00);
    let [hi, lo] = byte.to_be_bytes();
    s.sense_key_specific = Some([0x80, hi, lo]);
    s
}

const LBA_OUT_OF_RANGE: Sense = Sense::new(SenseKey::IllegalRequest, 0x21, 0x00);
const INVALID_OPCODE: Sense = Sense::new(SenseKey::IllegalRequest, 0x20, 0x00);
const PARAM_LIST_LENGTH_ERROR: Sense = Sense::new(SenseKey::IllegalRequest, 0x1a, 0x00);

fn be32(b: &[u8], at: usize) -> u32 {
    match b.get(at..at + 4) {
        Some(&[a, b2, c, d]) => u32::from_be_bytes([a, b2, c, d]),
        _ => 0,
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        x.copy_from_slice(s);
    }
    u64::from_be_bytes(x)
}

impl EmuTarget {
    /// A target with no LUNs yet. `name` shows in paths, serial numbers
    /// and logs; it need not be unique and names no copy manager.
    pub fn new(name: &str, config: EmuConfig) -> EmuTarget {
        let inner = Inner {
            config,
            luns: Vec::new(),
            tokens: HashMap::new(),
            next_token: 1,
            rrti: HashMap::new(),
            copy_status: HashMap::new(),
            faults: Vec::new(),
            clock_base: Instant::now(),
            clock_offset: Duration::ZERO,
            commands: 0,
            short_transfer: None,
        };
        EmuTarget {
            state: Arc::new(EmuTargetState {
                inner: Mutex::new(inner),
                name: Box::from(name),
            }),
        }
    }

    /// The state this handle shares with every other handle of the
    /// target: its identity in this process.
    pub fn state(&self) -> &Arc<EmuTargetState> {
        &self.state
    }

    /// The name given to [`EmuTarget::new`].
    pub fn name(&self) -> &str {
        &self.state.name
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another test thread panicked while
        // holding it; the state is still consistent per command.
        self.state.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The NAA designator LUN `index` of this target reports: NAA 6 (IEEE
    /// registered extended) with a made-up OUI, then the address of the
    /// target's shared state, then the LUN index. The address is unique
    /// among live targets, and every LUN handle (and any copy-offload
    /// domain made from the state) keeps the allocation alive, so no other
    /// target reports this designator while anything can name it. Not
    /// derived from the name: two targets may be given one.
    fn designator(&self, index: usize) -> [u8; 16] {
        let mut naa = [0u8; 16];
        naa[..4].copy_from_slice(&[0x60, 0x01, 0x40, 0x5e]);
        let id = Arc::as_ptr(&self.state) as usize as u64;
        naa[4..12].copy_from_slice(&id.to_be_bytes());
        naa[12..16].copy_from_slice(&u32::try_from(index).unwrap_or(u32::MAX).to_be_bytes());
        naa
    }

    fn add(&self, backing: Backing, blocks: u64, block_len: u32, naa: Option<[u8; 16]>) -> EmuLun {
        let mut inner = self.lock();
        let index = inner.luns.len();
        inner.luns.push(LunState {
            backing,
            block_len,
            blocks,
            naa: naa.unwrap_or_else(|| self.designator(index)),
            serial: format!("{}-{index:04}", self.state.name),
            unit_attention: None,
        });
        EmuLun {
            target: self.clone(),
            index,
            path: self.lun_path(index),
        }
    }

    fn lun_path(&self, index: usize) -> PathBuf {
        PathBuf::from(format!("emu:{}/{index}", self.state.name))
    }

    /// Add a LUN of `blocks` blocks of `block_len` bytes held in memory
    /// (zero-filled).
    pub fn add_memory_lun(&self, blocks: u64, block_len: u32) -> EmuLun {
        self.add(memory(blocks, block_len), blocks, block_len, None)
    }

    /// Add a memory LUN that reports `naa` as its NAA designator, even if
    /// another LUN of the target reports it too. Real targets do repeat
    /// designators (LIO builds its NAA from only the first 25 hex digits
    /// of the unit serial), and an initiator must not let EXTENDED COPY
    /// name such a LUN; this lets tests show that it does not.
    pub fn add_memory_lun_with_designator(
        &self,
        blocks: u64,
        block_len: u32,
        naa: [u8; 16],
    ) -> EmuLun {
        self.add(memory(blocks, block_len), blocks, block_len, Some(naa))
    }

    /// The NAA designator LUN `index` reports, if the LUN exists.
    pub fn lun_designator(&self, index: usize) -> Option<[u8; 16]> {
        self.lock().luns.get(index).map(|l| l.naa)
    }

    /// Add a LUN backed by `file`, sized to the file's whole blocks.
    pub fn add_file_lun(&self, file: File, block_len: u32) -> std::io::Result<EmuLun> {
        let blocks = file.metadata()?.len() / u64::from(block_len.max(1));
        Ok(self.add(Backing::File(file), blocks, block_len, None))
    }

    /// LUNs the target has.
    pub fn lun_count(&self) -> usize {
        self.lock().luns.len()
    }

    /// Inject a fault.
    pub fn inject_fault(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    /// Queue a UNIT ATTENTION (POWER ON, RESET, OR BUS DEVICE RESET
    /// OCCURRED, or the sense given) on a LUN: its next command other than
    /// INQUIRY and REPORT LUNS reports it instead of running.
    pub fn raise_unit_attention(&self, lun: usize, sense: Option<Sense>) {
        if let Some(l) = self.lock().luns.get_mut(lun) {
            l.unit_attention =
                Some(sense.unwrap_or(Sense::new(SenseKey::UnitAttention, 0x29, 0x00)));
        }
    }

    /// Move the target's clock forward (for token expiry).
    pub fn advance_clock(&self, by: Duration) {
        let mut inner = self.lock();
        inner.clock_offset = inner.clock_offset.saturating_add(by);
    }

    /// Commands executed so far (all LUNs).
    pub fn command_count(&self) -> u64 {
        self.lock().commands
    }

    /// A handle to LUN `index`, if it exists.
    pub fn lun(&self, index: usize) -> Option<EmuLun> {
        (index < self.lock().luns.len()).then(|| EmuLun {
            target: self.clone(),
            index,
            path: self.lun_path(index),
        })
    }
}

impl EmuLun {
    /// Index of the LUN in its target.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The target.
    pub fn target(&self) -> &EmuTarget {
        &self.target
    }
}

impl ScsiTransport for EmuLun {
    fn path(&self) -> &Path {
        &self.path
    }

    fn execute(
        &self,
        cdb: &[u8],
        data: DataTransfer<'_>,
        timeout: Duration,
    ) -> Result<CommandOutcome, Error> {
        let command = Command::from_cdb(cdb);
        if cdb.is_empty() || cdb.len() > usize::from(u8::MAX) {
            return Err(Error::InvalidCdb {
                path: self.path.clone(),
                command,
                len: cdb.len(),
            });
        }
        let requested = data.len();
        let mut inner = self.target.lock();
        inner.commands += 1;
        // Faults first: they model the device or the path failing.
        let hit = inner.faults.iter_mut().find(|f| {
            f.count > 0
                && f.lun.is_none_or(|l| l == self.index)
                && f.opcode == command.opcode
                && f.service_action
                    .is_none_or(|sa| Some(sa) == command.service_action)
        });
        let mut short_transfer = None;
        if let Some(f) = hit {
            f.count -= 1;
            let action = f.action;
            debug!(path = %self.path.display(), %command, ?action, "injected fault");
            match action {
                FaultAction::Timeout => {
                    return Err(Error::Timeout {
                        path: self.path.clone(),
                        command,
                        timeout,
                    });
                }
                FaultAction::Status(status) => {
                    return Ok(CommandOutcome::from_parts(
                        command,
                        status,
                        requested,
                        0,
                        &[],
                    ));
                }
                FaultAction::Sense(sense) => {
                    return Ok(CommandOutcome::from_parts(
                        command,
                        ScsiStatus::CheckCondition,
                        requested,
                        0,
                        &sense.to_fixed(),
                    ));
                }
                FaultAction::ShortTransfer { blocks } => short_transfer = Some(blocks),
            }
        }
        inner.short_transfer = short_transfer;
        let (answer, transferred) = match data {
            DataTransfer::None => (inner.run(self.index, cdb, &[]).map(|_| Vec::new()), 0),
            DataTransfer::ToDevice(buf) => (
                inner.run(self.index, cdb, buf).map(|_| Vec::new()),
                requested,
            ),
            DataTransfer::FromDevice(buf) => match inner.run(self.index, cdb, &[]) {
                Ok(bytes) => {
                    let n = bytes.len().min(buf.len());
                    buf[..n].copy_from_slice(&bytes[..n]);
                    (Ok(bytes), n)
                }
                Err(s) => (Err(s), 0),
            },
        };
        inner.short_transfer = None;
        trace!(path = %self.path.display(), %command, ok = answer.is_ok(), "emu command");
        Ok(match answer {
            Ok(_) => {
                CommandOutcome::from_parts(command, ScsiStatus::Good, requested, transferred, &[])
            }
            Err(sense) => CommandOutcome::from_parts(
                command,
                ScsiStatus::CheckCondition,
                requested,
                0,
                &sense.to_fixed(),
            ),
        })
    }
}

impl Inner {
    fn now(&self) -> Instant {
        self.clock_base + self.clock_offset + self.clock_base.elapsed()
    }

    fn lun(&self, i: usize) -> Result<&LunState, Sense> {
        self.luns
            .get(i)
            .ok_or(Sense::new(SenseKey::IllegalRequest, 0x25, 0x00))
    }

    fn run(&mut self, lun: usize, cdb: &[u8], out: &[u8]) -> Answer {
        let opcode = cdb.first().copied().unwrap_or(0);
        if opcode != cdb::INQUIRY && opcode != cdb::REPORT_LUNS {
            let l =
                self.luns
                    .get_mut(lun)
                    .ok_or(Sense::new(SenseKey::IllegalRequest, 0x25, 0x00))?;
            if let Some(ua) = l.unit_attention.take() {
                return Err(ua);
            }
        }
        let need = |n: usize| -> Result<(), Sense> {
            if cdb.len() < n {
                Err(bad_cdb_field(0))
            } else {
                Ok(())
            }
        };
        match opcode {
            cdb::TEST_UNIT_READY => Ok(Vec::new()),
            cdb::INQUIRY => {
                need(6)?;
                self.inquiry(lun, cdb)
            }
            cdb::SERVICE_ACTION_IN_16 => {
                need(16)?;
                if cdb[1] & 0x1f != cdb::SAI_READ_CAPACITY_16 {
                    return Err(bad_cdb_field(1));
                }
                let l = self.lun(lun)?;
                let cap = Capacity16 {
                    returned_lba: l.blocks.saturating_sub(1),
                    logical_block_length: l.block_len,
                    rc_basis: 0,
                    prot_en: false,
                    p_type: 0,
                    p_i_exponent: 0,
                    lbppbe: 0,
                    lbpme: true,
                    lbprz: true,
                    lowest_aligned_lba: 0,
                };
                Ok(truncate(cap.to_bytes().to_vec(), be32(cdb, 10)))
            }
            cdb::READ_16 => {
                need(16)?;
                let (lba, n) = (be64(cdb, 2), u64::from(be32(cdb, 10)));
                if n > u64::from(MAX_TRANSFER_BLOCKS) {
                    return Err(bad_cdb_field(10));
                }
                self.check(lun, lba, n)?;
                self.read_blocks(lun, lba, n)
            }
            cdb::WRITE_16 => {
                need(16)?;
                let (lba, n) = (be64(cdb, 2), u64::from(be32(cdb, 10)));
                if n > u64::from(MAX_TRANSFER_BLOCKS) {
                    return Err(bad_cdb_field(10));
                }
                self.check(lun, lba, n)?;
                let len = self.bytes(lun, n)?;
                let data = out.get(..len).ok_or(PARAM_LIST_LENGTH_ERROR)?;
                self.write_blocks(lun, lba, data)?;
                Ok(Vec::new())
            }
            cdb::SYNCHRONIZE_CACHE_16 => {
                need(16)?;
                let (lba, n) = (be64(cdb, 2), u64::from(be32(cdb, 10)));
                self.check(lun, lba, n)?;
                if let Backing::File(f) = &self.lun(lun)?.backing {
                    f.sync_data()
                        .map_err(|_| Sense::new(SenseKey::MediumError, 0x0c, 0x00))?;
                }
                Ok(Vec::new())
            }
            cdb::WRITE_SAME_16 => {
                need(16)?;
                let (lba, n) = (be64(cdb, 2), u64::from(be32(cdb, 10)));
                if n == 0 || n > MAX_WRITE_SAME_BLOCKS {
                    return Err(bad_cdb_field(10));
                }
                self.check(lun, lba, n)?;
                let bl = self.bytes(lun, 1)?;
                let block = out.get(..bl).ok_or(PARAM_LIST_LENGTH_ERROR)?.to_vec();
                let unmap = cdb[1] & 0x08 != 0;
                // LBPRZ: deallocated blocks read as zeros, so UNMAP of
                // zeros and a plain write of zeros look the same.
                let fill: Vec<u8> = if unmap && block.iter().any(|&b| b != 0) {
                    return Err(bad_cdb_field(1));
                } else {
                    block
                };
                for i in 0..n {
                    self.write_blocks(lun, lba + i, &fill)?;
                }
                Ok(Vec::new())
            }
            cdb::UNMAP => {
                need(10)?;
                let len = usize::from(u16::from_be_bytes([cdb[7], cdb[8]]));
                let p = out.get(..len).ok_or(PARAM_LIST_LENGTH_ERROR)?;
                if len == 0 {
                    return Ok(Vec::new());
                }
                if len < 8 {
                    return Err(PARAM_LIST_LENGTH_ERROR);
                }
                let dlen = usize::from(u16::from_be_bytes([p[2], p[3]]));
                let descs = p.get(8..8 + dlen).ok_or(bad_param_field(2))?;
                if !dlen.is_multiple_of(16) {
                    return Err(bad_param_field(2));
                }
                let ranges: Vec<(u64, u64)> = descs
                    .chunks_exact(16)
                    .map(|d| (be64(d, 0), u64::from(be32(d, 8))))
                    .collect();
                for (i, &(lba, n)) in ranges.iter().enumerate() {
                    if n > u64::from(MAX_UNMAP_BLOCKS) {
                        // The descriptor's NUMBER OF LOGICAL BLOCKS field.
                        let field = u16::try_from(8 + 16 * i + 8).unwrap_or(u16::MAX);
                        return Err(bad_param_field(field));
                    }
                    self.check(lun, lba, n)?;
                }
                for (lba, n) in ranges {
                    let zero = vec![0u8; self.bytes(lun, 1)?];
                    for i in 0..n {
                        self.write_blocks(lun, lba + i, &zero)?;
                    }
                }
                Ok(Vec::new())
            }
            cdb::REPORT_LUNS => {
                need(12)?;
                let mut v = Vec::new();
                let n = u32::try_from(self.luns.len() * 8).unwrap_or(u32::MAX);
                v.extend_from_slice(&n.to_be_bytes());
                v.extend_from_slice(&[0; 4]);
                for i in 0..self.luns.len() {
                    // Peripheral device addressing for LUNs < 256, flat
                    // space above (SAM-5).
                    let l = u16::try_from(i).unwrap_or(u16::MAX);
                    let first = if l < 256 { l } else { 0x4000 | (l & 0x3fff) };
                    v.extend_from_slice(&first.to_be_bytes());
                    v.extend_from_slice(&[0; 6]);
                }
                Ok(truncate(v, be32(cdb, 6)))
            }
            cdb::THIRD_PARTY_COPY_OUT => {
                need(16)?;
                let len = usize::try_from(be32(cdb, 10)).unwrap_or(usize::MAX);
                let params = out.get(..len).ok_or(PARAM_LIST_LENGTH_ERROR)?;
                match cdb[1] & 0x1f {
                    cdb::TPC_OUT_EXTENDED_COPY_LID1 => self.extended_copy(lun, params),
                    cdb::TPC_OUT_POPULATE_TOKEN if self.config.rod.is_some() => {
                        self.populate_token(lun, be32(cdb, 6), params)
                    }
                    cdb::TPC_OUT_WRITE_USING_TOKEN if self.config.rod.is_some() => {
                        self.write_using_token(lun, be32(cdb, 6), params)
                    }
                    _ => Err(INVALID_OPCODE),
                }
            }
            cdb::THIRD_PARTY_COPY_IN => {
                need(16)?;
                let alloc = be32(cdb, 10);
                match cdb[1] & 0x1f {
                    cdb::TPC_IN_RECEIVE_COPY_OPERATING_PARAMETERS => {
                        // LIO refuses allocations under 54 bytes.
                        if alloc < 54 {
                            return Err(bad_cdb_field(10));
                        }
                        Ok(truncate(self.config.copy.to_bytes(), alloc))
                    }
                    cdb::TPC_IN_RECEIVE_COPY_STATUS_LID1 => {
                        let s = self.copy_status.get(&cdb[2]).ok_or(bad_cdb_field(2))?;
                        Ok(truncate(s.to_bytes().to_vec(), alloc))
                    }
                    cdb::TPC_IN_RECEIVE_ROD_TOKEN_INFORMATION if self.config.rod.is_some() => {
                        let info = self.rrti.get(&be32(cdb, 2)).ok_or(bad_cdb_field(2))?;
                        Ok(truncate(info.to_bytes(), alloc))
                    }
                    _ => Err(INVALID_OPCODE),
                }
            }
            _ => Err(INVALID_OPCODE),
        }
    }

    fn inquiry(&self, lun: usize, cdb: &[u8]) -> Answer {
        let alloc = u32::from(u16::from_be_bytes([cdb[3], cdb[4]]));
        let evpd = cdb[1] & 0x01 != 0;
        let page = cdb[2];
        let l = self.lun(lun)?;
        if !evpd {
            if page != 0 {
                return Err(bad_cdb_field(2));
            }
            let pdt = self.config.peripheral_device_type & 0x1f;
            let mut v = vec![pdt, 0x00, 0x06, 0x02, 31, 0x08, 0x00, 0x02];
            v.extend_from_slice(&self.config.vendor);
            v.extend_from_slice(&self.config.product);
            v.extend_from_slice(b"0001");
            return Ok(truncate(v, alloc));
        }
        let mut pages = vec![
            vpd::PAGE_SUPPORTED,
            vpd::PAGE_UNIT_SERIAL,
            vpd::PAGE_DEVICE_IDENTIFICATION,
        ];
        if self.config.rod.is_some() {
            pages.push(vpd::PAGE_THIRD_PARTY_COPY);
        }
        pages.extend_from_slice(&[vpd::PAGE_BLOCK_LIMITS, vpd::PAGE_LOGICAL_BLOCK_PROVISIONING]);
        let bytes = match page {
            vpd::PAGE_SUPPORTED => vpd::build_page(page, &pages),
            vpd::PAGE_UNIT_SERIAL => vpd::build_page(page, l.serial.as_bytes()),
            vpd::PAGE_DEVICE_IDENTIFICATION => {
                let mut t10 = Designator::naa(&[]);
                t10.designator_type = vpd::DESIGNATOR_T10_VENDOR;
                t10.code_set = 2;
                t10.designator = [&self.config.vendor[..], l.serial.as_bytes()].concat();
                vpd::build_device_identification(&[Designator::naa(&l.naa), t10])
            }
            vpd::PAGE_THIRD_PARTY_COPY if self.config.rod.is_some() => ThirdPartyCopy {
                rod_limits: self.config.rod,
                supported_commands: vec![
                    (
                        cdb::THIRD_PARTY_COPY_OUT,
                        vec![
                            cdb::TPC_OUT_EXTENDED_COPY_LID1,
                            cdb::TPC_OUT_POPULATE_TOKEN,
                            cdb::TPC_OUT_WRITE_USING_TOKEN,
                        ],
                    ),
                    (
                        cdb::THIRD_PARTY_COPY_IN,
                        vec![
                            cdb::TPC_IN_RECEIVE_COPY_STATUS_LID1,
                            cdb::TPC_IN_RECEIVE_COPY_OPERATING_PARAMETERS,
                            cdb::TPC_IN_RECEIVE_ROD_TOKEN_INFORMATION,
                        ],
                    ),
                ],
                descriptor_types: Vec::new(),
            }
            .to_bytes(),
            vpd::PAGE_BLOCK_LIMITS => BlockLimits {
                max_transfer: MAX_TRANSFER_BLOCKS,
                optimal_transfer: MAX_TRANSFER_BLOCKS,
                max_unmap_lba_count: MAX_UNMAP_BLOCKS,
                max_unmap_descriptors: 16,
                optimal_unmap_granularity: 1,
                unmap_alignment: Some(0),
                max_write_same: MAX_WRITE_SAME_BLOCKS,
                ..BlockLimits::default()
            }
            .to_bytes(),
            vpd::PAGE_LOGICAL_BLOCK_PROVISIONING => Provisioning {
                lbpu: true,
                lbpws: true,
                lbprz: true,
                provisioning_type: 2,
                ..Provisioning::default()
            }
            .to_bytes(),
            _ => return Err(bad_cdb_field(2)),
        };
        Ok(truncate(bytes, alloc))
    }

    fn bytes(&self, lun: usize, blocks: u64) -> Result<usize, Sense> {
        let l = self.lun(lun)?;
        usize::try_from(blocks.saturating_mul(u64::from(l.block_len))).map_err(|_| LBA_OUT_OF_RANGE)
    }

    fn check(&self, lun: usize, lba: u64, blocks: u64) -> Result<(), Sense> {
        let l = self.lun(lun)?;
        match lba.checked_add(blocks) {
            Some(end) if end <= l.blocks => Ok(()),
            _ => Err(LBA_OUT_OF_RANGE),
        }
    }

    fn read_blocks(&self, lun: usize, lba: u64, blocks: u64) -> Answer {
        let l = self.lun(lun)?;
        let off = lba.saturating_mul(u64::from(l.block_len));
        let len = self.bytes(lun, blocks)?;
        match &l.backing {
            Backing::Memory(m) => {
                let mut v = vec![0u8; len];
                m.read(off, &mut v).map_err(|_| LBA_OUT_OF_RANGE)?;
                Ok(v)
            }
            Backing::File(f) => {
                let mut v = vec![0u8; len];
                f.read_exact_at(&mut v, off)
                    .map_err(|_| Sense::new(SenseKey::MediumError, 0x11, 0x00))?;
                Ok(v)
            }
        }
    }

    /// Write whole blocks and revoke every token whose source they touch.
    fn write_blocks(&mut self, lun: usize, lba: u64, data: &[u8]) -> Result<(), Sense> {
        let bl = u64::from(self.lun(lun)?.block_len.max(1));
        let blocks = u64::try_from(data.len()).unwrap_or(u64::MAX) / bl;
        self.check(lun, lba, blocks)?;
        for t in self.tokens.values_mut() {
            if t.lun == lun
                && t.state == TokenState::Valid
                && t.ranges
                    .iter()
                    .any(|r| r.lba < lba + blocks && lba < r.lba + u64::from(r.blocks))
            {
                debug!(lun, lba, blocks, "write to a token's source: token revoked");
                t.state = TokenState::Revoked;
            }
        }
        let l = self.luns.get_mut(lun).ok_or(LBA_OUT_OF_RANGE)?;
        let off = lba.saturating_mul(bl);
        match &mut l.backing {
            Backing::Memory(m) => m.write(off, data).map_err(|_| LBA_OUT_OF_RANGE)?,
            Backing::File(f) => f
                .write_all_at(data, off)
                .map_err(|_| Sense::new(SenseKey::MediumError, 0x0c, 0x00))?,
        }
        Ok(())
    }

    fn extended_copy(&mut self, lun: usize, params: &[u8]) -> Answer {
        let limits = &self.config.copy;
        if params.len() > usize::try_from(limits.max_descriptor_list_length).unwrap_or(usize::MAX) {
            return Err(PARAM_LIST_LENGTH_ERROR);
        }
        let list = ExtendedCopy::parse(params).map_err(|e| match e {
            XcopyParseError::Truncated | XcopyParseError::BadCscdListLength => {
                PARAM_LIST_LENGTH_ERROR
            }
            XcopyParseError::InlineData => bad_param_field(12),
            XcopyParseError::UnsupportedCscd { .. } => illegal(0x26, 0x07),
            XcopyParseError::UnsupportedSegment { .. } => illegal(0x26, 0x09),
            XcopyParseError::BadDesignator { .. } | XcopyParseError::BadSegmentLength { .. } => {
                bad_param_field(16)
            }
        })?;
        if list.cscds.len() > usize::from(limits.max_cscd_descriptors) {
            return Err(illegal(0x26, 0x06));
        }
        if list.segments.len() > usize::from(limits.max_segment_descriptors) {
            return Err(illegal(0x26, 0x08));
        }
        // Resolve each CSCD to a LUN of this target by NAA (LIO: only
        // devices the copy manager can reach).
        let mut targets = Vec::new();
        for c in &list.cscds {
            let found = self.luns.iter().position(|l| l.naa[..] == c.naa[..]);
            let Some(i) = found else {
                return Err(Sense::new(SenseKey::CopyAborted, 0x0d, 0x02));
            };
            if self.luns.get(i).map(|l| l.block_len) != Some(c.block_len) && c.block_len != 0 {
                return Err(bad_param_field(16));
            }
            targets.push(i);
        }
        let max_seg = u64::from(limits.max_segment_length);
        let mut processed = 0u16;
        let mut transferred = 0u64;
        for s in &list.segments {
            let (Some(&src), Some(&dst)) = (
                targets.get(usize::from(s.source)),
                targets.get(usize::from(s.destination)),
            ) else {
                return Err(bad_param_field(16));
            };
            // LIO: the LUN the command was sent to must be the source or
            // the destination, else the copy target is "not reachable".
            if src != lun && dst != lun {
                return Err(Sense::new(SenseKey::CopyAborted, 0x0d, 0x02));
            }
            let bl = u64::from(self.lun(src)?.block_len);
            if bl != u64::from(self.lun(dst)?.block_len) {
                return Err(bad_param_field(16));
            }
            let n = u64::from(s.blocks);
            if n * bl > max_seg {
                return Err(bad_param_field(16));
            }
            let copy_aborted = |mut sense: Sense| {
                sense.key = SenseKey::CopyAborted;
                sense
            };
            self.check(src, s.source_lba, n).map_err(copy_aborted)?;
            self.check(dst, s.destination_lba, n)
                .map_err(copy_aborted)?;
            // Block by block, front to back, as a copy manager that moves a
            // segment in pieces does (LIO moves it in chunks): overlapping
            // source and destination on one LUN are the initiator's job.
            for i in 0..n {
                let data = self
                    .read_blocks(src, s.source_lba + i, 1)
                    .map_err(copy_aborted)?;
                self.write_blocks(dst, s.destination_lba + i, &data)
                    .map_err(copy_aborted)?;
            }
            processed += 1;
            transferred += n * bl;
        }
        if !list.no_list_id {
            self.copy_status.insert(
                list.list_id,
                CopyStatusLid1 {
                    held_data_discarded: false,
                    status: 1,
                    segments_processed: processed,
                    transfer_count_units: 1,
                    transfer_count: u32::try_from(transferred >> 10).unwrap_or(u32::MAX),
                },
            );
        }
        Ok(Vec::new())
    }

    fn populate_token(&mut self, lun: usize, list_id: u32, params: &[u8]) -> Answer {
        let Some(limits) = self.config.rod else {
            return Err(INVALID_OPCODE);
        };
        let pt = PopulateToken::parse(params).map_err(|_| PARAM_LIST_LENGTH_ERROR)?;
        if pt.ranges.is_empty() || pt.ranges.len() > usize::from(limits.max_range_descriptors) {
            return Err(bad_param_field(14));
        }
        if pt.rod_type.is_some_and(|t| t != ROD_TYPE_PIT_DEFAULT) {
            return Err(illegal(0x23, 0x01));
        }
        if pt.inactivity_timeout > limits.max_inactivity_timeout {
            return Err(bad_param_field(4));
        }
        let mut asked = 0u64;
        for r in &pt.ranges {
            self.check(lun, r.lba, u64::from(r.blocks))?;
            asked += u64::from(r.blocks);
        }
        if asked > limits.max_token_transfer_size {
            return Err(bad_param_field(16));
        }
        // A capped ROD represents the first blocks of the ranges, in order.
        let ranges = match self.short_transfer {
            Some(limit) if limit < asked => first_blocks(&pt.ranges, limit),
            _ => pt.ranges,
        };
        let total: u64 = ranges.iter().map(|r| u64::from(r.blocks)).sum();
        let timeout = if pt.inactivity_timeout == 0 {
            limits.default_inactivity_timeout
        } else {
            pt.inactivity_timeout
        };
        let id = self.next_token;
        self.next_token += 1;
        let mut bytes = [0u8; ROD_TOKEN_LEN];
        bytes[0..4].copy_from_slice(&ROD_TYPE_PIT_DEFAULT.to_be_bytes());
        bytes[6..8].copy_from_slice(&0x01f8u16.to_be_bytes());
        bytes[8..16].copy_from_slice(&id.to_be_bytes());
        bytes[16..32].copy_from_slice(&self.lun(lun)?.naa);
        bytes[32..40].copy_from_slice(&total.to_be_bytes());
        // A keyed check word, so that a guessed or altered token is
        // "corrupt" rather than accepted.
        let check = token_check(&bytes[..40]);
        bytes[40..48].copy_from_slice(&check.to_be_bytes());
        let now = self.now();
        self.tokens.insert(
            id,
            TokenEntry {
                bytes,
                lun,
                ranges,
                timeout: Duration::from_secs(u64::from(timeout)),
                last_used: now,
                state: TokenState::Valid,
            },
        );
        self.rrti.insert(
            list_id,
            RodTokenInformation {
                response_to_service_action: cdb::TPC_OUT_POPULATE_TOKEN,
                copy_operation_status: completion_status(total, asked),
                operation_counter: 0,
                completion_status: 0,
                transfer_count_units: 0xf1,
                transfer_count: total,
                segments_processed: 0,
                sense: None,
                token: Some(RodToken(bytes)),
            },
        );
        Ok(Vec::new())
    }

    fn write_using_token(&mut self, lun: usize, list_id: u32, params: &[u8]) -> Answer {
        let Some(limits) = self.config.rod else {
            return Err(INVALID_OPCODE);
        };
        let wut = match WriteUsingToken::parse(params) {
            Ok(w) => w,
            Err(crate::ParseError::Invalid { .. }) => return Err(illegal(0x23, 0x0a)),
            Err(_) => return Err(PARAM_LIST_LENGTH_ERROR),
        };
        if wut.ranges.is_empty() || wut.ranges.len() > usize::from(limits.max_range_descriptors) {
            return Err(bad_param_field(534));
        }
        let t = &wut.token.0;
        if t[0..4] != ROD_TYPE_PIT_DEFAULT.to_be_bytes() {
            return Err(illegal(0x23, 0x01));
        }
        if token_check(&t[..40]).to_be_bytes() != t[40..48] {
            return Err(illegal(0x23, 0x05));
        }
        let id = be64(t, 8);
        let now = self.now();
        let entry = self.tokens.get(&id).ok_or(illegal(0x23, 0x04))?;
        if entry.bytes != *t {
            return Err(illegal(0x23, 0x05));
        }
        match entry.state {
            TokenState::Revoked => return Err(illegal(0x23, 0x06)),
            TokenState::Deleted => return Err(illegal(0x23, 0x09)),
            TokenState::Valid => {}
        }
        if now.saturating_duration_since(entry.last_used) > entry.timeout {
            return Err(illegal(0x23, 0x07));
        }
        let src = entry.lun;
        let src_ranges = entry.ranges.clone();
        let total: u64 = src_ranges.iter().map(|r| u64::from(r.blocks)).sum();
        if self.lun(src)?.block_len != self.lun(lun)?.block_len {
            return Err(illegal(0x23, 0x01));
        }
        if wut.offset_into_rod >= total {
            return Err(bad_param_field(8));
        }
        for r in &wut.ranges {
            self.check(lun, r.lba, u64::from(r.blocks))?;
        }
        // Gather the ROD's bytes from the offset on, then scatter them over
        // the destination ranges; reading all first keeps overlapping
        // source and destination correct. A short transfer stops early.
        let asked: u64 = wut.ranges.iter().map(|r| u64::from(r.blocks)).sum();
        let want = asked.min(self.short_transfer.unwrap_or(u64::MAX));
        let mut data = Vec::new();
        let mut skip = wut.offset_into_rod;
        let mut left = want;
        for r in &src_ranges {
            let n = u64::from(r.blocks);
            if skip >= n {
                skip -= n;
                continue;
            }
            let take = (n - skip).min(left);
            data.extend_from_slice(&self.read_blocks(src, r.lba + skip, take)?);
            left -= take;
            skip = 0;
            if left == 0 {
                break;
            }
        }
        let bl = usize::try_from(self.lun(lun)?.block_len)
            .unwrap_or(1)
            .max(1);
        let mut at = 0usize;
        let mut written = 0u64;
        for r in &wut.ranges {
            let len = usize::try_from(r.blocks).unwrap_or(0) * bl;
            let chunk = data.get(at..).unwrap_or(&[]);
            let chunk = chunk.get(..len.min(chunk.len())).unwrap_or(&[]);
            if chunk.is_empty() {
                break;
            }
            self.write_blocks(lun, r.lba, chunk)?;
            at += chunk.len();
            written += u64::try_from(chunk.len() / bl).unwrap_or(0);
        }
        if let Some(e) = self.tokens.get_mut(&id) {
            e.last_used = now;
            if wut.del_tkn {
                e.state = TokenState::Deleted;
            }
        }
        self.rrti.insert(
            list_id,
            RodTokenInformation {
                response_to_service_action: cdb::TPC_OUT_WRITE_USING_TOKEN,
                copy_operation_status: completion_status(written, asked),
                operation_counter: 0,
                completion_status: 0,
                transfer_count_units: 0xf1,
                transfer_count: written,
                segments_processed: 0,
                sense: None,
                token: None,
            },
        );
        Ok(Vec::new())
    }
}

/// Zero-filled memory for a LUN.
fn memory(blocks: u64, block_len: u32) -> Backing {
    Backing::Memory(SparseMemory::new(
        blocks.saturating_mul(u64::from(block_len)),
    ))
}

/// The first `limit` blocks of `ranges`, in order.
fn first_blocks(ranges: &[BlockRange], limit: u64) -> Vec<BlockRange> {
    let mut left = limit;
    let mut out = Vec::new();
    for r in ranges {
        if left == 0 {
            break;
        }
        let take = u64::from(r.blocks).min(left);
        out.push(BlockRange {
            lba: r.lba,
            blocks: u32::try_from(take).unwrap_or(r.blocks),
        });
        left -= take;
    }
    out
}

/// COPY OPERATION STATUS of a ROD-token command that got through `done`
/// of `asked` blocks.
fn completion_status(done: u64, asked: u64) -> u8 {
    if done >= asked {
        COPY_STATUS_COMPLETED
    } else {
        COPY_STATUS_COMPLETED_WITH_RESIDUAL
    }
}

/// FNV-1a over the token's first bytes: the check word of emulator tokens.
fn token_check(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0x6c62_272e_07bb_0142u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn truncate(mut v: Vec<u8>, alloc: u32) -> Vec<u8> {
    v.truncate(usize::try_from(alloc).unwrap_or(usize::MAX));
    v
}
