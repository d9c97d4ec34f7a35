//! A command the device may still execute is never handed back: on the
//! emulated controller with one queue's doorbell held back (a stand-in for
//! a device stuck on it), a timed-out command is asked to abort and, when
//! it does not complete, its queue is deleted and re-created before the
//! request is reported. Releasing the held doorbell afterwards must change
//! nothing.

use std::time::{Duration, Instant};

use nvme::emu::{EmuConfig, EmuController, EmuMode, NamespaceConfig};
use nvme::{Controller, ControllerOptions, DmaContext, IoError, QueueOptions};

fn emu() -> Controller<EmuController> {
    let cfg = EmuConfig {
        mode: EmuMode::Inline,
        mqes: 255,
        namespaces: vec![NamespaceConfig::memory(512, 4096)],
        ..EmuConfig::default()
    };
    let emu = EmuController::new(&DmaContext::host(), cfg).expect("emulator");
    Controller::new(emu, ControllerOptions::default()).expect("controller")
}

fn quick_timeouts() -> QueueOptions {
    QueueOptions {
        entries: 16,
        timeout: Some(Duration::from_millis(50)),
        abort_timeout: Duration::from_millis(50),
    }
}

/// Issue scenario 1: a read times out, the caller refills its buffer, the
/// held read is released. Before: the driver reported the timeout at once,
/// and the released read overwrote the caller's data.
#[test]
fn a_timed_out_read_never_lands_in_the_callers_buffer() {
    let ctrl = emu();
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(quick_timeouts()).expect("qp");
    let buf = ctrl.dma_alloc(4096).expect("buffer");
    buf.fill(0xab);
    qp.write(&ns, 0, &buf.as_slice(), 1).expect("submit");
    assert_eq!(
        qp.drain(Duration::from_secs(5)).expect("drain")[0].result,
        Ok(0)
    );

    ctrl.transport().hold_queue(qp.qid(), true);
    buf.fill(0);
    qp.read(&ns, 0, &buf.as_slice(), 2).expect("submit");
    let done = qp.drain(Duration::from_secs(5)).expect("drain");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Err(IoError::Timeout));
    // The buffer is the caller's again: it reuses it.
    buf.fill(0x22);
    ctrl.transport().hold_queue(qp.qid(), false);
    let mut seen = vec![0u8; 4096];
    buf.read_bytes(0, &mut seen).expect("read back");
    assert!(
        seen.iter().all(|&b| b == 0x22),
        "the timed-out read landed in the caller's buffer"
    );
    // The queue pair works on.
    qp.read(&ns, 0, &buf.as_slice(), 3).expect("submit");
    assert_eq!(
        qp.drain(Duration::from_secs(5)).expect("drain")[0].result,
        Ok(0)
    );
    buf.read_bytes(0, &mut seen).expect("read back");
    assert!(seen.iter().all(|&b| b == 0xab));
}

/// Issue scenario 2: a write times out on one queue pair, newer data goes
/// to the same block through another and is acknowledged, then the held
/// write is released. Before: the old write landed later and the
/// acknowledged data was lost.
#[test]
fn a_timed_out_write_never_lands_over_newer_data() {
    let ctrl = emu();
    let ns = ctrl.namespace(1).expect("ns");
    let mut stuck = ctrl.create_qpair(quick_timeouts()).expect("qp");
    let mut other = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let old = ctrl.dma_alloc(512).expect("buffer");
    old.fill(0xaa);
    let new = ctrl.dma_alloc(512).expect("buffer");
    new.fill(0xbb);

    ctrl.transport().hold_queue(stuck.qid(), true);
    stuck.write(&ns, 5, &old.as_slice(), 1).expect("submit");
    let done = stuck.drain(Duration::from_secs(5)).expect("drain");
    assert_eq!(done[0].result, Err(IoError::Timeout));
    other.write(&ns, 5, &new.as_slice(), 2).expect("submit");
    assert_eq!(
        other.drain(Duration::from_secs(5)).expect("drain")[0].result,
        Ok(0)
    );
    ctrl.transport().hold_queue(stuck.qid(), false);

    let back = ctrl.dma_alloc(512).expect("buffer");
    other.read(&ns, 5, &back.as_slice(), 3).expect("submit");
    assert_eq!(
        other.drain(Duration::from_secs(5)).expect("drain")[0].result,
        Ok(0)
    );
    let mut seen = vec![0u8; 512];
    back.read_bytes(0, &mut seen).expect("read back");
    assert!(
        seen.iter().all(|&b| b == 0xbb),
        "an acknowledged write was overwritten by an older one that had timed out"
    );
}

/// A command that completes after its timeout but before the queue is
/// re-created is reported once, with its own result, and nothing else is
/// disturbed.
#[test]
fn a_command_that_completes_while_being_aborted_is_reported_once() {
    let ctrl = emu();
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            abort_timeout: Duration::from_secs(30),
            ..quick_timeouts()
        })
        .expect("qp");
    let buf = ctrl.dma_alloc(512).expect("buffer");
    buf.fill(0x5a);
    ctrl.transport().hold_queue(qp.qid(), true);
    qp.write(&ns, 7, &buf.as_slice(), 1).expect("submit");
    let mut done = Vec::new();
    let start = Instant::now();
    // Past the timeout: the command is being aborted, nothing reported.
    while start.elapsed() < Duration::from_millis(200) {
        qp.poll(8, |c| done.push(c)).expect("poll");
    }
    assert!(
        done.is_empty(),
        "reported while the device may still run it"
    );
    assert_eq!(qp.outstanding(), 1);
    ctrl.transport().hold_queue(qp.qid(), false);
    while done.is_empty() && start.elapsed() < Duration::from_secs(5) {
        qp.poll(8, |c| done.push(c)).expect("poll");
    }
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Ok(0));
    assert_eq!(qp.outstanding(), 0);
    assert_eq!(qp.free_slots(), qp.depth());
}
