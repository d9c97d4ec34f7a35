//! The SCSI LUN leaf over the emulated target: what the probe makes of a
//! LUN, reads and writes against a flat reference model (alone, striped,
//! and mirrored with a memory leg), write zeroes, faults, the copy channel
//! driven directly, and the spec's `sg:` / `sgemu:` errors.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bdev_stack::spec::{LeafRegistry, SpecErrorKind};
use bdev_stack::{
    BdevError, BlockDevice, CopyOffload, DeviceKind, IoErrorKind, IoOp, LbaRange,
    OffloadCompletion, OffloadErrorKind, OffloadOutcome, OffloadRange, OffloadRequest,
    OffloadSource, ScsiLeaf, SgEmuFactory, SupportedOps,
};
use common::{SyncIo, pattern};
use scsi_sg::emu::{EmuConfig, EmuTarget, Fault, FaultAction};
use scsi_sg::{Sense, SenseKey};

/// A registry whose `sgemu:` factory the test can reach (for its targets).
fn registry() -> (LeafRegistry, Arc<SgEmuFactory>) {
    let factory = Arc::new(SgEmuFactory::new());
    let mut registry = LeafRegistry::with_defaults();
    registry.register("sgemu", factory.clone());
    (registry, factory)
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Random writes, write zeroes and reads against a flat model; every read
/// and a final full read-back must equal the model.
fn exercise(device: &Arc<dyn BlockDevice>, seed: u64, ops: usize) {
    let info = device.info().clone();
    let bs = info.block_size as usize;
    let blocks = info.block_count;
    let mut model = vec![0u8; blocks as usize * bs];
    let mut io = SyncIo::open(device.as_ref());
    let mut rng = Rng(seed | 1);
    for i in 0..ops {
        let len = 1 + rng.below(blocks.min(700));
        let lba = rng.below(blocks - len + 1);
        let at = lba as usize * bs;
        let n = len as usize * bs;
        match rng.below(6) {
            0 | 1 => {
                let data = pattern(seed * 1000 + i as u64, n);
                io.write(lba, &data).expect("write");
                model[at..at + n].copy_from_slice(&data);
            }
            2 if info.ops.contains(SupportedOps::WRITE_ZEROES) => {
                io.op(IoOp::WriteZeroes, lba, len).expect("write zeroes");
                model[at..at + n].fill(0);
            }
            3 if info.ops.contains(SupportedOps::DEALLOCATE) => {
                io.op(IoOp::Deallocate, lba, len).expect("deallocate");
                model[at..at + n].fill(0);
            }
            _ => {
                let got = io.read(lba, len).expect("read");
                assert!(
                    got == model[at..at + n],
                    "op {i}: read of {len} blocks at {lba} differs from the model"
                );
            }
        }
    }
    io.op(IoOp::Flush, 0, 0).expect("flush");
    let all = io.read(0, blocks).expect("read back");
    assert!(all == model, "final read-back differs from the model");
}

#[test]
fn probe_fills_in_the_leaf_description() {
    let (registry, _) = registry();
    let a = registry
        .build("sgemu:1m,bs=4k,target=t1,rod=on")
        .expect("a");
    let b = registry
        .build("sgemu:2m,bs=4k,target=t1,rod=on")
        .expect("b");
    let other = registry.build("sgemu:1m,bs=4k").expect("other");
    let info = a.info();
    assert_eq!(info.kind, DeviceKind::Emulated);
    assert_eq!(info.block_size, 4096);
    assert_eq!(info.block_count, 256);
    assert_eq!(b.info().block_count, 512);
    assert!(info.max_transfer_blocks >= 1 && info.max_transfer_blocks <= 256);
    assert!(info.ops.contains(
        SupportedOps::READ
            | SupportedOps::WRITE
            | SupportedOps::FLUSH
            | SupportedOps::WRITE_ZEROES
            | SupportedOps::DEALLOCATE
    ));
    let xcopy = |d: &Arc<dyn BlockDevice>| {
        d.info().copy_offloads.iter().find_map(|o| match o {
            CopyOffload::ScsiExtendedCopy {
                naa, copy_manager, ..
            } => Some((naa.clone(), copy_manager.clone())),
            _ => None,
        })
    };
    let (naa_a, cm_a) = xcopy(&a).expect("LUN a offers EXTENDED COPY");
    let (naa_b, cm_b) = xcopy(&b).expect("LUN b offers EXTENDED COPY");
    let (_, cm_other) = xcopy(&other).expect("the other LUN offers EXTENDED COPY");
    assert_ne!(naa_a, naa_b, "LUNs have distinct NAA designators");
    assert_eq!(naa_a.len(), 16);
    assert_eq!(cm_a, cm_b, "one target, one copy manager");
    assert_ne!(cm_a, cm_other, "another target, another copy manager");
    let rod = info.copy_offloads.iter().find_map(|o| match o {
        CopyOffload::ScsiRodToken {
            naa,
            max_ranges,
            max_token_blocks,
            ..
        } => Some((naa.clone(), *max_ranges, *max_token_blocks)),
        _ => None,
    });
    let (rod_naa, max_ranges, max_token_blocks) = rod.expect("rod=on offers ROD tokens");
    assert_eq!(rod_naa, naa_a);
    assert_eq!(
        max_ranges,
        u32::from(EmuConfig::default().rod.expect("rod").max_range_descriptors)
    );
    assert!(max_token_blocks > 0);
    assert!(
        !other
            .info()
            .copy_offloads
            .iter()
            .any(|o| matches!(o, CopyOffload::ScsiRodToken { .. })),
        "ROD tokens are off by default"
    );
    let off = registry.build("sgemu:1m,xcopy=off").expect("xcopy off");
    assert!(off.info().copy_offloads.is_empty());
    assert!(off.open_copy_channel(1).expect("open").is_none());
}

#[test]
fn a_lun_reads_back_what_the_model_says() {
    let (registry, _) = registry();
    let lun = registry.build("sgemu:2m").expect("lun");
    exercise(&lun, 11, 300);
}

#[test]
fn a_stripe_of_luns_reads_back_what_the_model_says() {
    let (registry, _) = registry();
    let dev = registry
        .build("stripe(chunk=16k, sgemu:1m,target=s, sgemu:1m,target=s, sgemu:1m)")
        .expect("stripe");
    exercise(&dev, 12, 300);
}

#[test]
fn a_mirror_of_a_lun_and_a_memory_leg_reads_back_what_the_model_says() {
    let (registry, _) = registry();
    let dev = registry
        .build("mirror(concat(sgemu:512k, sgemu:512k,bs=512), mem:1m)")
        .expect("mirror");
    exercise(&dev, 13, 300);
    // Both legs hold the same bytes.
    let legs = dev.members();
    assert_eq!(legs.len(), 2);
    let blocks = dev.info().block_count;
    let a = SyncIo::open(legs[0].as_ref())
        .read(0, blocks)
        .expect("leg 0");
    let b = SyncIo::open(legs[1].as_ref())
        .read(0, blocks)
        .expect("leg 1");
    assert!(a == b, "mirror legs differ");
}

#[test]
fn write_zeroes_goes_through_write_same() {
    let (registry, factory) = registry();
    let lun = registry.build("sgemu:256k,target=z").expect("lun");
    assert!(lun.info().ops.contains(SupportedOps::WRITE_ZEROES));
    let mut io = SyncIo::open(lun.as_ref());
    io.write(0, &[0xaa; 64 * 512]).expect("write");
    let before = factory.target("z").expect("target").command_count();
    io.op(IoOp::WriteZeroes, 10, 20).expect("write zeroes");
    assert_eq!(
        factory.target("z").expect("target").command_count(),
        before + 1,
        "one WRITE SAME"
    );
    let back = io.read(0, 64).expect("read");
    assert!(back[..10 * 512].iter().all(|&b| b == 0xaa));
    assert!(back[10 * 512..30 * 512].iter().all(|&b| b == 0));
    assert!(back[30 * 512..].iter().all(|&b| b == 0xaa));
}

#[test]
fn a_medium_error_is_typed_and_a_mirror_reads_the_other_leg() {
    let (registry, factory) = registry();
    let lun = registry.build("sgemu:256k,target=m").expect("lun");
    let target = factory.target("m").expect("target");
    let medium = Fault {
        lun: Some(0),
        opcode: scsi_sg::cdb::READ_16,
        service_action: None,
        action: FaultAction::Sense(Sense::new(SenseKey::MediumError, 0x11, 0x00)),
        count: 1,
    };
    target.inject_fault(medium);
    let err = SyncIo::open(lun.as_ref())
        .read(0, 8)
        .expect_err("medium error");
    assert_eq!(err.kind, IoErrorKind::Medium);
    assert_eq!(err.device, lun.info().id);

    let mirror = registry
        .build("mirror(sgemu:256k,target=m2, mem:256k)")
        .expect("mirror");
    let mut io = SyncIo::open(mirror.as_ref());
    io.write(0, &pattern(5, 32 * 512)).expect("write");
    let target = factory.target("m2").expect("target");
    target.inject_fault(Fault {
        count: 100,
        ..medium
    });
    // Reads spread over the legs: the LUN leg fails, the mirror retries on
    // the memory leg, and the caller sees the data.
    for _ in 0..4 {
        assert_eq!(io.read(0, 32).expect("read"), pattern(5, 32 * 512));
    }
}

#[test]
fn a_unit_attention_is_retried_once() {
    // The next command after a UNIT ATTENTION reports it instead of
    // running; the leaf sends it again and the caller sees the data.
    let target = EmuTarget::new("ua", EmuConfig::default());
    let leaf: Arc<dyn BlockDevice> =
        Arc::new(ScsiLeaf::from_emu(target.add_memory_lun(256, 512)).expect("leaf"));
    let mut io = SyncIo::open(leaf.as_ref());
    io.write(3, &pattern(8, 512)).expect("write");
    target.raise_unit_attention(0, None);
    let before = target.command_count();
    assert_eq!(
        io.read(3, 1).expect("read after UNIT ATTENTION"),
        pattern(8, 512)
    );
    assert_eq!(target.command_count(), before + 2, "one retry");
    // Two in a row: the second is an error (retried once, not forever).
    target.raise_unit_attention(0, None);
    target.inject_fault(Fault {
        lun: Some(0),
        opcode: scsi_sg::cdb::READ_16,
        service_action: None,
        action: FaultAction::Sense(Sense::new(SenseKey::UnitAttention, 0x2a, 0x09)),
        count: 1,
    });
    assert!(io.read(3, 1).is_err());
}

#[test]
fn a_device_that_is_not_direct_access_is_refused() {
    let target = EmuTarget::new(
        "tape",
        EmuConfig {
            peripheral_device_type: 1,
            ..EmuConfig::default()
        },
    );
    match ScsiLeaf::from_emu(target.add_memory_lun(64, 512)) {
        Err(BdevError::Scsi { source, .. })
            if matches!(
                *source,
                scsi_sg::Error::NotDirectAccess { device_type: 1, .. }
            ) => {}
        other => panic!("expected NotDirectAccess, got {other:?}"),
    }
}

#[test]
fn sg_spec_errors_are_typed() {
    let registry = LeafRegistry::with_defaults();
    let missing = registry
        .build("concat(mem:1m, sg:/dev/ustor-no-such-sg)")
        .expect_err("missing device");
    assert_eq!(missing.column, 16);
    match missing.kind {
        SpecErrorKind::Device(BdevError::Scsi { source, .. })
            if matches!(*source, scsi_sg::Error::NoSuchDevice { .. }) => {}
        other => panic!("expected NoSuchDevice, got {other:?}"),
    }
    let not_sg = registry.build("sg:/dev/null").expect_err("not an sg node");
    match not_sg.kind {
        SpecErrorKind::Device(BdevError::Scsi { source, .. })
            if matches!(*source, scsi_sg::Error::NotSgCapable { .. }) => {}
        other => panic!("expected NotSgCapable, got {other:?}"),
    }
    let relative = registry.build("sg:sg1").expect_err("not a path");
    assert!(matches!(relative.kind, SpecErrorKind::BadValue { .. }));
    assert_eq!(relative.column, 4);
    let option = registry
        .build("sg:/dev/sg1,bs=512")
        .expect_err("no options");
    assert!(matches!(option.kind, SpecErrorKind::BadValue { .. }));
}

#[test]
fn sgemu_spec_errors_point_at_the_problem() {
    let (registry, _) = registry();
    let size = registry.build("sgemu:1x").expect_err("bad size");
    assert_eq!(size.column, 7);
    let bs = registry.build("sgemu:1m,bs=1000").expect_err("bad bs");
    assert_eq!(bs.column, 10);
    let unknown = registry
        .build("sgemu:1m,foo=1")
        .expect_err("unknown option");
    assert_eq!(unknown.column, 10);
    let rod = registry
        .build("sgemu:1m,rod=maybe")
        .expect_err("bad on/off");
    assert!(matches!(rod.kind, SpecErrorKind::BadValue { .. }));
    registry.build("sgemu:1m,target=x").expect("first LUN");
    let clash = registry
        .build("concat(mem:1m, sgemu:1m,target=x,rod=on)")
        .expect_err("a target's LUNs must agree");
    assert!(clash.to_string().contains("must agree"), "{clash}");
}

/// Submits one offload command and polls its completion.
fn run_copy(ch: &mut dyn bdev_stack::CopyChannel, req: &OffloadRequest<'_>) -> OffloadOutcome {
    ch.submit_copy(req).expect("submit");
    let mut out: Vec<OffloadCompletion> = Vec::with_capacity(1);
    while ch.poll(&mut out, 1) == 0 {}
    out.pop().expect("completion").outcome
}

fn populate(ch: &mut dyn bdev_stack::CopyChannel, ranges: &[LbaRange]) -> OffloadOutcome {
    ch.submit_populate(ranges, 7).expect("submit");
    let mut out: Vec<OffloadCompletion> = Vec::with_capacity(1);
    while ch.poll(&mut out, 1) == 0 {}
    let c = out.pop().expect("completion");
    assert_eq!(c.ctx, 7);
    c.outcome
}

#[test]
fn copy_channel_runs_extended_copy_and_rod_tokens() {
    let target = EmuTarget::new("cc", EmuConfig::default());
    let src: Arc<dyn BlockDevice> =
        Arc::new(ScsiLeaf::from_emu(target.add_memory_lun(512, 512)).expect("src"));
    let dst: Arc<dyn BlockDevice> =
        Arc::new(ScsiLeaf::from_emu(target.add_memory_lun(512, 512)).expect("dst"));
    let data = pattern(21, 200 * 512);
    SyncIo::open(src.as_ref()).write(0, &data).expect("fill");
    let src_naa = src
        .info()
        .copy_offloads
        .iter()
        .find_map(|o| match o {
            CopyOffload::ScsiExtendedCopy { naa, .. } => Some(naa.clone()),
            _ => None,
        })
        .expect("naa");
    let mut ch = dst.open_copy_channel(4).expect("open").expect("a channel");

    // EXTENDED COPY: src 10..30 -> dst 100..120 (LIO's limit: one segment).
    let ranges = [OffloadRange {
        src: 10,
        dst: 100,
        blocks: 20,
    }];
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::Designator {
                naa: &src_naa,
                block_size: 512,
            },
            ranges: &ranges,
            ctx: 1,
        },
    );
    assert_eq!(outcome, OffloadOutcome::Done);
    let mut io = SyncIo::open(dst.as_ref());
    assert!(io.read(100, 20).expect("read") == data[10 * 512..30 * 512]);

    // Over the copy manager's segment limit: refused, nothing sent.
    let two = [
        ranges[0],
        OffloadRange {
            src: 40,
            dst: 140,
            blocks: 4,
        },
    ];
    let before = target.command_count();
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::Designator {
                naa: &src_naa,
                block_size: 512,
            },
            ranges: &two,
            ctx: 2,
        },
    );
    assert!(
        matches!(&outcome, OffloadOutcome::NotDone(e) if e.kind == OffloadErrorKind::Limits),
        "{outcome:?}"
    );
    assert_eq!(target.command_count(), before);

    // POPULATE TOKEN on the source, WRITE USING TOKEN with OFFSET INTO ROD
    // on the destination: ROD = src 50..60 ++ 120..150; offset 5, 25 blocks
    // -> src 55..60 ++ 120..140 into dst 300..305 and 400..420.
    let mut src_ch = src.open_copy_channel(1).expect("open").expect("a channel");
    let token = match populate(
        src_ch.as_mut(),
        &[
            LbaRange {
                lba: 50,
                blocks: 10,
            },
            LbaRange {
                lba: 120,
                blocks: 30,
            },
        ],
    ) {
        OffloadOutcome::Token(t) => t,
        other => panic!("populate: {other:?}"),
    };
    assert_eq!(token.blocks(), 40);
    let wut = [
        OffloadRange {
            src: 5,
            dst: 300,
            blocks: 5,
        },
        OffloadRange {
            src: 10,
            dst: 400,
            blocks: 20,
        },
    ];
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::RodToken(&token),
            ranges: &wut,
            ctx: 3,
        },
    );
    assert_eq!(outcome, OffloadOutcome::Done);
    assert!(io.read(300, 5).expect("read") == data[55 * 512..60 * 512]);
    assert!(io.read(400, 20).expect("read") == data[120 * 512..140 * 512]);

    // Writing a source block revokes the token: TokenInvalid, not written.
    SyncIo::open(src.as_ref())
        .write(125, &[0u8; 512])
        .expect("write source");
    let before = io.read(400, 20).expect("read");
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::RodToken(&token),
            ranges: &wut,
            ctx: 4,
        },
    );
    assert!(
        matches!(&outcome, OffloadOutcome::NotDone(e) if e.kind == OffloadErrorKind::TokenInvalid),
        "{outcome:?}"
    );
    assert_eq!(io.read(400, 20).expect("read"), before);

    // A fresh token, then the target's clock passes its inactivity
    // timeout: TokenExpired.
    let token = match populate(src_ch.as_mut(), &[LbaRange { lba: 0, blocks: 8 }]) {
        OffloadOutcome::Token(t) => t,
        other => panic!("populate: {other:?}"),
    };
    target.advance_clock(Duration::from_secs(3600));
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::RodToken(&token),
            ranges: &[OffloadRange {
                src: 0,
                dst: 0,
                blocks: 8,
            }],
            ctx: 5,
        },
    );
    assert!(
        matches!(&outcome, OffloadOutcome::NotDone(e) if e.kind == OffloadErrorKind::TokenExpired),
        "{outcome:?}"
    );
}

#[test]
fn a_copy_aborted_mid_copy_leaves_the_destination_unknown() {
    let target = EmuTarget::new("abort", EmuConfig::default());
    let src = ScsiLeaf::from_emu(target.add_memory_lun(64, 512)).expect("src");
    let dst = ScsiLeaf::from_emu(target.add_memory_lun(64, 512)).expect("dst");
    let naa = src.identity().naa().expect("naa").to_vec();
    target.inject_fault(Fault {
        lun: Some(1),
        opcode: scsi_sg::cdb::THIRD_PARTY_COPY_OUT,
        service_action: Some(0),
        action: FaultAction::Sense(Sense::new(SenseKey::CopyAborted, 0x0d, 0x01)),
        count: 1,
    });
    let mut ch = dst.open_copy_channel(1).expect("open").expect("a channel");
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::Designator {
                naa: &naa,
                block_size: 512,
            },
            ranges: &[OffloadRange {
                src: 0,
                dst: 8,
                blocks: 8,
            }],
            ctx: 9,
        },
    );
    assert!(
        matches!(&outcome, OffloadOutcome::DestinationUnknown(e) if e.dst_lba == 8 && e.blocks == 8),
        "{outcome:?}"
    );
    // An unsupported command is a clean refusal.
    target.inject_fault(Fault {
        lun: Some(1),
        opcode: scsi_sg::cdb::THIRD_PARTY_COPY_OUT,
        service_action: Some(0),
        action: FaultAction::Sense(Sense::new(SenseKey::IllegalRequest, 0x20, 0x00)),
        count: 1,
    });
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::Designator {
                naa: &naa,
                block_size: 512,
            },
            ranges: &[OffloadRange {
                src: 0,
                dst: 8,
                blocks: 8,
            }],
            ctx: 10,
        },
    );
    assert!(
        matches!(&outcome, OffloadOutcome::NotDone(e) if e.kind == OffloadErrorKind::Unsupported),
        "{outcome:?}"
    );
}

/// Two leaves and a ROD-token source of `blocks` blocks on one target, and
/// a channel on each.
struct RodPair {
    target: EmuTarget,
    src: Arc<dyn BlockDevice>,
    dst: Arc<dyn BlockDevice>,
    data: Vec<u8>,
}

fn rod_pair() -> RodPair {
    let target = EmuTarget::new("rod", EmuConfig::default());
    let leaf = |target: &EmuTarget| -> Arc<dyn BlockDevice> {
        Arc::new(ScsiLeaf::from_emu(target.add_memory_lun(256, 512)).expect("leaf"))
    };
    let (src, dst) = (leaf(&target), leaf(&target));
    let data = pattern(41, 256 * 512);
    SyncIo::open(src.as_ref()).write(0, &data).expect("fill");
    SyncIo::open(dst.as_ref())
        .write(0, &vec![0xee; 256 * 512])
        .expect("fill");
    RodPair {
        target,
        src,
        dst,
        data,
    }
}

fn token_of(outcome: OffloadOutcome) -> bdev_stack::RodToken {
    match outcome {
        OffloadOutcome::Token(t) => t,
        other => panic!("populate: {other:?}"),
    }
}

/// A ROD-token command that ends GOOD having done less than asked.
fn short_transfer(service_action: u8, blocks: u64) -> Fault {
    Fault {
        lun: None,
        opcode: scsi_sg::cdb::THIRD_PARTY_COPY_OUT,
        service_action: Some(u16::from(service_action)),
        action: FaultAction::ShortTransfer { blocks },
        count: 1,
    }
}

/// A POPULATE TOKEN whose ROD represents fewer blocks than asked gives a
/// token of the blocks RECEIVE ROD TOKEN INFORMATION counts, not of the
/// blocks asked for.
#[test]
fn a_short_populate_token_gives_a_token_of_what_the_rod_holds() {
    let pair = rod_pair();
    pair.target
        .inject_fault(short_transfer(scsi_sg::cdb::TPC_OUT_POPULATE_TOKEN, 13));
    let mut src_ch = pair
        .src
        .open_copy_channel(1)
        .expect("open")
        .expect("a channel");
    let ranges = [
        LbaRange { lba: 0, blocks: 10 },
        LbaRange {
            lba: 100,
            blocks: 30,
        },
    ];
    let token = token_of(populate(src_ch.as_mut(), &ranges));
    assert_eq!(token.blocks(), 13);
    // Unhurt, the same ranges give a whole token.
    assert_eq!(token_of(populate(src_ch.as_mut(), &ranges)).blocks(), 40);
}

/// A WRITE USING TOKEN that ends GOOD while RECEIVE ROD TOKEN INFORMATION
/// counts fewer blocks is partial at that count, and the blocks past it
/// are untouched.
#[test]
fn a_short_write_using_token_is_partial_at_the_transfer_count() {
    let pair = rod_pair();
    let mut src_ch = pair
        .src
        .open_copy_channel(1)
        .expect("open")
        .expect("a channel");
    let token = token_of(populate(
        src_ch.as_mut(),
        &[LbaRange { lba: 0, blocks: 64 }],
    ));
    let mut ch = pair
        .dst
        .open_copy_channel(1)
        .expect("open")
        .expect("a channel");
    pair.target
        .inject_fault(short_transfer(scsi_sg::cdb::TPC_OUT_WRITE_USING_TOKEN, 11));
    let ranges = [
        OffloadRange {
            src: 0,
            dst: 10,
            blocks: 8,
        },
        OffloadRange {
            src: 8,
            dst: 50,
            blocks: 24,
        },
    ];
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::RodToken(&token),
            ranges: &ranges,
            ctx: 1,
        },
    );
    assert!(
        matches!(&outcome, OffloadOutcome::Partial { blocks_done: 11, error } if error.dst_lba == 10 && error.blocks == 32),
        "{outcome:?}"
    );
    let mut io = SyncIo::open(pair.dst.as_ref());
    assert!(io.read(10, 8).expect("read") == pair.data[..8 * 512]);
    assert!(io.read(50, 3).expect("read") == pair.data[8 * 512..11 * 512]);
    assert!(
        io.read(53, 21).expect("read").iter().all(|&b| b == 0xee),
        "written past the transfer count"
    );
    // Unhurt, the same command is done.
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::RodToken(&token),
            ranges: &ranges,
            ctx: 2,
        },
    );
    assert_eq!(outcome, OffloadOutcome::Done);
}

/// When RECEIVE ROD TOKEN INFORMATION cannot be read after a WRITE USING
/// TOKEN that ended GOOD, nobody knows how far it went: the destination
/// is unknown, not done.
#[test]
fn a_write_using_token_without_its_information_leaves_the_destination_unknown() {
    let pair = rod_pair();
    let mut src_ch = pair
        .src
        .open_copy_channel(1)
        .expect("open")
        .expect("a channel");
    let token = token_of(populate(
        src_ch.as_mut(),
        &[LbaRange { lba: 0, blocks: 16 }],
    ));
    let mut ch = pair
        .dst
        .open_copy_channel(1)
        .expect("open")
        .expect("a channel");
    pair.target.inject_fault(Fault {
        lun: Some(1),
        opcode: scsi_sg::cdb::THIRD_PARTY_COPY_IN,
        service_action: Some(u16::from(
            scsi_sg::cdb::TPC_IN_RECEIVE_ROD_TOKEN_INFORMATION,
        )),
        action: FaultAction::Sense(Sense::new(SenseKey::HardwareError, 0x44, 0x00)),
        count: 1,
    });
    let outcome = run_copy(
        ch.as_mut(),
        &OffloadRequest {
            source: OffloadSource::RodToken(&token),
            ranges: &[OffloadRange {
                src: 0,
                dst: 0,
                blocks: 16,
            }],
            ctx: 1,
        },
    );
    assert!(
        matches!(&outcome, OffloadOutcome::DestinationUnknown(e) if e.blocks == 16),
        "{outcome:?}"
    );
}

/// What a leaf advertises for EXTENDED COPY: its copy manager and whether
/// its designator was verified unique.
fn xcopy_of(leaf: &dyn BlockDevice) -> (bdev_stack::OffloadDomain, bool) {
    leaf.info()
        .copy_offloads
        .iter()
        .find_map(|o| match o {
            CopyOffload::ScsiExtendedCopy {
                copy_manager,
                designator_unique,
                ..
            } => Some((copy_manager.clone(), *designator_unique)),
            _ => None,
        })
        .expect("EXTENDED COPY offered")
}

/// The copy manager of an emulated LUN is its target object: LUNs of one
/// target share it, same-named targets do not. A designator is verified
/// unique among the target's LUNs, and the leaf's backing names the LUN by
/// it, so two leaves over one LUN are seen to be one set of blocks.
#[test]
fn an_emulated_luns_copy_manager_is_its_target_and_its_backing_its_designator() {
    let target = EmuTarget::new("same", EmuConfig::default());
    let namesake = EmuTarget::new("same", EmuConfig::default());
    let a = ScsiLeaf::from_emu(target.add_memory_lun(64, 512)).expect("a");
    let b = ScsiLeaf::from_emu(target.add_memory_lun(64, 512)).expect("b");
    let a_again = ScsiLeaf::from_emu(target.lun(0).expect("lun 0")).expect("a again");
    let c = ScsiLeaf::from_emu(namesake.add_memory_lun(64, 512)).expect("c");
    let (manager_a, unique_a) = xcopy_of(&a);
    assert!(unique_a);
    assert_eq!(manager_a, xcopy_of(&b).0);
    assert_ne!(manager_a, xcopy_of(&c).0);
    assert_ne!(a.info().id, a_again.info().id);
    assert_eq!(a.backing(), a_again.backing());
    assert!(matches!(a.backing(), bdev_stack::BackingId::Lun { .. }));
    assert_ne!(a.backing(), b.backing());
    assert_ne!(a.backing(), c.backing());

    // A LUN that repeats another's designator is verified by neither; a
    // leaf opened after the repeat sees it, and its backing is its own.
    let naa = target.lun_designator(1).expect("designator");
    let twin =
        ScsiLeaf::from_emu(target.add_memory_lun_with_designator(64, 512, naa)).expect("twin");
    let b_again = ScsiLeaf::from_emu(target.lun(1).expect("lun 1")).expect("b again");
    assert!(!xcopy_of(&twin).1);
    assert!(!xcopy_of(&b_again).1);
    assert_eq!(
        twin.backing(),
        bdev_stack::BackingId::Device(twin.info().id)
    );
}
