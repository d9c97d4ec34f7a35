//! A test double of SCSI third-party copy over memory: LUNs of one copy
//! manager that execute EXTENDED COPY (source named by NAA designator),
//! POPULATE TOKEN and WRITE USING TOKEN (with OFFSET INTO ROD), following
//! the protocol's shape (tokens are opaque 512-byte blobs the manager can
//! invalidate or let expire), so the engine's XCOPY and ROD paths run on
//! the host before the SCSI leaf exists.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bdev_stack::{
    Access, BdevError, BlockDevice, Channel, CopyChannel, CopyOffload, DeviceId, DeviceInfo,
    DeviceKind, DeviceStatus, IoError, LbaRange, LeafFragment, MemDevice, OffloadCompletion,
    OffloadDomain, OffloadError, OffloadErrorKind, OffloadOutcome, OffloadRequest, OffloadSource,
    OffloadSubmitError, RodToken,
};

use super::SyncIo;

/// What a LUN offers.
#[derive(Debug, Clone, Copy)]
pub struct Offers {
    pub xcopy: bool,
    pub rod: bool,
    pub max_segments: u16,
    pub max_token_blocks: u64,
}

#[derive(Default)]
struct ManagerState {
    luns: HashMap<Vec<u8>, Arc<dyn BlockDevice>>,
    /// Token id -> (source LUN's NAA, the ranges the ROD holds, in order).
    tokens: HashMap<u64, (Vec<u8>, Vec<LbaRange>)>,
    next_token: u64,
    token_lifetime: Option<Duration>,
    /// Most blocks one ROD covers (a prefix of the ranges asked for).
    rod_limit: Option<u64>,
}

/// A copy manager: the LUNs it reaches and the ROD tokens it issued.
#[derive(Clone, Default)]
pub struct CopyManager {
    name: String,
    state: Arc<Mutex<ManagerState>>,
}

impl CopyManager {
    pub fn new(name: &str) -> CopyManager {
        CopyManager {
            name: name.to_string(),
            state: Arc::default(),
        }
    }

    /// Drops every token issued so far (as a target does when a source
    /// LBA is written, or on a reset).
    pub fn invalidate_tokens(&self) {
        self.state.lock().unwrap().tokens.clear();
    }

    /// RODs made from now on cover at most `blocks` blocks of what is
    /// asked (the first ones, as a device that stops early reports).
    pub fn set_rod_limit(&self, blocks: Option<u64>) {
        self.state.lock().unwrap().rod_limit = blocks;
    }

    /// Tokens issued from now on expire after `lifetime`.
    pub fn set_token_lifetime(&self, lifetime: Option<Duration>) {
        self.state.lock().unwrap().token_lifetime = lifetime;
    }

    /// A LUN of `blocks` 512-byte blocks behind this manager.
    pub fn lun(&self, blocks: u64, offers: Offers) -> Arc<dyn BlockDevice> {
        let inner: Arc<dyn BlockDevice> =
            Arc::new(MemDevice::new(blocks * 512, 512, 1 << 20).expect("mem"));
        let mut info = inner.info().clone();
        info.id = DeviceId::fresh();
        info.name = format!("lun{}", info.id.0);
        info.kind = DeviceKind::Scsi;
        let naa: Vec<u8> = [0x60, 0x01, 0x40, 0x50]
            .into_iter()
            .chain(info.id.0.to_be_bytes())
            .chain([0; 8])
            .collect();
        if offers.xcopy {
            info.copy_offloads.push(CopyOffload::ScsiExtendedCopy {
                naa: naa.clone(),
                copy_manager: OffloadDomain::handle(&self.state),
                designator_unique: true,
                max_segments: offers.max_segments,
                max_segment_bytes: 256 << 20,
            });
        }
        if offers.rod {
            info.copy_offloads.push(CopyOffload::ScsiRodToken {
                naa: naa.clone(),
                copy_manager: OffloadDomain::handle(&self.state),
                max_ranges: u32::from(offers.max_segments),
                max_token_blocks: offers.max_token_blocks,
            });
        }
        let lun: Arc<dyn BlockDevice> = Arc::new(Lun {
            info,
            naa: naa.clone(),
            inner,
            manager: self.clone(),
        });
        self.state
            .lock()
            .unwrap()
            .luns
            .insert(naa, Arc::clone(&lun));
        lun
    }
}

struct Lun {
    info: DeviceInfo,
    naa: Vec<u8>,
    inner: Arc<dyn BlockDevice>,
    manager: CopyManager,
}

impl BlockDevice for Lun {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn open_channel(&self, depth: usize) -> Result<Box<dyn Channel>, BdevError> {
        self.inner.open_channel(depth)
    }

    fn members(&self) -> Vec<Arc<dyn BlockDevice>> {
        Vec::new()
    }

    fn open_copy_channel(&self, _depth: usize) -> Result<Option<Box<dyn CopyChannel>>, BdevError> {
        if self.info.copy_offloads.is_empty() {
            return Ok(None);
        }
        Ok(Some(Box::new(LunCopy {
            id: self.info.id,
            naa: self.naa.clone(),
            inner: Arc::clone(&self.inner),
            manager: self.manager.clone(),
            done: VecDeque::new(),
        })))
    }

    fn map(
        &self,
        lba: u64,
        blocks: u64,
        access: Access,
        out: &mut Vec<LeafFragment>,
    ) -> Result<(), IoError> {
        let mut inner = Vec::new();
        self.inner.map(lba, blocks, access, &mut inner)?;
        out.extend(inner.into_iter().map(|f| LeafFragment {
            leaf: self.info.id,
            ..f
        }));
        Ok(())
    }
}

struct LunCopy {
    id: DeviceId,
    naa: Vec<u8>,
    inner: Arc<dyn BlockDevice>,
    manager: CopyManager,
    done: VecDeque<OffloadCompletion>,
}

/// Sense for a failed third-party copy: COPY ABORTED or ILLEGAL REQUEST.
fn sense(kind: OffloadErrorKind) -> DeviceStatus {
    match kind {
        OffloadErrorKind::TokenExpired | OffloadErrorKind::TokenInvalid => DeviceStatus::Scsi {
            key: 0x5,
            asc: 0x23,
            ascq: if kind == OffloadErrorKind::TokenExpired {
                0x0a
            } else {
                0x03
            },
        },
        _ => DeviceStatus::Scsi {
            key: 0x5,
            asc: 0x26,
            ascq: 0x0,
        },
    }
}

impl LunCopy {
    fn fail(&self, req: &OffloadRequest<'_>, kind: OffloadErrorKind) -> OffloadOutcome {
        OffloadOutcome::NotDone(OffloadError {
            device: self.id,
            dst_lba: req.ranges.first().map_or(0, |r| r.dst),
            blocks: req.blocks(),
            kind,
            status: sense(kind),
        })
    }

    fn move_blocks(&self, from: &Arc<dyn BlockDevice>, src: u64, dst: u64, blocks: u64) {
        let data = SyncIo::open(from.as_ref())
            .read(src, blocks)
            .expect("source read");
        SyncIo::open(self.inner.as_ref())
            .write(dst, &data)
            .expect("destination write");
    }

    fn execute(&self, req: &OffloadRequest<'_>) -> OffloadOutcome {
        match req.source {
            OffloadSource::SameDevice => {
                for r in req.ranges {
                    self.move_blocks(&self.inner, r.src, r.dst, r.blocks);
                }
                OffloadOutcome::Done
            }
            OffloadSource::Designator { naa, .. } => {
                let state = self.manager.state.lock().unwrap();
                let Some(source) = state.luns.get(naa).cloned() else {
                    return self.fail(req, OffloadErrorKind::Unsupported);
                };
                drop(state);
                for r in req.ranges {
                    source
                        .info()
                        .validate(&bdev_stack::IoRequest::no_data(
                            bdev_stack::IoOp::WriteZeroes,
                            r.src,
                            r.blocks,
                            0,
                        ))
                        .expect("source range inside the LUN");
                    self.move_blocks(&source, r.src, r.dst, r.blocks);
                }
                OffloadOutcome::Done
            }
            OffloadSource::RodToken(token) => {
                if token.is_expired(Instant::now()) {
                    return self.fail(req, OffloadErrorKind::TokenExpired);
                }
                let id = u64::from_be_bytes(token.bytes()[8..16].try_into().unwrap());
                let state = self.manager.state.lock().unwrap();
                let Some((naa, rod)) = state.tokens.get(&id).cloned() else {
                    return self.fail(req, OffloadErrorKind::TokenInvalid);
                };
                let Some(source) = state.luns.get(&naa).cloned() else {
                    return self.fail(req, OffloadErrorKind::TokenInvalid);
                };
                drop(state);
                // WRITE USING TOKEN reads the ROD sequentially from the
                // offset: ranges' sources must continue one another.
                for w in req.ranges.windows(2) {
                    assert_eq!(w[0].src + w[0].blocks, w[1].src, "ROD read sequentially");
                }
                for r in req.ranges {
                    // Offset into the ROD -> source LBAs.
                    let mut offset = r.src;
                    let mut dst = r.dst;
                    let mut left = r.blocks;
                    for part in &rod {
                        if left == 0 {
                            break;
                        }
                        if offset >= part.blocks {
                            offset -= part.blocks;
                            continue;
                        }
                        let n = (part.blocks - offset).min(left);
                        self.move_blocks(&source, part.lba + offset, dst, n);
                        dst += n;
                        left -= n;
                        offset = 0;
                    }
                    if left > 0 {
                        return self.fail(req, OffloadErrorKind::OutOfRange);
                    }
                }
                OffloadOutcome::Done
            }
        }
    }
}

impl CopyChannel for LunCopy {
    fn device(&self) -> DeviceId {
        self.id
    }

    fn submit_copy(&mut self, req: &OffloadRequest<'_>) -> Result<(), OffloadSubmitError> {
        let outcome = self.execute(req);
        self.done.push_back(OffloadCompletion {
            ctx: req.ctx,
            outcome,
        });
        Ok(())
    }

    fn submit_populate(&mut self, ranges: &[LbaRange], ctx: u64) -> Result<(), OffloadSubmitError> {
        let mut state = self.manager.state.lock().unwrap();
        state.next_token += 1;
        let id = state.next_token;
        // The ROD holds a prefix of the ranges, up to the limit.
        let mut left = state.rod_limit.unwrap_or(u64::MAX);
        let mut held = Vec::new();
        for r in ranges {
            let blocks = r.blocks.min(left);
            if blocks > 0 {
                held.push(LbaRange { lba: r.lba, blocks });
            }
            left -= blocks;
        }
        let blocks = held.iter().map(|r| r.blocks).sum();
        state.tokens.insert(id, (self.naa.clone(), held));
        let expires = state.token_lifetime.map(|l| Instant::now() + l);
        drop(state);
        let mut bytes = [0u8; RodToken::LEN];
        bytes[..4].copy_from_slice(&0xffff_0000u32.to_be_bytes()); // ROD type
        bytes[8..16].copy_from_slice(&id.to_be_bytes());
        let token = RodToken::new(&bytes, blocks, expires).expect("512 bytes");
        self.done.push_back(OffloadCompletion {
            ctx,
            outcome: OffloadOutcome::Token(token),
        });
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<OffloadCompletion>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            let Some(c) = self.done.pop_front() else {
                break;
            };
            out.push(c);
            n += 1;
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }
}
