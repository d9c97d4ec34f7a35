//! The copy-offload seam on the offload-capable memory leaf: it copies
//! within itself under NVMe Copy's rules and limits, refuses what breaks
//! them before starting, and injects the faults the copy engine must
//! survive.

mod common;

use std::sync::Arc;

use bdev_stack::{
    BlockDevice, CopyChannel, CopyFault, CopyOffload, DeviceStatus, FaultyDevice, LbaRange,
    MemCopyLimits, MemDevice, OffloadCompletion, OffloadErrorKind, OffloadOutcome, OffloadRange,
    OffloadRequest, OffloadSource, OffloadSubmitError, RodToken, spec,
};
use common::{pattern, read_device};

const BS: usize = 512;

fn leaf(limits: MemCopyLimits) -> (Arc<dyn BlockDevice>, MemDevice) {
    let make = || {
        MemDevice::new(256 * BS as u64, BS as u32, 1 << 20)
            .expect("mem")
            .with_copy_offload(limits)
            .expect("offload")
    };
    (Arc::new(make()), make())
}

fn fill(dev: &Arc<dyn BlockDevice>) -> Vec<u8> {
    let data = pattern(5, 256 * BS);
    common::SyncIo::open(dev.as_ref())
        .write(0, &data)
        .expect("fill");
    data
}

fn run(ch: &mut dyn CopyChannel, req: &OffloadRequest<'_>) -> OffloadOutcome {
    ch.submit_copy(req).expect("accepted");
    let mut out: Vec<OffloadCompletion> = Vec::with_capacity(1);
    while ch.poll(&mut out, 1) == 0 {}
    assert_eq!(out[0].ctx, req.ctx);
    out.remove(0).outcome
}

fn range(src: u64, dst: u64, blocks: u64) -> OffloadRange {
    OffloadRange { src, dst, blocks }
}

#[test]
fn copies_ranges_to_a_contiguous_destination_and_advertises_limits() {
    let limits = MemCopyLimits {
        max_ranges: 3,
        max_range_blocks: 16,
        max_command_blocks: 40,
    };
    let (dev, _) = leaf(limits);
    assert!(matches!(
        dev.info().copy_offloads.as_slice(),
        [CopyOffload::NvmeCopy {
            max_ranges: 3,
            max_range_blocks: 16,
            max_command_blocks: 40,
            ..
        }]
    ));
    let mut data = fill(&dev);
    let mut ch = dev.open_copy_channel(2).expect("open").expect("capable");
    let ranges = [range(0, 100, 16), range(50, 116, 4), range(200, 120, 10)];
    let req = OffloadRequest {
        source: OffloadSource::SameDevice,
        ranges: &ranges,
        ctx: 7,
    };
    assert_eq!(run(ch.as_mut(), &req), OffloadOutcome::Done);
    for r in &ranges {
        let (s, d, n) = (
            r.src as usize * BS,
            r.dst as usize * BS,
            r.blocks as usize * BS,
        );
        data.copy_within(s..s + n, d);
    }
    assert_eq!(read_device(&dev, 0, 256), data);
}

#[test]
fn commands_breaking_the_rules_are_refused_before_starting() {
    let limits = MemCopyLimits {
        max_ranges: 2,
        max_range_blocks: 8,
        max_command_blocks: 12,
    };
    let (dev, _) = leaf(limits);
    let data = fill(&dev);
    let mut ch = dev.open_copy_channel(2).expect("open").expect("capable");
    let cases: [(&[OffloadRange], OffloadErrorKind); 6] = [
        (&[], OffloadErrorKind::OutOfRange),
        (&[range(0, 10, 0)], OffloadErrorKind::OutOfRange),
        (&[range(250, 10, 8)], OffloadErrorKind::OutOfRange),
        (&[range(0, 10, 9)], OffloadErrorKind::Limits),
        (
            &[range(0, 10, 8), range(20, 19, 4)],
            OffloadErrorKind::Limits,
        ),
        (
            &[range(0, 10, 8), range(20, 18, 8)],
            OffloadErrorKind::Limits,
        ),
    ];
    for (ranges, kind) in cases {
        let req = OffloadRequest {
            source: OffloadSource::SameDevice,
            ranges,
            ctx: 0,
        };
        match ch.submit_copy(&req) {
            Err(OffloadSubmitError::Invalid(e)) => {
                assert_eq!(e.kind, kind, "{ranges:?}");
                assert_eq!(e.device, dev.info().id);
            }
            other => panic!("{ranges:?}: {other:?}"),
        }
    }
    assert_eq!(ch.outstanding(), 0);
    assert_eq!(read_device(&dev, 0, 256), data);
}

#[test]
fn other_sources_and_populate_are_not_supported_and_change_nothing() {
    let (dev, _) = leaf(MemCopyLimits::default());
    let data = fill(&dev);
    let mut ch = dev.open_copy_channel(2).expect("open").expect("capable");
    let naa = [0x60u8; 16];
    let ranges = [range(0, 10, 4)];
    let req = OffloadRequest {
        source: OffloadSource::Designator {
            naa: &naa,
            block_size: 512,
        },
        ranges: &ranges,
        ctx: 1,
    };
    assert!(matches!(
        run(ch.as_mut(), &req),
        OffloadOutcome::NotDone(e) if e.kind == OffloadErrorKind::Unsupported
    ));
    let token = RodToken::new(&[0u8; RodToken::LEN], 4, None).expect("token");
    let req = OffloadRequest {
        source: OffloadSource::RodToken(&token),
        ..req
    };
    assert!(matches!(run(ch.as_mut(), &req), OffloadOutcome::NotDone(_)));
    ch.submit_populate(&[LbaRange { lba: 0, blocks: 4 }], 9)
        .expect("accepted");
    let mut out = Vec::with_capacity(1);
    assert_eq!(ch.poll(&mut out, 1), 1);
    assert!(
        matches!(&out[0].outcome, OffloadOutcome::NotDone(e) if matches!(e.status, DeviceStatus::Nvme { .. }))
    );
    assert_eq!(read_device(&dev, 0, 256), data);
}

#[test]
fn faults_are_injected_in_order() {
    let (_, mem) = leaf(MemCopyLimits::default());
    let faults = mem.copy_faults().expect("capable");
    let dev: Arc<dyn BlockDevice> = Arc::new(mem);
    let data = fill(&dev);
    let mut ch = dev.open_copy_channel(4).expect("open").expect("capable");
    faults.push(CopyFault::Clean(OffloadErrorKind::NotExecuted));
    faults.push(CopyFault::Partial { ranges: 1 });
    faults.push(CopyFault::DestinationUnknown);
    let ranges = [range(0, 100, 4), range(10, 104, 4)];
    let req = OffloadRequest {
        source: OffloadSource::SameDevice,
        ranges: &ranges,
        ctx: 0,
    };
    assert!(
        matches!(run(ch.as_mut(), &req), OffloadOutcome::NotDone(e) if e.kind == OffloadErrorKind::NotExecuted)
    );
    assert_eq!(
        read_device(&dev, 0, 256),
        data,
        "a clean failure writes nothing"
    );
    match run(ch.as_mut(), &req) {
        OffloadOutcome::Partial { blocks_done, .. } => assert_eq!(blocks_done, 4),
        other => panic!("{other:?}"),
    }
    let after = read_device(&dev, 100, 8);
    assert_eq!(after[..4 * BS], data[..4 * BS], "the first range is copied");
    assert_ne!(
        after[4 * BS..5 * BS],
        data[10 * BS..11 * BS],
        "the next is scribbled on"
    );
    assert!(matches!(
        run(ch.as_mut(), &req),
        OffloadOutcome::DestinationUnknown(_)
    ));
    assert_eq!(run(ch.as_mut(), &req), OffloadOutcome::Done);
    assert_eq!((faults.commands(), faults.injected()), (4, 3));
}

#[test]
fn a_full_copy_queue_is_busy() {
    let (dev, _) = leaf(MemCopyLimits::default());
    let mut ch = dev.open_copy_channel(1).expect("open").expect("capable");
    let ranges = [range(0, 100, 4)];
    let req = OffloadRequest {
        source: OffloadSource::SameDevice,
        ranges: &ranges,
        ctx: 0,
    };
    ch.submit_copy(&req).expect("first");
    assert_eq!(ch.submit_copy(&req), Err(OffloadSubmitError::Busy));
    assert_eq!(ch.outstanding(), 1);
}

#[test]
fn spec_options_make_offload_capable_leaves() {
    let dev = spec::build("mem:64k,copy=nvme,msrc=3,mssrl=8,mcl=24").expect("spec");
    assert!(matches!(
        dev.info().copy_offloads.as_slice(),
        [CopyOffload::NvmeCopy {
            max_ranges: 4,
            max_range_blocks: 8,
            max_command_blocks: 24,
            ..
        }]
    ));
    assert!(dev.open_copy_channel(1).expect("open").is_some());
    let plain = spec::build("mem:64k").expect("spec");
    assert!(plain.info().copy_offloads.is_empty());
    assert!(plain.open_copy_channel(1).expect("open").is_none());
    for bad in [
        "mem:64k,msrc=3",
        "mem:64k,copy=scsi",
        "mem:64k,copy=nvme,mcl=x",
        "mem:64k,copy=nvme,mcl=0",
    ] {
        assert!(spec::build(bad).is_err(), "{bad}");
    }
    // Virtual devices and fault wrappers have no offload of their own.
    let stripe =
        spec::build("stripe(chunk=8, mem:64k,copy=nvme, mem:64k,copy=nvme)").expect("spec");
    assert!(stripe.open_copy_channel(1).expect("open").is_none());
    let (faulty, _) = FaultyDevice::new(dev);
    assert!(faulty.info().copy_offloads.is_empty());
    assert!(faulty.open_copy_channel(1).expect("open").is_none());
}

#[test]
fn rod_tokens_are_checked_for_length_and_expiry() {
    assert!(RodToken::new(&[0u8; 511], 1, None).is_none());
    let now = std::time::Instant::now();
    let token = RodToken::new(&[1u8; 512], 8, Some(now)).expect("token");
    assert!(token.is_expired(now));
    assert_eq!((token.blocks(), token.bytes().len()), (8, 512));
    assert!(
        !RodToken::new(&[1u8; 512], 8, None)
            .expect("token")
            .is_expired(now)
    );
}
