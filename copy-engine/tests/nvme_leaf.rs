//! The copy engine over NVMe namespace leaves on the emulated controller:
//! pieces whose source and destination are one namespace go out as NVMe
//! Copy commands through the leaf's queue pair, pieces across namespaces
//! are bounced through DMA buffers, and Copy failures the device reports
//! are bounced again; the bytes always equal the reference model.

use std::sync::Arc;

use bdev_stack::NvmeNamespace;
use bdev_stack::nvme_leaf::EmuNamespace;
use bdev_stack::spec::LeafRegistry;
use bdev_stack::{BlockDevice, LbaRange, NvmeDmaBuffer, NvmeEnvironment, OwnedChannel, Stripe};
use copy_engine::{CopyEngine, CopyOptions, CopyReport, Method, RefusalReason};
use nvme::emu::{EmuConfig, EmuController, Fault, FaultAction, NamespaceConfig};
use nvme::spec::nvm_opc;
use nvme::{Controller, ControllerOptions, NvmeStatus};

const BS: usize = 512;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Builds `spec` in `env`: the stacks of one test share its DMA context.
fn build(env: &NvmeEnvironment, spec: &str) -> Arc<dyn BlockDevice> {
    LeafRegistry::with_environment(env.clone())
        .build(spec)
        .expect("stack")
}

/// Whole-device synchronous I/O with DMA buffers of `env`.
fn io(device: &dyn BlockDevice, env: &NvmeEnvironment, write: Option<&[u8]>) -> Vec<u8> {
    let alloc = env.emu_allocator();
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(device, 2).expect("channel");
    let total = device.info().block_count;
    let step = device.info().max_transfer_blocks.min(256);
    let mut out = Vec::new();
    let mut lba = 0;
    while lba < total {
        let run = step.min(total - lba);
        let range = lba as usize * BS..(lba + run) as usize * BS;
        let buf = alloc.alloc(range.len()).expect("buffer");
        match write {
            Some(data) => {
                buf.write_bytes(0, &data[range]).expect("fill");
                ch.write(lba, run, buf, 0)
                    .map_err(|r| r.error)
                    .expect("submit");
            }
            None => ch
                .read(lba, run, buf, 0)
                .map_err(|r| r.error)
                .expect("submit"),
        }
        let mut done = None;
        while done.is_none() {
            ch.poll(1, |_, r, b| done = Some((r, b)));
        }
        let (result, buf) = done.expect("completion");
        result.expect("I/O");
        if write.is_none() {
            let mut bytes = vec![0u8; run as usize * BS];
            buf.expect("buffer back")
                .read_bytes(0, &mut bytes)
                .expect("read back");
            out.extend_from_slice(&bytes);
        }
        lba += run;
    }
    out
}

fn fill(device: &Arc<dyn BlockDevice>, env: &NvmeEnvironment, seed: u64) -> Vec<u8> {
    let data = pattern(seed, device.info().size_bytes() as usize);
    io(device.as_ref(), env, Some(&data));
    data
}

fn model_copy(reference: &mut [u8], src: &[LbaRange], dst: &[LbaRange]) {
    let mut data = Vec::new();
    for r in src {
        data.extend_from_slice(&reference[r.lba as usize * BS..(r.lba + r.blocks) as usize * BS]);
    }
    let mut at = 0;
    for r in dst {
        let len = r.blocks as usize * BS;
        reference[r.lba as usize * BS..][..len].copy_from_slice(&data[at..at + len]);
        at += len;
    }
}

fn engine(env: &NvmeEnvironment) -> CopyEngine {
    CopyEngine::new(CopyOptions {
        allocator: Arc::new(env.emu_allocator()),
        ..CopyOptions::default()
    })
    .expect("engine")
}

fn r(lba: u64, blocks: u64) -> LbaRange {
    LbaRange { lba, blocks }
}

/// Copies within `dev`, checks the bytes against the model, returns the
/// report.
fn copy_checked(
    dev: &Arc<dyn BlockDevice>,
    env: &NvmeEnvironment,
    reference: &mut [u8],
    src: &[LbaRange],
    dst: &[LbaRange],
) -> CopyReport {
    let report = engine(env).copy(dev, src, dev, dst).expect("copy");
    assert!(report.is_complete(), "{report}");
    model_copy(reference, src, dst);
    assert!(
        io(dev.as_ref(), env, None) == reference,
        "bytes differ from the model\n{report}"
    );
    report
}

#[test]
fn same_namespace_pieces_are_nvme_copies_and_the_rest_bounce() {
    let env = NvmeEnvironment::new();
    let dev = build(&env, "stripe(chunk=64, emu:1m, emu:1m)");
    let mut reference = fill(&dev, &env, 1);
    // Chunks 0 (leaf 0) and 1 (leaf 1) to chunks 4 (leaf 0) and 5 (leaf 1):
    // each piece stays in its namespace.
    let report = copy_checked(&dev, &env, &mut reference, &[r(0, 128)], &[r(256, 128)]);
    assert_eq!(
        report.method(Method::NvmeCopy).bytes,
        128 * BS as u64,
        "{report}"
    );
    assert_eq!(report.method(Method::Bounce).bytes, 0, "{report}");
    assert!(report.method(Method::NvmeCopy).commands >= 2);

    // Half a chunk off: pieces alternate between staying and crossing.
    // src 32..64 (l0) -> 256..288 (l0) copy; 64..96 (l1) -> 288..320 (l0)
    // bounce; 96..128 (l1) -> 320..352 (l1) copy; 128..160 (l0) ->
    // 352..384 (l1) bounce.
    let report = copy_checked(&dev, &env, &mut reference, &[r(32, 128)], &[r(256, 128)]);
    assert_eq!(
        report.method(Method::NvmeCopy).bytes,
        64 * BS as u64,
        "{report}"
    );
    assert_eq!(
        report.method(Method::Bounce).bytes,
        64 * BS as u64,
        "{report}"
    );

    // A gather of extents bigger than MSSRL (128) and MCL (256): split into
    // several commands, all offloaded.
    let src = [r(512, 64), r(1024, 64), r(1536, 64), r(0, 64)];
    let dst = [r(2560, 256)];
    let report = copy_checked(&dev, &env, &mut reference, &src, &dst);
    // 2560.. is chunk 40 (leaf 0): sources in chunks 8, 16, 24, 0 (leaf 0)
    // land in chunks 40 and 42 (leaf 0); the others cross.
    assert_eq!(
        report.method(Method::NvmeCopy).bytes + report.method(Method::Bounce).bytes,
        256 * BS as u64
    );
    assert!(report.method(Method::NvmeCopy).bytes > 0, "{report}");
}

#[test]
fn copies_between_namespaces_bounce() {
    let env = NvmeEnvironment::new();
    let a = build(&env, "emu:1m");
    let b = build(&env, "emu:1m");
    let data = fill(&a, &env, 2);
    let report = engine(&env)
        .copy(&a, &[r(10, 300)], &b, &[r(700, 300)])
        .expect("copy");
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.method(Method::NvmeCopy).bytes, 0, "{report}");
    assert_eq!(
        report.method(Method::Bounce).bytes,
        300 * BS as u64,
        "{report}"
    );
    let back = io(b.as_ref(), &env, None);
    assert!(back[700 * BS..1000 * BS] == data[10 * BS..310 * BS]);
    assert!(back[..700 * BS].iter().all(|&x| x == 0));
}

#[test]
fn failed_nvme_copies_are_redone_by_bounce() {
    let env = NvmeEnvironment::new();
    let emu = || {
        env.open_emu_namespace(EmuNamespace::memory(1 << 20, 512))
            .expect("emu")
    };
    let (l0, l1) = (Arc::new(emu()), Arc::new(emu()));
    let dev: Arc<dyn BlockDevice> =
        Arc::new(Stripe::new(vec![l0.clone() as _, l1.clone() as _], 64).expect("stripe"));
    let mut reference = fill(&dev, &env, 3);
    // A media error in the middle of a Copy on leaf 0 (destination
    // unknown), and a size limit on leaf 1 (clean): both bounced.
    l0.controller().transport().inject(Fault {
        admin: false,
        opcode: nvm_opc::COPY,
        nth: 1,
        action: FaultAction::Status(NvmeStatus::WRITE_FAULT),
    });
    l1.controller().transport().inject(Fault {
        admin: false,
        opcode: nvm_opc::COPY,
        nth: 1,
        action: FaultAction::Status(NvmeStatus::CMD_SIZE_LIMIT),
    });
    let report = copy_checked(&dev, &env, &mut reference, &[r(0, 128)], &[r(512, 128)]);
    assert_eq!(report.fallbacks, 2, "{report}");
    assert_eq!(
        report.method(Method::Bounce).bytes,
        128 * BS as u64,
        "{report}"
    );
    // With the faults used up, the same copy is offloaded.
    let report = copy_checked(&dev, &env, &mut reference, &[r(128, 128)], &[r(768, 128)]);
    assert_eq!(report.fallbacks, 0, "{report}");
    assert_eq!(
        report.method(Method::NvmeCopy).bytes,
        128 * BS as u64,
        "{report}"
    );
}

fn emu_namespace(env: &NvmeEnvironment, serial: &str) -> Arc<dyn BlockDevice> {
    let mut ns = NamespaceConfig::memory(512, 2048);
    (ns.msrc, ns.mssrl, ns.mcl) = (15, 128, 256);
    let emu = EmuController::new(
        env.emu_context(),
        EmuConfig {
            serial: serial.to_owned(),
            namespaces: vec![ns],
            ..EmuConfig::default()
        },
    )
    .expect("emulator");
    let ctrl = Controller::new(emu, ControllerOptions::default()).expect("controller");
    Arc::new(NvmeNamespace::new(Arc::new(ctrl), 1).expect("namespace"))
}

/// Issue scenario 4: two controllers that report one subsystem NQN (real
/// drives do; QEMU derives it from `serial=`) are two devices. Before, the
/// engine sent an NVMe Copy to the destination with the source's LBAs, and
/// the destination copied its own blocks.
#[test]
fn controllers_reporting_one_nqn_are_never_paired() {
    let env = NvmeEnvironment::new();
    let a = emu_namespace(&env, "SAMESERIAL");
    let b = emu_namespace(&env, "SAMESERIAL");
    let a_data = fill(&a, &env, 1);
    let mut b_data = fill(&b, &env, 2);
    let mut engine = engine(&env);
    let report = engine
        .copy(&a, &[r(0, 256)], &b, &[r(512, 256)])
        .expect("copy");
    assert!(report.is_complete(), "{report}");
    assert_eq!(report.method(Method::NvmeCopy).bytes, 0, "{report}");
    assert!(
        report
            .refused
            .iter()
            .any(|r| r.reason == RefusalReason::OtherNamespace),
        "{report}"
    );
    b_data[512 * BS..768 * BS].copy_from_slice(&a_data[..256 * BS]);
    assert!(
        io(b.as_ref(), &env, None) == b_data,
        "the destination copied its own blocks"
    );
    // Within one controller, Copy is used as before.
    let report = engine
        .copy(&b, &[r(0, 256)], &b, &[r(1024, 256)])
        .expect("copy");
    assert_eq!(
        report.method(Method::NvmeCopy).bytes,
        256 * BS as u64,
        "{report}"
    );
}
