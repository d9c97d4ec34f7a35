//! Typed command builders: each names the fields a command needs and
//! defaults the rest, and builds the [`SubmissionEntry`] (NVMe Base 2.0 and
//! NVM Command Set 1.0 layouts). Data pointers are set by whoever owns the
//! memory ([`Prps`]); the queue pair sets the command identifier.
//!
//! ```
//! use nvme::cmd::{Read, Prps};
//! let sqe = Read::new(1, 2048, 8).fua(true).build(Prps::single(0x1000));
//! assert_eq!(sqe.cdw12.get(), 7 | 1 << 30);
//! ```

use crate::spec::{SubmissionEntry, admin_opc, nvm_opc};

/// The data pointer of a command: PRP entry 1 and 2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prps {
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (second page or PRP list), or 0.
    pub prp2: u64,
}

impl Prps {
    /// No data.
    pub const NONE: Prps = Prps { prp1: 0, prp2: 0 };

    /// Data within one page at `iova`.
    pub fn single(iova: u64) -> Prps {
        Prps {
            prp1: iova,
            prp2: 0,
        }
    }

    fn apply(self, mut sqe: SubmissionEntry) -> SubmissionEntry {
        sqe.prp1 = self.prp1.into();
        sqe.prp2 = self.prp2.into();
        sqe
    }
}

const FUA: u32 = 1 << 30;

/// Read (NVM opcode 0x02): `blocks` (1..=65536) at `slba`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Read {
    nsid: u32,
    slba: u64,
    blocks: u32,
    fua: bool,
}

impl Read {
    /// Reads `blocks` (1 to 65536) blocks at `slba` of namespace `nsid`.
    pub fn new(nsid: u32, slba: u64, blocks: u32) -> Read {
        Read {
            nsid,
            slba,
            blocks,
            fua: false,
        }
    }

    /// Force Unit Access.
    #[must_use]
    pub fn fua(mut self, fua: bool) -> Read {
        self.fua = fua;
        self
    }

    /// The submission entry, with data at `prps`.
    pub fn build(self, prps: Prps) -> SubmissionEntry {
        rw(
            nvm_opc::READ,
            self.nsid,
            self.slba,
            self.blocks,
            self.fua,
            prps,
        )
    }
}

/// Write (NVM opcode 0x01): `blocks` (1..=65536) at `slba`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Write {
    nsid: u32,
    slba: u64,
    blocks: u32,
    fua: bool,
}

impl Write {
    /// Writes `blocks` (1 to 65536) blocks at `slba` of namespace `nsid`.
    pub fn new(nsid: u32, slba: u64, blocks: u32) -> Write {
        Write {
            nsid,
            slba,
            blocks,
            fua: false,
        }
    }

    /// Force Unit Access.
    #[must_use]
    pub fn fua(mut self, fua: bool) -> Write {
        self.fua = fua;
        self
    }

    /// The submission entry, with data at `prps`.
    pub fn build(self, prps: Prps) -> SubmissionEntry {
        rw(
            nvm_opc::WRITE,
            self.nsid,
            self.slba,
            self.blocks,
            self.fua,
            prps,
        )
    }
}

fn rw(opc: u8, nsid: u32, slba: u64, blocks: u32, fua: bool, prps: Prps) -> SubmissionEntry {
    let nlb = blocks.saturating_sub(1) & 0xffff;
    let cdw12 = if fua { nlb | FUA } else { nlb };
    prps.apply(SubmissionEntry::new(opc, nsid).with_cdws(&[
        slba as u32,
        (slba >> 32) as u32,
        cdw12,
    ]))
}

/// Flush (NVM opcode 0x00).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flush {
    nsid: u32,
}

impl Flush {
    /// Flushes namespace `nsid`'s volatile write cache.
    pub fn new(nsid: u32) -> Flush {
        Flush { nsid }
    }

    /// The submission entry.
    pub fn build(self) -> SubmissionEntry {
        SubmissionEntry::new(nvm_opc::FLUSH, self.nsid)
    }
}

/// Write Zeroes (NVM opcode 0x08): `blocks` (1..=65536) at `slba`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteZeroes {
    nsid: u32,
    slba: u64,
    blocks: u32,
}

impl WriteZeroes {
    /// Zeroes `blocks` (1 to 65536) blocks at `slba` of namespace `nsid`.
    pub fn new(nsid: u32, slba: u64, blocks: u32) -> WriteZeroes {
        WriteZeroes { nsid, slba, blocks }
    }

    /// The submission entry.
    pub fn build(self) -> SubmissionEntry {
        SubmissionEntry::new(nvm_opc::WRITE_ZEROES, self.nsid).with_cdws(&[
            self.slba as u32,
            (self.slba >> 32) as u32,
            self.blocks.saturating_sub(1) & 0xffff,
        ])
    }
}

/// Dataset Management (NVM opcode 0x09) with the Deallocate attribute,
/// over `ranges` (1..=256) [`DsmRange`](crate::spec::DsmRange) entries the
/// data pointer addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deallocate {
    nsid: u32,
    ranges: u32,
}

impl Deallocate {
    /// Deallocates the `ranges` (1 to 256) ranges at the data pointer.
    pub fn new(nsid: u32, ranges: u32) -> Deallocate {
        Deallocate { nsid, ranges }
    }

    /// The submission entry, with the range list at `prps`.
    pub fn build(self, prps: Prps) -> SubmissionEntry {
        const ATTRIBUTE_DEALLOCATE: u32 = 1 << 2;
        prps.apply(
            SubmissionEntry::new(nvm_opc::DSM, self.nsid)
                .with_cdws(&[self.ranges.saturating_sub(1) & 0xff, ATTRIBUTE_DEALLOCATE]),
        )
    }
}

/// Copy (NVM opcode 0x19), descriptor format 0: `ranges` (1..=256)
/// [`CopyRangeFormat0`](crate::spec::CopyRangeFormat0) entries at the data
/// pointer, copied to consecutive blocks from `sdlba`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    nsid: u32,
    sdlba: u64,
    ranges: u32,
}

impl Copy {
    /// Copies the `ranges` (1 to 256) source ranges at the data pointer to
    /// `sdlba` of namespace `nsid`.
    pub fn new(nsid: u32, sdlba: u64, ranges: u32) -> Copy {
        Copy {
            nsid,
            sdlba,
            ranges,
        }
    }

    /// The submission entry, with the range list at `prps`.
    pub fn build(self, prps: Prps) -> SubmissionEntry {
        prps.apply(SubmissionEntry::new(nvm_opc::COPY, self.nsid).with_cdws(&[
            self.sdlba as u32,
            (self.sdlba >> 32) as u32,
            self.ranges.saturating_sub(1) & 0xff,
        ]))
    }
}

/// Abort (admin opcode 0x08) of command `cid` on submission queue `sqid`.
/// Completion DW0 bit 0 set: the command was not aborted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abort {
    sqid: u16,
    cid: u16,
}

impl Abort {
    /// Asks the controller to abort `cid` on `sqid`.
    pub fn new(sqid: u16, cid: u16) -> Abort {
        Abort { sqid, cid }
    }

    /// The submission entry.
    pub fn build(self) -> SubmissionEntry {
        SubmissionEntry::new(admin_opc::ABORT, 0)
            .with_cdws(&[u32::from(self.sqid) | u32::from(self.cid) << 16])
    }
}

/// Create I/O Completion Queue (admin opcode 0x05), physically contiguous,
/// interrupts off (polled).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateIoCq {
    qid: u16,
    entries: u16,
    iova: u64,
}

impl CreateIoCq {
    /// Completion queue `qid` of `entries` (2 or more) entries at `iova`.
    pub fn new(qid: u16, entries: u16, iova: u64) -> CreateIoCq {
        CreateIoCq { qid, entries, iova }
    }

    /// The submission entry.
    pub fn build(self) -> SubmissionEntry {
        const PHYSICALLY_CONTIGUOUS: u32 = 1;
        let qsize = u32::from(self.entries.saturating_sub(1));
        Prps::single(self.iova).apply(
            SubmissionEntry::new(admin_opc::CREATE_CQ, 0)
                .with_cdws(&[u32::from(self.qid) | qsize << 16, PHYSICALLY_CONTIGUOUS]),
        )
    }
}

/// Create I/O Submission Queue (admin opcode 0x01), physically contiguous,
/// completing to `cqid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateIoSq {
    qid: u16,
    entries: u16,
    cqid: u16,
    iova: u64,
}

impl CreateIoSq {
    /// Submission queue `qid` of `entries` (2 or more) entries at `iova`,
    /// completing to queue `cqid`.
    pub fn new(qid: u16, entries: u16, cqid: u16, iova: u64) -> CreateIoSq {
        CreateIoSq {
            qid,
            entries,
            cqid,
            iova,
        }
    }

    /// The submission entry.
    pub fn build(self) -> SubmissionEntry {
        const PHYSICALLY_CONTIGUOUS: u32 = 1;
        let qsize = u32::from(self.entries.saturating_sub(1));
        Prps::single(self.iova).apply(SubmissionEntry::new(admin_opc::CREATE_SQ, 0).with_cdws(&[
            u32::from(self.qid) | qsize << 16,
            PHYSICALLY_CONTIGUOUS | u32::from(self.cqid) << 16,
        ]))
    }
}

/// Delete I/O Submission Queue (admin opcode 0x00): the controller aborts
/// what the queue holds and, once it completes, touches no memory of the
/// queue's commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteIoSq {
    qid: u16,
}

impl DeleteIoSq {
    /// Deletes submission queue `qid`.
    pub fn new(qid: u16) -> DeleteIoSq {
        DeleteIoSq { qid }
    }

    /// The submission entry.
    pub fn build(self) -> SubmissionEntry {
        SubmissionEntry::new(admin_opc::DELETE_SQ, 0).with_cdws(&[u32::from(self.qid)])
    }
}

/// Delete I/O Completion Queue (admin opcode 0x04).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeleteIoCq {
    qid: u16,
}

impl DeleteIoCq {
    /// Deletes completion queue `qid` (its submission queues first).
    pub fn new(qid: u16) -> DeleteIoCq {
        DeleteIoCq { qid }
    }

    /// The submission entry.
    pub fn build(self) -> SubmissionEntry {
        SubmissionEntry::new(admin_opc::DELETE_CQ, 0).with_cdws(&[u32::from(self.qid)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_and_write_pack_lba_count_and_fua() {
        let sqe = Read::new(3, 0x1_2345_6789, 65536).build(Prps {
            prp1: 0x1000,
            prp2: 0x2000,
        });
        assert_eq!(sqe.opc, nvm_opc::READ);
        assert_eq!(sqe.nsid.get(), 3);
        assert_eq!(sqe.cdw10.get(), 0x2345_6789);
        assert_eq!(sqe.cdw11.get(), 1);
        assert_eq!(sqe.cdw12.get(), 0xffff);
        assert_eq!((sqe.prp1.get(), sqe.prp2.get()), (0x1000, 0x2000));
        let sqe = Write::new(1, 8, 1).fua(true).build(Prps::single(0x3000));
        assert_eq!(sqe.opc, nvm_opc::WRITE);
        assert_eq!(sqe.cdw12.get(), FUA);
    }

    #[test]
    fn queue_management_and_abort_pack_their_dwords() {
        let cq = CreateIoCq::new(2, 256, 0x10_0000).build();
        assert_eq!((cq.cdw10.get(), cq.cdw11.get()), (2 | 255 << 16, 1));
        assert_eq!(cq.prp1.get(), 0x10_0000);
        let sq = CreateIoSq::new(2, 256, 2, 0x20_0000).build();
        assert_eq!(
            (sq.cdw10.get(), sq.cdw11.get()),
            (2 | 255 << 16, 1 | 2 << 16)
        );
        assert_eq!(Abort::new(4, 17).build().cdw10.get(), 4 | 17 << 16);
        assert_eq!(DeleteIoSq::new(9).build().cdw10.get(), 9);
        assert_eq!(DeleteIoCq::new(9).build().opc, admin_opc::DELETE_CQ);
    }

    #[test]
    fn copy_and_deallocate_count_ranges_zero_based() {
        let c = Copy::new(1, 0x10, 3).build(Prps::single(0x4000));
        assert_eq!((c.cdw10.get(), c.cdw12.get()), (0x10, 2));
        let d = Deallocate::new(1, 256).build(Prps::single(0x5000));
        assert_eq!((d.cdw10.get(), d.cdw11.get()), (255, 1 << 2));
        assert_eq!(WriteZeroes::new(1, 5, 65536).build().cdw12.get(), 0xffff);
    }
}
