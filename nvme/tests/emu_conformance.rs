//! The conformance suite on the in-process emulated controller (the same
//! functions the VM tests run on QEMU through VFIO), plus the error paths
//! only the emulator can provoke.

use std::time::Duration;

use nvme::conformance as c;
use nvme::emu::{Backing, EmuConfig, EmuController, EmuMode, Fault, FaultAction, NamespaceConfig};
use nvme::spec::{admin_opc, nvm_opc};
use nvme::{
    Controller, ControllerOptions, DmaContext, Error, IoError, NvmeStatus, QueueOptions,
    SubmitError,
};

fn emu(mode: EmuMode) -> Controller<EmuController> {
    let ctx = DmaContext::host();
    let cfg = EmuConfig {
        mode,
        mqes: 255,
        namespaces: vec![
            NamespaceConfig::memory(512, 64 * 1024),
            NamespaceConfig::memory(4096, 16 * 1024),
        ],
        ..EmuConfig::default()
    };
    let e = EmuController::new(&ctx, cfg).expect("emulator");
    // Shadow doorbells on (they are opt-in): the emulator supports them,
    // and `shadow_doorbells_save_mmio_and_stay_correct` covers both ways.
    let opts = ControllerOptions {
        shadow_doorbells: true,
        ..ControllerOptions::default()
    };
    Controller::new(e, opts).expect("bring-up")
}

fn ok(r: c::Check) {
    if let Err(e) = r {
        panic!("{e}");
    }
}

#[test]
fn identify_consistent() {
    let ctrl = emu(EmuMode::Inline);
    ok(c::identify_consistent(&ctrl));
    assert_eq!(ctrl.namespaces().len(), 2);
    assert_eq!(ctrl.namespaces()[1].block_size, 4096);
    assert_eq!(ctrl.max_transfer(), 512 * 1024, "MDTS 7");
    assert_eq!(ctrl.identify().serial(), "EMU0001");
}

#[test]
fn write_read_verify_inline_512() {
    ok(c::write_read_verify(
        &emu(EmuMode::Inline),
        1,
        &[1, 8, 254],
        1,
    ));
}

#[test]
fn write_read_verify_thread_4k() {
    ok(c::write_read_verify(&emu(EmuMode::Thread), 2, &[1, 32], 2));
}

#[test]
fn copy_multi_range_both_block_sizes() {
    let ctrl = emu(EmuMode::Inline);
    ok(c::copy_multi_range(&ctrl, 1, 3));
    ok(c::copy_multi_range(&ctrl, 2, 4));
}

#[test]
fn copy_over_limits() {
    let ctrl = emu(EmuMode::Inline);
    ok(c::copy_over_limits(&ctrl, 1, c::Quirks::SPEC));
    ok(c::copy_over_mcl(&ctrl, 1, c::Quirks::SPEC));
}

#[test]
fn lba_out_of_range() {
    ok(c::lba_out_of_range(
        &emu(EmuMode::Inline),
        2,
        c::Quirks::SPEC,
    ));
}

#[test]
fn two_queue_pairs_two_threads() {
    ok(c::two_queue_pairs_two_threads(&emu(EmuMode::Inline), 1));
    ok(c::two_queue_pairs_two_threads(&emu(EmuMode::Thread), 2));
}

#[test]
fn reset_with_commands_in_flight() {
    ok(c::reset_with_commands_in_flight(&emu(EmuMode::Inline), 1));
    ok(c::reset_with_commands_in_flight(&emu(EmuMode::Thread), 1));
}

#[test]
fn file_backing_persists() {
    let dir = std::env::temp_dir().join(format!("ustor-emu-{}", std::process::id()));
    let ctx = DmaContext::host();
    let cfg = EmuConfig {
        namespaces: vec![NamespaceConfig {
            backing: Backing::File(dir.clone()),
            ..NamespaceConfig::memory(4096, 256)
        }],
        ..EmuConfig::default()
    };
    let e = EmuController::new(&ctx, cfg).expect("emulator");
    let ctrl = Controller::new(e, ControllerOptions::default()).expect("bring-up");
    ok(c::write_read_verify(&ctrl, 1, &[4], 5));
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let buf = ctrl.dma_alloc(4096).expect("buf");
    buf.write_bytes(0, b"persist me").expect("write");
    qp.write(&ns, 3, &buf.as_slice(), 0).expect("submit");
    let done = qp.drain(Duration::from_secs(5)).expect("drain");
    assert_eq!(done[0].result, Ok(0));
    drop(qp);
    let got = ctrl
        .transport()
        .backing_read(1, 3 * 4096, 10)
        .expect("backing");
    assert_eq!(&got, b"persist me");
    drop(ctrl);
    assert_eq!(
        &std::fs::read(&dir).expect("file")[3 * 4096..3 * 4096 + 10],
        b"persist me"
    );
    let _ = std::fs::remove_file(&dir);
}

#[test]
fn injected_status_is_typed_and_named() {
    let ctrl = emu(EmuMode::Inline);
    ctrl.transport().inject(Fault {
        admin: false,
        opcode: nvm_opc::READ,
        nth: 2,
        action: FaultAction::Status(NvmeStatus::UNRECOVERED_READ),
    });
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let buf = ctrl.dma_alloc(3 * 512).expect("buf");
    for i in 0..3 {
        qp.read(&ns, i, &buf.slice(i as usize * 512, 512).expect("s"), i)
            .expect("submit");
    }
    let mut done = qp.drain(Duration::from_secs(5)).expect("drain");
    done.sort_by_key(|c| c.tag);
    assert_eq!(done[0].result, Ok(0));
    assert_eq!(
        done[1].result,
        Err(IoError::Status(NvmeStatus::UNRECOVERED_READ))
    );
    assert_eq!(done[2].result, Ok(0));
    let msg = IoError::Status(NvmeStatus::UNRECOVERED_READ).to_string();
    assert!(msg.contains("Unrecovered Read Error"), "{msg}");
}

#[test]
fn split_request_reports_first_error_once() {
    let ctrl = emu(EmuMode::Inline);
    // A 3 × MDTS write is three commands; fail the second.
    ctrl.transport().inject(Fault {
        admin: false,
        opcode: nvm_opc::WRITE,
        nth: 2,
        action: FaultAction::Status(NvmeStatus::WRITE_FAULT),
    });
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let buf = ctrl.dma_alloc(3 * ctrl.max_transfer()).expect("buf");
    qp.write(&ns, 0, &buf.as_slice(), 42).expect("submit");
    assert_eq!(qp.free_slots(), qp.depth() - 3);
    let done = qp.drain(Duration::from_secs(5)).expect("drain");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].tag, 42);
    assert_eq!(
        done[0].result,
        Err(IoError::Status(NvmeStatus::WRITE_FAULT))
    );
    assert_eq!(qp.free_slots(), qp.depth());
}

#[test]
fn dropped_completion_times_out() {
    let ctrl = emu(EmuMode::Inline);
    ctrl.transport().inject(Fault {
        admin: false,
        opcode: nvm_opc::FLUSH,
        nth: 1,
        action: FaultAction::DropCompletion,
    });
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            entries: 8,
            timeout: Some(Duration::from_millis(50)),
            abort_timeout: Duration::from_millis(50),
        })
        .expect("qp");
    qp.flush(&ns, 9).expect("submit");
    let done = qp.drain(Duration::from_secs(5)).expect("drain");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Err(IoError::Timeout));
    // Reported only once the queue was re-created (the emulator, as QEMU,
    // does not abort): every slot is free again, and the queue works.
    assert_eq!(qp.free_slots(), qp.depth());
    qp.flush(&ns, 10).expect("submit");
    let done = qp.drain(Duration::from_secs(5)).expect("drain");
    assert_eq!(done[0].result, Ok(0));
}

#[test]
fn queue_full_is_a_value() {
    let ctrl = emu(EmuMode::Inline);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            entries: 4,
            timeout: None,
            ..QueueOptions::default()
        })
        .expect("qp");
    assert_eq!(qp.depth(), 3);
    for i in 0..3 {
        qp.flush(&ns, i).expect("room");
    }
    assert_eq!(qp.flush(&ns, 3), Err(SubmitError::QueueFull));
    // A split request needing more slots than free is refused whole.
    let buf = ctrl.dma_alloc(2 * ctrl.max_transfer()).expect("buf");
    let mut n = 0;
    qp.poll(1, |_| n += 1).expect("poll");
    assert_eq!(n, 1);
    assert_eq!(
        qp.write(&ns, 0, &buf.as_slice(), 5),
        Err(SubmitError::QueueFull)
    );
    assert_eq!(qp.drain(Duration::from_secs(5)).expect("drain").len(), 2);
    assert!(matches!(
        qp.write(&ns, 0, &buf.slice(0, 100).expect("s"), 0),
        Err(SubmitError::Invalid(_))
    ));
}

#[test]
fn sq_doorbell_rung_every_n_submissions() {
    let ctx = DmaContext::host();
    let e = EmuController::new(
        &ctx,
        EmuConfig {
            mode: EmuMode::Inline,
            namespaces: vec![NamespaceConfig::memory(4096, 1024)],
            ..EmuConfig::default()
        },
    )
    .expect("emulator");
    // MMIO doorbells only (no shadow), so every ring is counted.
    let ctrl = Controller::new(e, ControllerOptions::default()).expect("bring-up");
    let ns = ctrl.namespace(1).expect("ns");
    let buf = ctrl.dma_alloc(10 * 4096).expect("buf");
    for (every, rung_while_staging) in [(0u16, 0u64), (1, 10), (4, 2), (16, 0)] {
        let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
        qp.set_sq_doorbell_every(every);
        for i in 0..10u64 {
            let s = buf.slice(i as usize * 4096, 4096).expect("slice");
            qp.read(&ns, i, &s, i).expect("submit");
        }
        assert_eq!(qp.doorbell_writes().sq, rung_while_staging, "every {every}");
        // The rest goes with the next poll; nothing is left unrung.
        let done = qp.drain(Duration::from_secs(5)).expect("drain");
        assert_eq!(done.len(), 10, "every {every}");
        assert!(done.iter().all(|c| c.result.is_ok()));
        let extra = u64::from(10 % every.max(1) != 0 || every == 0);
        assert_eq!(
            qp.doorbell_writes().sq,
            rung_while_staging + extra,
            "every {every}"
        );
    }
}

#[test]
fn fatal_status_is_detected() {
    let ctrl = emu(EmuMode::Inline);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    ctrl.transport().set_fatal(true);
    qp.flush(&ns, 1).expect("submit");
    // An idle queue looks at CSTS after about a millisecond without
    // progress.
    let mut err = None;
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if let Err(e) = qp.poll(16, |_| {}) {
            err = Some(e);
            break;
        }
    }
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "{:?}",
        start.elapsed()
    );
    assert!(
        matches!(err, Some(Error::ControllerFatal { .. })),
        "{err:?}"
    );
    assert!(matches!(
        ctrl.check_fatal(),
        Err(Error::ControllerFatal { .. })
    ));
    // Reset recovers: the flush is reported aborted, new I/O works.
    ctrl.reset().expect("reset");
    let done = qp.drain(Duration::from_secs(5)).expect("drain");
    assert_eq!(done[0].result, Err(IoError::Aborted));
    assert_eq!(
        IoError::Aborted.status(),
        Some(NvmeStatus::ABORTED_SQ_DELETION)
    );
    qp.flush(&ns, 2).expect("submit");
    assert_eq!(
        qp.drain(Duration::from_secs(5)).expect("drain")[0].result,
        Ok(0)
    );
}

#[test]
fn admin_errors_are_typed() {
    let ctrl = emu(EmuMode::Inline);
    let sqe = nvme::spec::SubmissionEntry::new(0x7f, 0);
    match ctrl.admin("vendor 0x7f", sqe, 0, None) {
        Err(Error::AdminCommand {
            status, command, ..
        }) => {
            assert_eq!(status, NvmeStatus::INVALID_OPCODE);
            assert_eq!(command, "vendor 0x7f");
        }
        other => panic!("{other:?}"),
    }
    // Delete of a queue that does not exist.
    let sqe = nvme::spec::SubmissionEntry::new(admin_opc::DELETE_SQ, 0).with_cdws(&[40]);
    assert!(matches!(
        ctrl.admin("Delete SQ 40", sqe, 0, None),
        Err(Error::AdminCommand { status, .. }) if status == NvmeStatus::INVALID_QID
    ));
    // Injected admin timeout: dropped completion.
    ctrl.transport().inject(Fault {
        admin: true,
        opcode: admin_opc::GET_FEATURES,
        nth: 1,
        action: FaultAction::DropCompletion,
    });
    let ctx = DmaContext::host();
    let e = EmuController::new(&ctx, EmuConfig::default()).expect("emu");
    let short = Controller::new(
        e,
        ControllerOptions {
            io_queues: 2,
            admin_timeout: Duration::from_millis(50),
            ..ControllerOptions::default()
        },
    )
    .expect("bring-up");
    short.transport().inject(Fault {
        admin: true,
        opcode: admin_opc::GET_FEATURES,
        nth: 1,
        action: FaultAction::DropCompletion,
    });
    let sqe = nvme::spec::SubmissionEntry::new(admin_opc::GET_FEATURES, 0).with_cdws(&[7]);
    assert!(matches!(
        short.admin("Get Features", sqe, 0, None),
        Err(Error::AdminTimeout { .. })
    ));
    // The next command still works (the stale completion never comes).
    let sqe = nvme::spec::SubmissionEntry::new(admin_opc::GET_FEATURES, 0).with_cdws(&[7]);
    let (dw0, _) = short.admin("Get Features", sqe, 0, None).expect("works");
    assert_eq!(dw0, 1 | 1 << 16, "2 queues granted, 0's based");
}

#[test]
fn queue_ids_run_out_and_come_back() {
    let ctx = DmaContext::host();
    let e = EmuController::new(
        &ctx,
        EmuConfig {
            max_io_queues: 2,
            ..EmuConfig::default()
        },
    )
    .expect("emu");
    let ctrl = Controller::new(e, ControllerOptions::default()).expect("bring-up");
    assert_eq!(ctrl.io_queues(), 2);
    let a = ctrl.create_qpair(QueueOptions::default()).expect("q1");
    let b = ctrl.create_qpair(QueueOptions::default()).expect("q2");
    assert!(matches!(
        ctrl.create_qpair(QueueOptions::default()),
        Err(Error::NoFreeQueue { granted: 2, .. })
    ));
    assert_eq!((a.qid(), b.qid()), (1, 2));
    drop(a);
    let c = ctrl
        .create_qpair(QueueOptions::default())
        .expect("q1 again");
    assert_eq!(c.qid(), 1);
}

#[test]
fn write_zeroes_and_deallocate_read_back_zero() {
    let ctrl = emu(EmuMode::Inline);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let buf = ctrl.dma_alloc(64 * 512).expect("buf");
    buf.fill(0xEE);
    qp.write(&ns, 0, &buf.as_slice(), 0).expect("w");
    qp.drain(Duration::from_secs(5)).expect("drain");
    qp.write_zeroes(&ns, 4, 4, 1).expect("wz");
    qp.deallocate(&ns, &[(20, 8), (40, 2)], 2).expect("dsm");
    let done = qp.drain(Duration::from_secs(5)).expect("drain");
    assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
    let rb = ctrl.dma_alloc(64 * 512).expect("buf");
    qp.read(&ns, 0, &rb.as_slice(), 3).expect("r");
    qp.drain(Duration::from_secs(5)).expect("drain");
    let mut got = vec![0u8; 64 * 512];
    rb.read_bytes(0, &mut got).expect("read");
    for (blk, chunk) in got.chunks(512).enumerate() {
        let zero = (4..8).contains(&blk) || (20..28).contains(&blk) || (40..42).contains(&blk);
        let want = if zero { 0 } else { 0xEE };
        assert!(chunk.iter().all(|&b| b == want), "block {blk}");
    }
}

#[test]
fn null_namespace_accepts_io() {
    let ctx = DmaContext::host();
    let e = EmuController::new(
        &ctx,
        EmuConfig {
            namespaces: vec![NamespaceConfig::null(4096, 1 << 20)],
            ..EmuConfig::default()
        },
    )
    .expect("emu");
    let ctrl = Controller::new(e, ControllerOptions::default()).expect("bring-up");
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            entries: 129,
            timeout: None,
            ..QueueOptions::default()
        })
        .expect("qp");
    let buf = ctrl.dma_alloc(4096).expect("buf");
    let s = buf.as_slice();
    for round in 0..10u64 {
        for i in 0..128u64 {
            qp.read(&ns, round * 128 + i, &s, i).expect("submit");
        }
        let done = qp.drain(Duration::from_secs(5)).expect("drain");
        assert_eq!(done.len(), 128);
    }
}

fn emu_with(mode: EmuMode, shadow: bool) -> Controller<EmuController> {
    let ctx = DmaContext::host();
    let e = EmuController::new(
        &ctx,
        EmuConfig {
            mode,
            mqes: 63,
            namespaces: vec![NamespaceConfig::memory(512, 8192)],
            ..EmuConfig::default()
        },
    )
    .expect("emulator");
    Controller::new(
        e,
        ControllerOptions {
            shadow_doorbells: shadow,
            ..ControllerOptions::default()
        },
    )
    .expect("bring-up")
}

#[test]
fn doorbells_are_batched_with_and_without_shadow() {
    for mode in [EmuMode::Inline, EmuMode::Thread] {
        let mut writes = Vec::new();
        for shadow in [false, true] {
            let ctrl = emu_with(mode, shadow);
            ok(c::write_read_verify(&ctrl, 1, &[1, 16, 62], 11));
            ok(c::reset_with_commands_in_flight(&ctrl, 1));
            let ns = ctrl.namespace(1).expect("ns");
            let mut qp = ctrl
                .create_qpair(QueueOptions {
                    entries: 64,
                    timeout: None,
                    ..QueueOptions::default()
                })
                .expect("qp");
            let buf = ctrl.dma_alloc(512).expect("buf");
            let before = ctrl.transport().doorbell_writes();
            for i in 0..1000u64 {
                qp.read(&ns, i % 8192, &buf.as_slice(), i).expect("submit");
                let done = qp.drain(Duration::from_secs(5)).expect("drain");
                assert_eq!(done.len(), 1);
            }
            writes.push(ctrl.transport().doorbell_writes() - before);
        }
        // One SQ tail doorbell per command (each drain waits for the
        // completion); CQ head doorbells batched to one per half queue (32
        // entries here). Thread mode adds the driver's insurance MMIO write
        // each millisecond a completion keeps it waiting: how many depends
        // on how busy the host is (a loaded 2-core machine makes waits
        // long), so it is bounded loosely there; a doorbell per poll would
        // still be far beyond it.
        let slack = if mode == EmuMode::Inline { 0 } else { 4000 };
        for (shadow, w) in [false, true].into_iter().zip(&writes) {
            assert!(
                (if shadow { 0 } else { 1000 }..=1000 + 1000 / 32 + 2 + slack).contains(w),
                "{mode:?} shadow {shadow}: {writes:?}"
            );
        }
    }
}

#[test]
fn conformance_without_shadow_doorbells() {
    let ctrl = emu_with(EmuMode::Inline, false);
    ok(c::copy_multi_range(&ctrl, 1, 5));
    ok(c::two_queue_pairs_two_threads(&ctrl, 1));
}

#[test]
fn garbage_completions_are_errors_not_panics() {
    let ctrl = emu(EmuMode::Inline);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            entries: 16,
            timeout: Some(Duration::from_millis(50)),
            abort_timeout: Duration::from_millis(50),
        })
        .expect("qp");
    for (cid, sqhd, what) in [
        (0xfff0, 1, "beyond depth"),
        (9, 1, "idle CID"),
        (0, 999, "SQ head"),
    ] {
        ctrl.transport().inject(Fault {
            admin: false,
            opcode: nvm_opc::FLUSH,
            nth: 1,
            action: FaultAction::Garble { cid, sqhd },
        });
        qp.flush(&ns, 1).expect("submit");
        match qp.poll(16, |c| panic!("garbage completed a request: {c:?}")) {
            Err(Error::BadDeviceData { what: w, .. }) => {
                let key = if what == "SQ head" { "SQ head" } else { "CID" };
                assert!(w.contains(key), "{what}: {w}");
            }
            other => panic!("{what}: {other:?}"),
        }
        // The real command never completes: it times out, and is reported.
        let done = qp.drain(Duration::from_secs(5)).expect("drain");
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].result, Err(IoError::Timeout));
    }
    // Still usable.
    qp.flush(&ns, 2).expect("submit");
    assert_eq!(
        qp.drain(Duration::from_secs(5)).expect("drain")[0].result,
        Ok(0)
    );
}

#[test]
fn error_and_smart_logs() {
    let ctrl = emu(EmuMode::Inline);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let buf = ctrl.dma_alloc(4096).expect("buf");
    for i in 0..3 {
        qp.read(&ns, i, &buf.slice(0, 512).expect("s"), i)
            .expect("submit");
    }
    let sqe = nvme::spec::SubmissionEntry::new(nvm_opc::READ, 77).with_cdws(&[5, 0, 0]);
    qp.submit_raw(sqe, Some(&buf.slice(0, 512).expect("s")), 9)
        .expect("raw");
    let done = qp.drain(Duration::from_secs(5)).expect("drain");
    assert_eq!(done.len(), 4);
    // Error Information log: the bad-namespace read, newest first.
    let numd = 64 * 64 / 4 - 1;
    let sqe = nvme::spec::SubmissionEntry::new(admin_opc::GET_LOG_PAGE, 0xffff_ffff)
        .with_cdws(&[nvme::spec::lid::ERROR_INFO as u32 | ((numd as u32 & 0xffff) << 16)]);
    let (_, page) = ctrl
        .admin("Get Log Page Error Information", sqe, 4096, None)
        .expect("log");
    use zerocopy::FromBytes;
    let e = nvme::spec::ErrorLogEntry::read_from_prefix(&page)
        .expect("entry")
        .0;
    assert!(e.error_count.get() >= 1);
    assert_eq!(e.nsid.get(), 77);
    assert_eq!(e.sqid.get(), qp.qid());
    assert_eq!(
        NvmeStatus::from_field(e.status_field.get()),
        NvmeStatus::INVALID_NAMESPACE
    );
    // SMART: host read commands counted.
    let numd = 512 / 4 - 1;
    let sqe = nvme::spec::SubmissionEntry::new(admin_opc::GET_LOG_PAGE, 0xffff_ffff)
        .with_cdws(&[nvme::spec::lid::SMART as u32 | (numd << 16)]);
    let (_, page) = ctrl
        .admin("Get Log Page SMART", sqe, 512, None)
        .expect("log");
    let smart = nvme::spec::SmartLog::read_from_bytes(&page).expect("smart");
    assert_eq!(nvme::spec::le128_saturating(&smart.host_reads), 3);
    // Unknown log page.
    let sqe =
        nvme::spec::SubmissionEntry::new(admin_opc::GET_LOG_PAGE, 0).with_cdws(&[0x7f | (3 << 16)]);
    assert!(matches!(
        ctrl.admin("Get Log Page 0x7f", sqe, 16, None),
        Err(Error::AdminCommand { status, .. }) if status == NvmeStatus::INVALID_LOG_PAGE
    ));
}

#[test]
fn copy_format_1_only_on_64b_guard_namespaces() {
    use nvme::spec::{CopyRangeFormat0, CopyRangeFormat1, SubmissionEntry};
    use zerocopy::IntoBytes;
    let ctx = DmaContext::host();
    let e = EmuController::new(
        &ctx,
        EmuConfig {
            namespaces: vec![
                NamespaceConfig {
                    pi_64b_guard: true,
                    ..NamespaceConfig::memory(4096, 1024)
                },
                NamespaceConfig::memory(4096, 1024),
            ],
            ..EmuConfig::default()
        },
    )
    .expect("emu");
    let ctrl = Controller::new(e, ControllerOptions::default()).expect("bring-up");
    assert_eq!(
        ctrl.identify().ocfs.get() & 0x3,
        0x3,
        "formats 0 and 1 advertised"
    );
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let data = ctrl.dma_alloc(4096).expect("buf");
    data.fill(0x42);
    let descs = ctrl.dma_alloc(4096).expect("descs");
    let f1 = CopyRangeFormat1 {
        slba: 3.into(),
        nlb: 0.into(),
        ..Default::default()
    };
    let f0 = CopyRangeFormat0 {
        slba: 3.into(),
        nlb: 0.into(),
        ..Default::default()
    };
    let copy = |nsid: u32, format: u32| {
        SubmissionEntry::new(nvm_opc::COPY, nsid).with_cdws(&[9, 0, format << 8])
    };
    let mut run = |sqe: SubmissionEntry, desc: &[u8]| {
        descs.write_bytes(0, desc).expect("desc");
        qp.submit_raw(sqe, Some(&descs.slice(0, desc.len()).expect("s")), 0)
            .expect("submit");
        qp.drain(Duration::from_secs(5)).expect("drain")[0].result
    };
    for nsid in [1, 2] {
        let ns = ctrl.namespace(nsid).expect("ns");
        let mut q2 = ctrl.create_qpair(QueueOptions::default()).expect("qp");
        q2.write(&ns, 3, &data.as_slice(), 0).expect("w");
        q2.drain(Duration::from_secs(5)).expect("drain");
    }
    assert_eq!(
        run(copy(1, 1), f1.as_bytes()),
        Ok(0),
        "format 1 on a 64b-guard namespace"
    );
    assert_eq!(
        run(copy(1, 0), f0.as_bytes()),
        Err(IoError::Status(NvmeStatus::INVALID_FORMAT))
    );
    assert_eq!(run(copy(2, 0), f0.as_bytes()), Ok(0));
    assert_eq!(
        run(copy(2, 1), f1.as_bytes()),
        Err(IoError::Status(NvmeStatus::INVALID_FORMAT))
    );
    assert_eq!(
        run(copy(2, 5), f0.as_bytes()),
        Err(IoError::Status(NvmeStatus::INVALID_FIELD)),
        "format 5 does not exist"
    );
    for nsid in [1, 2] {
        let got = ctrl
            .transport()
            .backing_read(nsid, 9 * 4096, 4096)
            .expect("backing");
        assert!(
            got.iter().all(|&b| b == 0x42),
            "namespace {nsid}: copy landed"
        );
    }
}
