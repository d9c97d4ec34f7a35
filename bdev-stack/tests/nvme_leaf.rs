//! The NVMe namespace leaf over the in-process emulated controller: random
//! I/O through stacks of emu leaves (alone, striped, mirrored with a memory
//! leaf, concatenated) reads back what a flat reference array says, and the
//! bytes land in the emulated namespace at the right place; Identify shapes
//! the description; spec errors point at the right place; Copy goes through
//! the queue pair with the device's verdicts mapped to offload outcomes.

mod common;

use std::sync::Arc;

use bdev_stack::nvme_leaf::EmuNamespace;
use bdev_stack::spec::{self, LeafRegistry, SpecErrorKind};
use bdev_stack::{
    BdevError, BlockDevice, CopyOffload, DeviceKind, HostBuffer, IoErrorKind, IoOp,
    NvmeDmaAllocator, NvmeDmaBuffer, NvmeEnvironment, NvmeNamespace, OffloadErrorKind,
    OffloadOutcome, OffloadRange, OffloadRequest, OffloadSource, OffloadSubmitError, OwnedChannel,
    SupportedOps,
};
use common::pattern;
use nvme::NvmeStatus;
use nvme::emu::{EmuConfig, EmuController, Fault, FaultAction, NamespaceConfig};
use nvme::spec::nvm_opc;
use nvme::{Controller, ControllerOptions};
use proptest::prelude::*;

#[path = "support/counting.rs"]
mod counting;

use counting::{CountingAllocator, counted};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// Builds `spec` in `env`.
fn build(env: &NvmeEnvironment, spec: &str) -> Arc<dyn BlockDevice> {
    LeafRegistry::with_environment(env.clone())
        .build(spec)
        .expect("stack builds")
}

/// An emulated namespace opened in `env`.
fn emu(env: &NvmeEnvironment, size: u64, block_size: u32) -> NvmeNamespace<EmuController> {
    env.open_emu_namespace(EmuNamespace::memory(size, block_size))
        .expect("emu")
}

/// Synchronous I/O with DMA buffers of an environment's emulator context.
struct DmaIo {
    ch: OwnedChannel<NvmeDmaBuffer>,
    alloc: NvmeDmaAllocator,
    bs: usize,
    max_blocks: u64,
}

impl DmaIo {
    fn open(device: &dyn BlockDevice, env: &NvmeEnvironment) -> DmaIo {
        DmaIo {
            ch: OwnedChannel::open(device, 8).expect("open channel"),
            alloc: env.emu_allocator(),
            bs: device.info().block_size as usize,
            max_blocks: device.info().max_transfer_blocks.min(512),
        }
    }

    fn wait(&mut self) -> (Result<(), bdev_stack::IoError>, Option<NvmeDmaBuffer>) {
        let mut result = None;
        while result.is_none() {
            self.ch.poll(1, |_, r, buf| result = Some((r, buf)));
        }
        result.expect("loop ends with a result")
    }

    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), bdev_stack::IoError> {
        let blocks = (data.len() / self.bs) as u64;
        let mut done = 0;
        while done < blocks {
            let run = (blocks - done).min(self.max_blocks);
            let bytes = &data[done as usize * self.bs..][..run as usize * self.bs];
            let buf = self.alloc.alloc(bytes.len()).expect("buffer");
            buf.write_bytes(0, bytes).expect("fill");
            self.ch
                .write(lba + done, run, buf, 0)
                .map_err(|r| r.error)
                .expect("submit");
            self.wait().0?;
            done += run;
        }
        Ok(())
    }

    fn read(&mut self, lba: u64, blocks: u64) -> Result<Vec<u8>, bdev_stack::IoError> {
        let mut out = Vec::with_capacity(blocks as usize * self.bs);
        let mut done = 0;
        while done < blocks {
            let run = (blocks - done).min(self.max_blocks);
            let buf = self.alloc.alloc(run as usize * self.bs).expect("buffer");
            self.ch
                .read(lba + done, run, buf, 0)
                .map_err(|r| r.error)
                .expect("submit");
            let (result, buf) = self.wait();
            result?;
            let buf = buf.expect("buffer back");
            let mut bytes = vec![0u8; run as usize * self.bs];
            buf.read_bytes(0, &mut bytes).expect("read back");
            out.extend_from_slice(&bytes);
            done += run;
        }
        Ok(out)
    }

    fn op(&mut self, op: IoOp, lba: u64, blocks: u64) -> Result<(), bdev_stack::IoError> {
        self.ch
            .submit(op, lba, blocks, None, 0)
            .map_err(|r| r.error)
            .expect("submit");
        self.wait().0
    }
}

const STACKS: [&str; 5] = [
    "emu:1m",
    "stripe(chunk=8k, emu:512k, emu:512k, emu:512k)",
    "mirror(emu:1m, mem:1m)",
    "concat(emu:256k, mem:256k, emu:512k,bs=512)",
    "mirror(stripe(chunk=16, emu:512k, emu:512k), mem:1m)",
];

#[derive(Debug, Clone)]
struct Op {
    kind: u8,
    start: u64,
    len: u64,
    seed: u64,
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        (0u8..10, any::<u64>(), 1u64..600, any::<u64>()).prop_map(|(kind, start, len, seed)| Op {
            kind,
            start,
            len,
            seed,
        }),
        1..30,
    )
}

/// Runs `ops` with up to 4 in flight (no overlap with a modification in
/// flight), checking each read against the reference; returns the
/// reference.
fn run(
    device: &Arc<dyn BlockDevice>,
    alloc: &NvmeDmaAllocator,
    ops: &[Op],
) -> Result<Vec<u8>, TestCaseError> {
    let bs = device.info().block_size as usize;
    let total = device.info().block_count;
    let mut reference = vec![0u8; total as usize * bs];
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(device.as_ref(), 4).expect("channel");
    // (lba, blocks, modifies, expected bytes of a read)
    type Flight = Option<(u64, u64, bool, Option<Vec<u8>>)>;
    let mut inflight: Vec<Flight> = vec![None, None, None, None];
    let mut failures: Vec<String> = Vec::new();
    let mut drain = |ch: &mut OwnedChannel<NvmeDmaBuffer>,
                     inflight: &mut Vec<Flight>,
                     done: &dyn Fn(&[Flight]) -> bool| {
        while !done(inflight) {
            ch.poll(8, |ctx, result, buf| {
                let Some((lba, blocks, _, expected)) = inflight[ctx as usize].take() else {
                    failures.push(format!("unknown completion {ctx}"));
                    return;
                };
                if let Err(e) = result {
                    failures.push(e.to_string());
                }
                if let (Some(expected), Some(buf)) = (expected, buf) {
                    let mut got = vec![0u8; expected.len()];
                    if buf.read_bytes(0, &mut got).is_err() || got != expected {
                        failures.push(format!("read of {lba}+{blocks} differs from the reference"));
                    }
                }
            });
        }
    };
    for op in ops {
        let lba = op.start % total;
        let blocks = op
            .len
            .min(total - lba)
            .min(device.info().max_transfer_blocks);
        let io_op = match op.kind {
            0..=3 => IoOp::Write,
            4..=6 => IoOp::Read,
            7 => IoOp::WriteZeroes,
            8 => IoOp::Deallocate,
            _ => IoOp::Flush,
        };
        let modifies = io_op.modifies();
        let conflicts = |list: &[Flight]| {
            list.iter()
                .flatten()
                .any(|(l, b, m, _)| (modifies || *m) && *l < lba + blocks && lba < *l + *b)
        };
        drain(&mut ch, &mut inflight, &|l| !conflicts(l));
        drain(&mut ch, &mut inflight, &|l| l.iter().any(Option::is_none));
        let slot = inflight
            .iter()
            .position(Option::is_none)
            .expect("a free slot");
        let range = lba as usize * bs..(lba + blocks) as usize * bs;
        let (buf, expected) = match io_op {
            IoOp::Write => {
                let data = pattern(op.seed, range.len());
                reference[range.clone()].copy_from_slice(&data);
                let buf = alloc.alloc(data.len()).expect("buffer");
                buf.write_bytes(0, &data).expect("fill");
                (Some(buf), None)
            }
            IoOp::Read => (
                Some(alloc.alloc(range.len()).expect("buffer")),
                Some(reference[range.clone()].to_vec()),
            ),
            IoOp::WriteZeroes | IoOp::Deallocate => {
                reference[range.clone()].fill(0);
                (None, None)
            }
            IoOp::Flush => (None, None),
        };
        inflight[slot] = Some((lba, blocks, modifies, expected));
        ch.submit(io_op, lba, blocks, buf, slot as u64)
            .map_err(|r| r.error)
            .expect("a free slot means the channel has room");
    }
    drain(&mut ch, &mut inflight, &|l| l.iter().all(Option::is_none));
    prop_assert!(failures.is_empty(), "{failures:?}");
    Ok(reference)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn emu_stacks_read_back_the_reference(which in 0usize..STACKS.len(), ops in ops()) {
        let env = NvmeEnvironment::new();
        let device = build(&env, STACKS[which]);
        let reference = run(&device, &env.emu_allocator(), &ops)?;
        let total = device.info().block_count;
        let back = DmaIo::open(device.as_ref(), &env).read(0, total).expect("read back");
        prop_assert!(back == reference, "{}: full read-back differs", STACKS[which]);
    }
}

#[test]
fn writes_land_in_the_namespace_at_their_lba() {
    let env = NvmeEnvironment::new();
    let leaf = Arc::new(emu(&env, 1 << 20, 4096));
    let other = Arc::new(emu(&env, 1 << 20, 4096));
    let stripe: Arc<dyn BlockDevice> = Arc::new(
        bdev_stack::Stripe::new(vec![leaf.clone() as _, other.clone() as _], 2).expect("stripe"),
    );
    let data = pattern(7, 6 * 4096);
    // Stripe blocks 2..8: chunk 1 (leaf `other`, its blocks 0..2), chunk 2
    // (leaf `leaf`, its blocks 2..4), chunk 3 (`other`, blocks 2..4).
    DmaIo::open(stripe.as_ref(), &env)
        .write(2, &data)
        .expect("write");
    let raw = |ns: &NvmeNamespace<EmuController>, lba: u64, blocks: usize| {
        ns.controller()
            .transport()
            .backing_read(1, lba * 4096, blocks * 4096)
            .expect("backing")
    };
    assert_eq!(raw(&other, 0, 2), data[..2 * 4096]);
    assert_eq!(raw(&leaf, 2, 2), data[2 * 4096..4 * 4096]);
    assert_eq!(raw(&other, 2, 2), data[4 * 4096..]);
    assert_eq!(raw(&leaf, 0, 2), vec![0u8; 2 * 4096], "chunk 0 untouched");
}

#[test]
fn identify_shapes_the_description() {
    let dev = spec::build("emu:64m,bs=4096,msrc=3,mssrl=32,mcl=64").expect("emu");
    let info = dev.info();
    assert_eq!(info.kind, DeviceKind::Emulated);
    assert_eq!((info.block_size, info.block_count), (4096, 16384));
    // The emulator's MDTS is 7: 128 pages of 4 KiB.
    assert_eq!(info.max_transfer_blocks, 128);
    assert!(info.needs_iova);
    assert_eq!(
        info.ops,
        SupportedOps::READ
            | SupportedOps::WRITE
            | SupportedOps::FLUSH
            | SupportedOps::WRITE_ZEROES
            | SupportedOps::DEALLOCATE
    );
    match info.copy_offloads.as_slice() {
        [
            CopyOffload::NvmeCopy {
                subsystem,
                nsid: 1,
                max_ranges: 4,
                max_range_blocks: 32,
                max_command_blocks: 64,
                ..
            },
        ] => assert!(subsystem.starts_with("nqn."), "{subsystem}"),
        other => panic!("{other:?}"),
    }
    assert!(dev.open_copy_channel(4).expect("open").is_some());
    // No Copy limits, no Copy.
    let plain = spec::build("emu:1m,mssrl=0").expect("emu");
    assert!(plain.info().copy_offloads.is_empty());
    assert!(plain.open_copy_channel(4).expect("open").is_none());
    // Two emu leaves are two subsystems: the copy engine must not pair them.
    let a = spec::build("emu:1m").expect("emu");
    let b = spec::build("emu:1m").expect("emu");
    assert_ne!(a.info().copy_offloads, b.info().copy_offloads);
}

#[test]
fn host_memory_is_refused_and_limits_hold() {
    let env = NvmeEnvironment::new();
    let dev = build(&env, "emu:1m");
    let mut ch = OwnedChannel::<HostBuffer>::open(dev.as_ref(), 2).expect("channel");
    let buf = HostBuffer::new(4096).expect("buffer");
    let rejected = ch.write(0, 8, buf, 1).expect_err("no IOVA");
    assert_eq!(invalid(rejected.error), IoErrorKind::NotDmaMapped);
    let mut io = DmaIo::open(dev.as_ref(), &env);
    let max = dev.info().max_transfer_blocks;
    let alloc = env.emu_allocator();
    let big = alloc.alloc((max as usize + 1) * 512).expect("buffer");
    let rejected = io.ch.read(0, max + 1, big, 1).expect_err("too large");
    assert_eq!(
        invalid(rejected.error),
        IoErrorKind::TooLarge { max_blocks: max }
    );
    let rejected = io
        .ch
        .read(2047, 2, alloc.alloc(1024).expect("buffer"), 1)
        .expect_err("past the end");
    assert!(matches!(
        invalid(rejected.error),
        IoErrorKind::OutOfRange { block_count: 2048 }
    ));
    // Write zeroes of more commands than the queue can hold is refused
    // up front; a large one within it works.
    io.write(0, &pattern(3, 64 * 512)).expect("write");
    io.op(IoOp::WriteZeroes, 0, 2048).expect("zeroes");
    assert_eq!(io.read(0, 64).expect("read"), vec![0u8; 64 * 512]);
}

#[test]
fn device_errors_reach_the_caller_typed() {
    let env = NvmeEnvironment::new();
    let leaf = emu(&env, 1 << 20, 512);
    leaf.controller().transport().inject(Fault {
        admin: false,
        opcode: nvm_opc::READ,
        nth: 1,
        action: FaultAction::Status(NvmeStatus::UNRECOVERED_READ),
    });
    leaf.controller().transport().inject(Fault {
        admin: false,
        opcode: nvm_opc::WRITE,
        nth: 1,
        action: FaultAction::Status(NvmeStatus::INTERNAL_ERROR),
    });
    let id = leaf.info().id;
    let mut io = DmaIo::open(&leaf, &env);
    let e = io.read(8, 4).expect_err("injected");
    assert_eq!((e.device, e.op, e.lba, e.blocks), (id, IoOp::Read, 8, 4));
    assert_eq!(e.kind, IoErrorKind::Medium);
    let e = io.write(16, &pattern(1, 512)).expect_err("injected");
    assert_eq!(
        e.kind,
        IoErrorKind::Nvme {
            sct: 0,
            sc: 0x06,
            dnr: false
        }
    );
    // And the channel carries on.
    io.write(16, &pattern(1, 512)).expect("write");
    assert_eq!(io.read(16, 1).expect("read"), pattern(1, 512));
}

#[test]
fn a_mirror_hides_a_failing_emu_leg() {
    let env = NvmeEnvironment::new();
    let leg = Arc::new(emu(&env, 1 << 20, 512));
    let mem: Arc<dyn BlockDevice> = spec::build("mem:1m").expect("mem");
    let mirror: Arc<dyn BlockDevice> =
        Arc::new(bdev_stack::Mirror::new(vec![leg.clone() as _, mem], 256).expect("mirror"));
    let mut io = DmaIo::open(mirror.as_ref(), &env);
    io.write(0, &pattern(9, 128 * 512)).expect("write");
    for nth in 1..=2 {
        leg.controller().transport().inject(Fault {
            admin: false,
            opcode: nvm_opc::READ,
            nth,
            action: FaultAction::Status(NvmeStatus::UNRECOVERED_READ),
        });
    }
    for _ in 0..4 {
        assert_eq!(io.read(0, 128).expect("read"), pattern(9, 128 * 512));
    }
}

#[test]
fn block_size_mismatch_and_bad_leaves_are_pointed_at() {
    let spec_text = "stripe(chunk=8, emu:1m, emu:1m,bs=4096)";
    let e = spec::build(spec_text).expect_err("mismatch");
    assert!(
        matches!(
            &e.kind,
            SpecErrorKind::Device(BdevError::BlockSizeMismatch {
                expected: 512,
                found: 4096,
                ..
            })
        ),
        "{e}"
    );
    assert_eq!(e.column, spec_text.find("emu:1m,bs").expect("member") + 1);
    let e = spec::build("mirror(emu:1m,bs=4096, mem:1m)").expect_err("mismatch");
    assert!(matches!(
        e.kind,
        SpecErrorKind::Device(BdevError::BlockSizeMismatch { .. })
    ));

    let column = |text: &str, at: &str| text.find(at).expect("in spec") + 1;
    let text = "emu:1m,bs=1024";
    let e = spec::build(text).expect_err("bs");
    assert_eq!(e.column, column(text, "bs="), "{e}");
    let text = "concat(mem:1m, emu:1m,null=yes)";
    let e = spec::build(text).expect_err("flag with a value");
    assert_eq!(e.column, column(text, "null"), "{e}");
    let text = "emu:1m,bogus";
    let e = spec::build(text).expect_err("unknown flag");
    assert!(matches!(e.kind, SpecErrorKind::BadValue { .. }), "{e}");
    let text = "emu:1000";
    let e = spec::build(text).expect_err("not whole blocks");
    assert!(
        matches!(
            e.kind,
            SpecErrorKind::Device(BdevError::InvalidParameter {
                parameter: "size",
                ..
            })
        ),
        "{e}"
    );
    let text = "stripe(chunk=8, nvme:0000:00:04.0, mem:1m)";
    let e = spec::build(text).expect_err("no nsid");
    assert_eq!(e.column, column(text, "0000"), "{e}");
    assert!(e.to_string().contains("DDDD:BB:DD.F/NSID"), "{e}");
    let text = "nvme:00:04/1";
    let e = spec::build(text).expect_err("bad address");
    assert_eq!(e.column, column(text, "00:04"), "{e}");
    let e = spec::build("nvme:0000:00:04.0/0").expect_err("nsid 0");
    assert!(e.to_string().contains("namespace id"), "{e}");
    // A well-formed address that this host cannot open: the driver's error,
    // typed, whatever this machine has (no VFIO, no such device, not bound).
    let e = spec::build("nvme:0000:7f:1f.7/1").expect_err("no such device here");
    assert!(
        matches!(e.kind, SpecErrorKind::Device(BdevError::Nvme { .. })),
        "{e}"
    );
}

#[test]
fn absent_namespaces_are_named() {
    let env = NvmeEnvironment::new();
    let emu = EmuController::new(
        env.emu_context(),
        EmuConfig {
            serial: "ABSENT".into(),
            namespaces: vec![
                NamespaceConfig::memory(512, 2048),
                NamespaceConfig::memory(4096, 256),
            ],
            ..EmuConfig::default()
        },
    )
    .expect("emu");
    let ctrl = Arc::new(Controller::new(emu, ControllerOptions::default()).expect("bring-up"));
    let e = NvmeNamespace::new(Arc::clone(&ctrl), 3)
        .err()
        .expect("no namespace 3");
    let msg = e.to_string();
    assert!(
        msg.contains("no active namespace 3") && msg.contains("1, 2"),
        "{msg}"
    );
    // Both namespaces of one controller: two leaves, each its own queue
    // pairs, one subsystem.
    let one = NvmeNamespace::new(Arc::clone(&ctrl), 1).expect("ns 1");
    let two = NvmeNamespace::new(ctrl, 2).expect("ns 2");
    assert_eq!(two.info().block_size, 4096);
    let controller = |d: &dyn BlockDevice| match d.info().copy_offloads.first() {
        Some(CopyOffload::NvmeCopy { controller, .. }) => controller.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(controller(&one), controller(&two));
    DmaIo::open(&two, &env)
        .write(3, &pattern(5, 4096))
        .expect("write");
    assert_eq!(
        DmaIo::open(&two, &env).read(3, 1).expect("read"),
        pattern(5, 4096)
    );
}

/// The kind of an invalid-request refusal.
fn invalid(e: bdev_stack::SubmitError) -> IoErrorKind {
    match e {
        bdev_stack::SubmitError::Invalid(e) => e.kind,
        bdev_stack::SubmitError::Busy => panic!("busy, not invalid"),
    }
}

/// Polls a copy channel until one completion arrives.
fn copy_wait(ch: &mut dyn bdev_stack::CopyChannel) -> OffloadOutcome {
    let mut out = Vec::with_capacity(4);
    while out.is_empty() {
        ch.poll(&mut out, 4);
    }
    out.remove(0).outcome
}

#[test]
fn copy_channel_executes_and_maps_device_verdicts() {
    let env = NvmeEnvironment::new();
    let leaf = emu(&env, 1 << 20, 512);
    let mut io = DmaIo::open(&leaf, &env);
    let data = pattern(11, 64 * 512);
    io.write(0, &data).expect("write");
    let mut ch = leaf
        .open_copy_channel(4)
        .expect("open")
        .expect("copy-capable");
    // Gather 0..8 and 32..40 into 100..116.
    let ranges = [
        OffloadRange {
            src: 0,
            dst: 100,
            blocks: 8,
        },
        OffloadRange {
            src: 32,
            dst: 108,
            blocks: 8,
        },
    ];
    let req = OffloadRequest {
        source: OffloadSource::SameDevice,
        ranges: &ranges,
        ctx: 7,
    };
    ch.submit_copy(&req).expect("submit");
    assert_eq!(copy_wait(ch.as_mut()), OffloadOutcome::Done);
    let back = io.read(100, 16).expect("read");
    assert_eq!(back[..8 * 512], data[..8 * 512]);
    assert_eq!(back[8 * 512..], data[32 * 512..40 * 512]);

    // Beyond MSSRL (128): refused before the device sees it.
    let long = [OffloadRange {
        src: 0,
        dst: 500,
        blocks: 129,
    }];
    let e = ch
        .submit_copy(&OffloadRequest {
            ranges: &long,
            ..req
        })
        .expect_err("limits");
    assert!(matches!(e, OffloadSubmitError::Invalid(err) if err.kind == OffloadErrorKind::Limits));
    // More source ranges than MSRC + 1 (16): refused too.
    let many: Vec<OffloadRange> = (0..17)
        .map(|i| OffloadRange {
            src: 2 * i,
            dst: 600 + i,
            blocks: 1,
        })
        .collect();
    let e = ch
        .submit_copy(&OffloadRequest {
            ranges: &many,
            ..req
        })
        .expect_err("MSRC");
    assert!(matches!(e, OffloadSubmitError::Invalid(err) if err.kind == OffloadErrorKind::Limits));
    ch.submit_copy(&OffloadRequest {
        ranges: &many[..16],
        ..req
    })
    .expect("16 ranges fit");
    assert_eq!(copy_wait(ch.as_mut()), OffloadOutcome::Done);
    let back = io.read(600, 16).expect("read");
    for i in 0..16 {
        assert_eq!(
            back[i * 512..][..512],
            data[2 * i * 512..][..512],
            "range {i}"
        );
    }
    // Destinations that do not continue one another cannot be one command.
    let gap = [
        ranges[0],
        OffloadRange {
            dst: 200,
            ..ranges[1]
        },
    ];
    assert!(
        ch.submit_copy(&OffloadRequest {
            ranges: &gap,
            ..req
        })
        .is_err()
    );

    // The device's verdicts: a size limit is a clean failure; a media error
    // leaves the destination unknown.
    let emu = leaf.controller().transport();
    emu.inject(Fault {
        admin: false,
        opcode: nvm_opc::COPY,
        nth: 1,
        action: FaultAction::Status(NvmeStatus::CMD_SIZE_LIMIT),
    });
    ch.submit_copy(&req).expect("submit");
    assert!(matches!(
        copy_wait(ch.as_mut()),
        OffloadOutcome::NotDone(e) if e.kind == OffloadErrorKind::Limits && e.dst_lba == 100 && e.blocks == 16
    ));
    emu.inject(Fault {
        admin: false,
        opcode: nvm_opc::COPY,
        nth: 1,
        action: FaultAction::Status(NvmeStatus::UNRECOVERED_READ),
    });
    ch.submit_copy(&req).expect("submit");
    assert!(matches!(
        copy_wait(ch.as_mut()),
        OffloadOutcome::DestinationUnknown(e) if e.kind == OffloadErrorKind::Medium
    ));
    // Another device's bytes cannot be copied by this namespace.
    let naa = [0x60u8; 16];
    ch.submit_copy(&OffloadRequest {
        source: OffloadSource::Designator {
            naa: &naa,
            block_size: 512,
        },
        ..req
    })
    .expect("submit");
    assert!(matches!(
        copy_wait(ch.as_mut()),
        OffloadOutcome::NotDone(e) if e.kind == OffloadErrorKind::Unsupported
    ));
    assert_eq!(ch.outstanding(), 0);
}

/// Runs `rounds` of 8 requests in flight (writes, reads, write zeroes that
/// cross chunks and members) through `ch`, reusing `buffers`.
fn steady_rounds(
    ch: &mut OwnedChannel<NvmeDmaBuffer>,
    buffers: &mut Vec<NvmeDmaBuffer>,
    blocks: u64,
    rounds: u64,
) -> u64 {
    let mut completed = 0;
    let mut failed = 0;
    for round in 0..rounds {
        for i in 0..8u64 {
            let n = round * 8 + i;
            let lba = (n * 977) % (blocks - 48);
            let op = match n % 5 {
                0 | 1 => IoOp::Write,
                2 | 3 => IoOp::Read,
                _ => IoOp::WriteZeroes,
            };
            let buf = if op.moves_data() { buffers.pop() } else { None };
            if let Err(rejected) = ch.submit(op, lba, 48, buf, n) {
                panic!("submit refused: {}", rejected.error);
            }
        }
        while ch.outstanding() > 0 {
            ch.poll(8, |_, result, buf| {
                completed += 1;
                failed += u64::from(result.is_err());
                if let Some(buf) = buf {
                    buffers.push(buf);
                }
            });
        }
    }
    assert_eq!(failed, 0);
    completed
}

#[test]
fn the_nvme_path_allocates_nothing_per_io() {
    let env = NvmeEnvironment::new();
    let dev = build(&env, "stripe(chunk=16, emu:1m, emu:1m)");
    let blocks = dev.info().block_count;
    // Every block written once: the emulator's sparse store has its chunks.
    DmaIo::open(dev.as_ref(), &env)
        .write(0, &pattern(4, blocks as usize * 512))
        .expect("fill");
    let alloc = env.emu_allocator();
    let mut buffers: Vec<NvmeDmaBuffer> = (0..8)
        .map(|_| alloc.alloc(48 * 512).expect("buffer"))
        .collect();
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(dev.as_ref(), 8).expect("channel");
    steady_rounds(&mut ch, &mut buffers, blocks, 4);
    let (ios, allocations) = counted(|| steady_rounds(&mut ch, &mut buffers, blocks, 50));
    assert_eq!(ios, 400);
    assert_eq!(allocations, 0, "allocations on the NVMe leaf path");
}

/// A controller that disappears (registers read all ones) under a mirror:
/// I/O to its leg fails with `DeviceRemoved` within a bounded time, the
/// mirror fails that leg and keeps serving reads and writes from the other.
#[test]
fn a_removed_controller_fails_its_mirror_leg_and_the_mirror_serves_on() {
    let env = NvmeEnvironment::new();
    let a = Arc::new(
        env.open_emu_namespace(EmuNamespace::memory(1 << 20, 512))
            .expect("emu a"),
    );
    let b = Arc::new(
        env.open_emu_namespace(EmuNamespace::memory(1 << 20, 512))
            .expect("emu b"),
    );
    let mirror = Arc::new(
        bdev_stack::Mirror::new(vec![a.clone() as Arc<dyn BlockDevice>, b.clone() as _], 64)
            .expect("mirror"),
    );
    let mut io = DmaIo::open(mirror.as_ref(), &env);
    let first = pattern(1, 256 * 512);
    io.write(0, &first).expect("write before the removal");

    a.controller().transport().remove();
    let started = std::time::Instant::now();
    // Reads spread over both legs: every one still returns the data.
    for _ in 0..4 {
        assert!(io.read(0, 256).expect("read after the removal") == first);
    }
    let second = pattern(2, 128 * 512);
    io.write(64, &second).expect("write after the removal");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    let health = mirror.health();
    assert_eq!(
        health.legs,
        vec![
            bdev_stack::LegHealth::Failed,
            bdev_stack::LegHealth::Healthy
        ]
    );
    let back = io.read(64, 128).expect("read");
    assert!(back == second);
    // The removed leaf itself opens no new channel, with the typed error.
    match OwnedChannel::<NvmeDmaBuffer>::open(a.as_ref(), 1) {
        Err(BdevError::Nvme { source, .. }) => {
            assert!(
                matches!(*source, nvme::Error::DeviceRemoved { .. }),
                "{source}"
            )
        }
        other => panic!("a removed device opened a channel: {:?}", other.err()),
    }
}
