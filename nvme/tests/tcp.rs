//! The NVMe/TCP initiator against the emulated controller served over
//! NVMe/TCP on loopback: bring-up, I/O of every data path (in capsule,
//! R2T, several C2HData PDUs), digests, Copy, discovery, and the faults a
//! target can commit.

use std::time::Duration;

use nvme::QueueOptions;
use nvme::emu::{EmuConfig, NamespaceConfig};
use nvme::tcp::serve::{ServeConfig, ServeFault, TcpServer};
use nvme::tcp::{TcpController, TcpError, TcpOptions, TcpQueuePair, discover};
use nvme::{Completion, Error, IoError, Namespace};

fn server(cfg: impl FnOnce(&mut ServeConfig)) -> TcpServer {
    let mut c = ServeConfig {
        emu: EmuConfig {
            namespaces: vec![NamespaceConfig::memory(512, 1 << 16)],
            ..EmuConfig::default()
        },
        ..ServeConfig::default()
    };
    cfg(&mut c);
    TcpServer::start(c).expect("serve")
}

fn opts() -> TcpOptions {
    TcpOptions {
        host_nqn: "nqn.2026-01.io.ustor:test-host".into(),
        ..TcpOptions::default()
    }
}

fn connect(s: &TcpServer, o: TcpOptions) -> TcpController {
    TcpController::connect(&s.addr().to_string(), s.subnqn(), o).expect("connect")
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = nvme::conformance::Rng::new(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v);
    v
}

fn drain(qp: &mut TcpQueuePair) -> Vec<Completion> {
    qp.drain(Duration::from_secs(20)).expect("drain")
}

/// Writes `data` at `lba` and reads it back through the queue.
fn write_read(ctrl: &TcpController, qp: &mut TcpQueuePair, ns: &Namespace, lba: u64, data: &[u8]) {
    let buf = ctrl.dma_alloc(data.len()).expect("alloc");
    buf.write_bytes(0, data).expect("fill");
    qp.write(ns, lba, &buf.as_slice(), 1).expect("write");
    let done = drain(qp);
    assert_eq!(done.len(), 1);
    assert_eq!(
        done[0].result.map(|_| ()),
        Ok(()),
        "write of {}",
        data.len()
    );
    let back = ctrl.dma_alloc(data.len()).expect("alloc");
    qp.read(ns, lba, &back.as_slice(), 2).expect("read");
    let done = drain(qp);
    assert_eq!(done[0].result.map(|_| ()), Ok(()), "read of {}", data.len());
    let mut got = vec![0u8; data.len()];
    back.read_bytes(0, &mut got).expect("read back");
    assert!(got == data, "data of {} bytes at {lba} differs", data.len());
}

#[test]
fn connects_identifies_and_moves_data_on_every_path() {
    let s = server(|_| {});
    let ctrl = connect(&s, opts());
    assert_eq!(
        nvme::spec::ascii_field(&ctrl.identify().subnqn),
        s.subnqn(),
        "Identify names the subsystem"
    );
    assert_eq!(ctrl.inline_data(), 8192);
    let ns = ctrl.namespace(1).expect("namespace 1");
    assert_eq!((ns.block_size, ns.blocks), (512, 1 << 16));
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    // In capsule (≤ 8 KiB), by R2T over several H2CData PDUs (the target
    // takes 32 KiB each), and reads over several C2HData PDUs (16 KiB).
    for (i, len) in [512usize, 8192, 8704, 65536, 300 * 512, 1 << 20]
        .into_iter()
        .enumerate()
    {
        write_read(&ctrl, &mut qp, &ns, 64 * i as u64, &pattern(i as u64, len));
    }
    // The backend holds what was written.
    let data = pattern(77, 4096);
    write_read(&ctrl, &mut qp, &ns, 9000, &data);
    let mut direct = vec![0u8; 4096];
    let b = s.backend().dma_alloc(4096).expect("alloc");
    let mut bq = s
        .backend()
        .create_qpair(nvme::QueueOptions::default())
        .expect("qp");
    let bns = s.backend().namespace(1).expect("ns");
    bq.read(&bns, 9000, &b.as_slice(), 0).expect("read");
    bq.drain(Duration::from_secs(5)).expect("drain");
    b.read_bytes(0, &mut direct).expect("bytes");
    assert!(direct == data);
}

#[test]
fn many_commands_in_flight_complete_once_each() {
    // A target that keeps SQ flow control: Connect is sent again without
    // asking to turn it off, and reads end with a response capsule.
    let s = server(|c| c.refuse_sq_flow_off = true);
    let ctrl = connect(&s, opts());
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            entries: 64,
            ..QueueOptions::default()
        })
        .expect("queue");
    let bufs: Vec<_> = (0..63)
        .map(|i| {
            let b = ctrl.dma_alloc(4096).expect("alloc");
            b.write_bytes(0, &pattern(i, 4096)).expect("fill");
            b
        })
        .collect();
    for (i, b) in bufs.iter().enumerate() {
        qp.write(&ns, 8 * i as u64, &b.as_slice(), i as u64)
            .expect("write");
    }
    assert_eq!(
        qp.write(&ns, 0, &bufs[0].as_slice(), 99),
        Err(nvme::SubmitError::QueueFull)
    );
    let done = drain(&mut qp);
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..63).collect::<Vec<_>>());
    assert!(done.iter().all(|c| c.result.is_ok()));
}

#[test]
fn digests_and_the_success_flag_path_work() {
    // Reads end in their last C2HData PDU (SUCCESS flag): the host asks
    // for SQ flow control off.
    let s = server(|_| {});
    let o = TcpOptions {
        header_digest: true,
        data_digest: true,
        ..opts()
    };
    let ctrl = connect(&s, o);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    assert_eq!(qp.digests(), (true, true));
    for (i, len) in [512usize, 8192, 40960, 1 << 20].into_iter().enumerate() {
        write_read(
            &ctrl,
            &mut qp,
            &ns,
            4096 * i as u64,
            &pattern(i as u64 + 5, len),
        );
    }
}

#[test]
fn copy_within_the_namespace_runs_on_the_target() {
    let s = server(|c| {
        c.emu.namespaces = vec![NamespaceConfig {
            msrc: 7,
            mssrl: 64,
            mcl: 256,
            ..NamespaceConfig::memory(512, 1 << 16)
        }];
    });
    let ctrl = connect(&s, opts());
    let ns = ctrl.namespace(1).expect("ns");
    assert_eq!((ns.msrc, ns.mssrl, ns.mcl), (7, 64, 256));
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    let src = pattern(3, 300 * 512);
    write_read(&ctrl, &mut qp, &ns, 1000, &src);
    // 300 blocks in three ranges: split by MSSRL and MCL into commands.
    qp.copy(&ns, &[(1000, 100), (1100, 120), (1220, 80)], 20000, 7)
        .expect("copy");
    let done = drain(&mut qp);
    assert_eq!(done[0].result.map(|_| ()), Ok(()));
    let back = ctrl.dma_alloc(src.len()).expect("alloc");
    qp.read(&ns, 20000, &back.as_slice(), 8).expect("read");
    drain(&mut qp);
    let mut got = vec![0u8; src.len()];
    back.read_bytes(0, &mut got).expect("bytes");
    assert!(got == src, "copied data differs");
    // One command over the limits: the target's status comes back.
    qp.copy_single(&ns, &[(0, 65)], 30000, 9).expect("copy");
    let done = drain(&mut qp);
    assert_eq!(
        done[0].result,
        Err(IoError::Status(nvme::NvmeStatus::CMD_SIZE_LIMIT))
    );
}

#[test]
fn discovery_lists_the_subsystem() {
    let s = server(|_| {});
    let entries = discover(&s.addr().to_string(), opts()).expect("discover");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].subnqn, s.subnqn());
    assert_eq!(entries[0].trsvcid, s.addr().port().to_string());
    assert_eq!(entries[0].traddr, "127.0.0.1");
    assert_eq!(entries[0].subtype_name(), "nvme subsystem");
}

#[test]
fn set_up_failures_are_typed_and_say_what_to_do() {
    let s = server(|c| c.allowed_hosts = vec!["nqn.2026-01.io.ustor:someone-else".into()]);
    let e = TcpController::connect(&s.addr().to_string(), s.subnqn(), opts()).expect_err("host");
    assert!(e.to_string().contains("not allowed"), "{e}");
    let s = server(|_| {});
    let e = TcpController::connect(&s.addr().to_string(), "nqn.2026-01.io.ustor:nope", opts())
        .expect_err("nqn");
    assert!(e.to_string().contains("no such subsystem"), "{e}");
    // Nothing listens on port 1.
    let e = TcpController::connect("127.0.0.1:1", s.subnqn(), opts()).expect_err("dial");
    assert!(
        matches!(&e, Error::Tcp(t) if matches!(**t, TcpError::Dial { .. })),
        "{e}"
    );
    let chain = nvme_chain(&e);
    assert!(chain.contains("refused"), "{chain}");
    let e = TcpController::connect("no-such-host.invalid:4420", s.subnqn(), opts())
        .expect_err("resolve");
    assert!(e.to_string().contains("cannot resolve"), "{e}");
    let e = TcpController::connect(&s.addr().to_string(), &"n".repeat(300), opts())
        .expect_err("long nqn");
    assert!(e.to_string().contains("longer than 223"), "{e}");
}

fn nvme_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Submits `n` 4 KiB reads and returns the buffers (kept alive).
fn reads(
    ctrl: &TcpController,
    qp: &mut TcpQueuePair,
    ns: &Namespace,
    n: u64,
) -> Vec<nvme::DmaBuffer> {
    (0..n)
        .map(|i| {
            let b = ctrl.dma_alloc(4096).expect("alloc");
            qp.read(ns, 8 * i, &b.as_slice(), i).expect("read");
            b
        })
        .collect()
}

fn assert_each_once(done: &[Completion], n: u64) {
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(
        tags,
        (0..n).collect::<Vec<_>>(),
        "every request reported once"
    );
}

#[test]
fn a_target_going_away_completes_everything_once_and_the_queue_reconnects() {
    let s = server(|_| {});
    let ctrl = connect(&s, opts());
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    s.inject(ServeFault::DropAfterExecute);
    let _keep = reads(&ctrl, &mut qp, &ns, 8);
    let done = drain(&mut qp);
    assert_each_once(&done, 8);
    assert!(
        done.iter().all(|c| c.result == Err(IoError::Disconnected)),
        "{done:?}"
    );
    assert!(
        matches!(qp.failure(), Some(TcpError::Closed { .. })),
        "{:?}",
        qp.failure()
    );
    assert_eq!(
        qp.read(&ns, 0, &ctrl.dma_alloc(512).expect("alloc").as_slice(), 1),
        Err(nvme::SubmitError::Disconnected)
    );
    qp.reconnect().expect("reconnect");
    write_read(&ctrl, &mut qp, &ns, 10, &pattern(1, 4096));
}

#[test]
fn a_bad_data_digest_fails_the_connection_never_the_data() {
    let s = server(|_| {});
    let o = TcpOptions {
        data_digest: true,
        ..opts()
    };
    let ctrl = connect(&s, o);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    s.inject(ServeFault::CorruptData);
    let _keep = reads(&ctrl, &mut qp, &ns, 1);
    let done = drain(&mut qp);
    assert_eq!(done[0].result, Err(IoError::Disconnected));
    assert!(
        matches!(
            qp.failure(),
            Some(TcpError::Pdu {
                error: nvme::tcp::pdu::PduError::DataDigest(_),
                ..
            })
        ),
        "{:?}",
        qp.failure()
    );
    qp.reconnect().expect("reconnect");
    write_read(&ctrl, &mut qp, &ns, 0, &pattern(2, 8192));
}

#[test]
fn malformed_pdus_from_the_target_fail_the_queue_with_the_reason() {
    let s = server(|_| {});
    let ctrl = connect(&s, opts());
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    s.inject(ServeFault::GarbleHeader);
    let _keep = reads(&ctrl, &mut qp, &ns, 2);
    let done = drain(&mut qp);
    assert_each_once(&done, 2);
    assert!(matches!(
        qp.failure(),
        Some(TcpError::Pdu {
            error: nvme::tcp::pdu::PduError::HeaderLength { .. },
            ..
        })
    ));
    qp.reconnect().expect("reconnect");
    s.inject(ServeFault::WrongOffset);
    let _keep = reads(&ctrl, &mut qp, &ns, 1);
    let done = drain(&mut qp);
    assert_eq!(done[0].result, Err(IoError::Disconnected));
    let why = qp.failure().map(|f| f.to_string()).unwrap_or_default();
    assert!(why.contains("offset 512"), "{why}");
}

#[test]
fn a_slow_target_times_out_and_late_data_never_lands() {
    let s = server(|_| {});
    let ctrl = connect(&s, opts());
    let ns = ctrl.namespace(1).expect("ns");
    let data = pattern(9, 4096);
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    write_read(&ctrl, &mut qp, &ns, 100, &data);
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            timeout: Some(Duration::from_millis(200)),
            ..QueueOptions::default()
        })
        .expect("queue");
    s.inject(ServeFault::Delay(Duration::from_millis(1500)));
    let buf = ctrl.dma_alloc(4096).expect("alloc");
    buf.fill(0xEE);
    qp.read(&ns, 100, &buf.as_slice(), 5).expect("read");
    let done = drain(&mut qp);
    assert_eq!(done[0].result, Err(IoError::Timeout));
    assert!(matches!(qp.failure(), Some(TcpError::Timeout { .. })));
    // The target answers later, to a closed connection.
    std::thread::sleep(Duration::from_millis(1700));
    let mut got = vec![0u8; 4096];
    buf.read_bytes(0, &mut got).expect("bytes");
    assert!(
        got.iter().all(|&b| b == 0xEE),
        "late data landed in the buffer"
    );
}

#[test]
fn an_unanswered_keep_alive_marks_the_association_down() {
    let s = server(|_| {});
    let o = TcpOptions {
        keep_alive: Duration::from_millis(400),
        admin_timeout: Duration::from_millis(600),
        ..opts()
    };
    let mut ctrl = connect(&s, o);
    assert!(!ctrl.is_down());
    s.inject(ServeFault::IgnoreKeepAlive);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ctrl.is_down() {
        assert!(std::time::Instant::now() < deadline, "still up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = ctrl
        .create_qpair(QueueOptions::default())
        .expect_err("down");
    assert!(e.to_string().contains("association is down"), "{e}");
    ctrl.reconnect().expect("reconnect");
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    write_read(&ctrl, &mut qp, &ns, 0, &pattern(4, 4096));
}

#[test]
fn the_target_resetting_connections_mid_io_reports_each_request_once() {
    let s = server(|_| {});
    let ctrl = connect(&s, opts());
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    s.inject(ServeFault::Delay(Duration::from_millis(300)));
    let _keep = reads(&ctrl, &mut qp, &ns, 16);
    qp.ring();
    std::thread::sleep(Duration::from_millis(100));
    s.reset_connections();
    let done = drain(&mut qp);
    assert_each_once(&done, 16);
    assert!(done.iter().all(|c| c.result == Err(IoError::Disconnected)));
}

/// The conformance checks that are about commands, on the emulated
/// controller reached over NVMe/TCP (the same checks run on QEMU through
/// VFIO, on `ng:` and on Linux nvmet in the VM).
#[test]
fn the_conformance_checks_pass_over_tcp() {
    use nvme::conformance::{self as c, Quirks};
    let s = server(|cfg| {
        cfg.emu.mqes = 255;
        cfg.emu.namespaces = vec![
            NamespaceConfig::memory(512, 64 * 1024),
            NamespaceConfig::memory(4096, 16 * 1024),
        ];
    });
    let ctrl = connect(&s, opts());
    let check = |what: &str, r: c::Check| {
        if let Err(e) = r {
            panic!("{what}: {e}");
        }
    };
    check("identify", c::identify_consistent(&ctrl));
    check("rw 512", c::write_read_verify(&ctrl, 1, &[1, 8, 128], 1));
    check("rw 4096", c::write_read_verify(&ctrl, 2, &[1, 32], 2));
    check("copy", c::copy_multi_range(&ctrl, 1, 3));
    check("copy limits", c::copy_over_limits(&ctrl, 1, Quirks::SPEC));
    check("copy mcl", c::copy_over_mcl(&ctrl, 1, Quirks::SPEC));
    check("lba range", c::lba_out_of_range(&ctrl, 1, Quirks::SPEC));
    check("two queues", c::two_queue_pairs_two_threads(&ctrl, 1));
}

#[test]
fn queues_closed_and_opened_in_quick_succession_all_connect() {
    // The served target keeps a closed queue's id for a while, as nvmet
    // tears queues down in a work item; Connect for it meanwhile is a
    // Command Sequence Error, which the controller must ride out.
    let s = server(|_| {});
    let o = TcpOptions {
        io_queues: 2,
        ..opts()
    };
    let ctrl = connect(&s, o);
    let ns = ctrl.namespace(1).expect("ns");
    for i in 0..12 {
        let mut qp = ctrl
            .create_qpair(QueueOptions::default())
            .unwrap_or_else(|e| panic!("queue {i}: {e}"));
        write_read(&ctrl, &mut qp, &ns, i, &pattern(i, 512));
    }
}

#[test]
fn reconnecting_before_polling_everything_still_reports_each_request_once() {
    // The failure is noticed by a poll that takes one completion; the
    // others wait in the queue while it reconnects. Connect's own answer
    // must never be mistaken for one of them, nor one of them for it.
    let s = server(|_| {});
    let ctrl = connect(&s, opts());
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    s.inject(ServeFault::DropAfterExecute);
    let _keep = reads(&ctrl, &mut qp, &ns, 8);
    let mut done = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while qp.failure().is_none() {
        qp.poll(1, |c| done.push(c)).expect("poll");
        assert!(std::time::Instant::now() < deadline, "never failed");
    }
    qp.reconnect().expect("reconnect");
    done.extend(drain(&mut qp));
    assert_each_once(&done, 8);
    assert!(
        done.iter().all(|c| c.result == Err(IoError::Disconnected)),
        "{done:?}"
    );
    write_read(&ctrl, &mut qp, &ns, 10, &pattern(3, 4096));
}

#[test]
fn a_queue_keeps_its_association_alive_after_the_controller_is_dropped() {
    let s = server(|_| {});
    let o = TcpOptions {
        keep_alive: Duration::from_millis(400),
        ..opts()
    };
    let ctrl = connect(&s, o);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("queue");
    let buf = ctrl.dma_alloc(4096).expect("alloc");
    drop(ctrl);
    // Well past the target's KATO: Keep Alive must have gone on.
    std::thread::sleep(Duration::from_millis(1500));
    buf.write_bytes(0, &pattern(8, 4096)).expect("fill");
    qp.write(&ns, 0, &buf.as_slice(), 1).expect("write");
    let done = drain(&mut qp);
    assert_eq!(done[0].result.map(|_| ()), Ok(()), "{:?}", qp.failure());
}
