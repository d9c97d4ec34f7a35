//! A controller that disappears (its registers read all ones, as after a
//! surprise removal): every outstanding command and every later one fails
//! with a typed "removed" error within a bounded time, without a hang or a
//! panic, and admin commands fail at once rather than after their timeout.

use std::time::{Duration, Instant};

use nvme::emu::{EmuConfig, EmuController, EmuMode, NamespaceConfig};
use nvme::{Controller, ControllerOptions, DmaContext, Error, IoError, QueueOptions, SubmitError};

fn emu(mode: EmuMode) -> Controller<EmuController> {
    let cfg = EmuConfig {
        mode,
        mqes: 255,
        namespaces: vec![NamespaceConfig::memory(512, 4096)],
        ..EmuConfig::default()
    };
    let emu = EmuController::new(&DmaContext::host(), cfg).expect("emulator");
    Controller::new(emu, ControllerOptions::default()).expect("controller")
}

#[test]
fn removal_fails_outstanding_and_later_commands_with_a_typed_error() {
    for mode in [EmuMode::Inline, EmuMode::Thread] {
        let ctrl = emu(mode);
        let ns = ctrl.namespace(1).expect("ns");
        let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
        let bufs: Vec<_> = (0..8).map(|_| ctrl.dma_alloc(4096).expect("buf")).collect();
        // Commands in flight when the device goes: held back, unexecuted.
        ctrl.transport().hold_queue(qp.qid(), true);
        for (i, b) in bufs.iter().enumerate() {
            b.fill(0x77);
            qp.read(&ns, i as u64 * 8, &b.as_slice(), i as u64)
                .expect("submit");
        }
        qp.ring();
        ctrl.transport().remove();
        let start = Instant::now();
        let mut done = Vec::new();
        while done.len() < bufs.len() {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{mode:?}: outstanding commands not failed in time"
            );
            qp.poll(64, |c| done.push(c))
                .expect("poll of a removed controller");
        }
        assert!(
            done.iter().all(|c| c.result == Err(IoError::Removed)),
            "{done:?}"
        );
        assert_eq!(qp.outstanding(), 0);
        assert_eq!(
            qp.read(&ns, 0, &bufs[0].as_slice(), 99),
            Err(SubmitError::Removed)
        );
        // The device never touched the buffers.
        let mut seen = vec![0u8; 4096];
        for b in &bufs {
            b.read_bytes(0, &mut seen).expect("read back");
            assert!(seen.iter().all(|&x| x == 0x77));
        }
        let admin_start = Instant::now();
        match ctrl.identify_namespace(1) {
            Err(Error::DeviceRemoved { .. }) => {}
            other => panic!("{mode:?}: admin after removal: {other:?}"),
        }
        assert!(admin_start.elapsed() < Duration::from_secs(1));
        // Dropping everything neither hangs nor panics.
        let drop_start = Instant::now();
        drop(qp);
        drop(ctrl);
        assert!(drop_start.elapsed() < Duration::from_secs(1));
    }
}

/// An orderly removal (the platform asks for the device back, as VFIO's
/// device request does on hot unplug): the driver notices within a bounded
/// time, stops the controller, releases the device, and fails what was in
/// flight with the typed error; nothing held runs afterwards.
#[test]
fn a_removal_request_stops_and_releases_the_controller() {
    let ctrl = emu(EmuMode::Thread);
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let buf = ctrl.dma_alloc(4096).expect("buf");
    buf.fill(0x31);
    ctrl.transport().hold_queue(qp.qid(), true);
    qp.read(&ns, 0, &buf.as_slice(), 1).expect("submit");
    qp.ring();
    ctrl.transport().request_removal();
    let start = Instant::now();
    let mut done = Vec::new();
    while done.is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "removal request not handled in time"
        );
        qp.poll(8, |c| done.push(c)).expect("poll");
    }
    assert_eq!(done[0].result, Err(IoError::Removed));
    // Released: the registers read all ones, and what was held never runs.
    assert_eq!(
        nvme::mmio::RegisterAccess::read32(
            nvme::Transport::regs(ctrl.transport()),
            nvme::regs::CSTS
        ),
        u32::MAX
    );
    ctrl.transport().hold_queue(qp.qid(), false);
    let mut seen = vec![0u8; 4096];
    buf.read_bytes(0, &mut seen).expect("read back");
    assert!(seen.iter().all(|&b| b == 0x31));
    assert_eq!(
        qp.read(&ns, 0, &buf.as_slice(), 2),
        Err(SubmitError::Removed)
    );
}
