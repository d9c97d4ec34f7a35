//! The driver's safe submission path takes only buffers of its own DMA
//! context.

use nvme::emu::{EmuConfig, EmuController, EmuMode, NamespaceConfig};
use nvme::{Controller, ControllerOptions, DmaContext, QueueOptions};

fn emu() -> Controller<EmuController> {
    let cfg = EmuConfig {
        mode: EmuMode::Inline,
        namespaces: vec![NamespaceConfig::memory(512, 4096)],
        ..EmuConfig::default()
    };
    let emu = EmuController::new(&DmaContext::host(), cfg).expect("emulator");
    Controller::new(emu, ControllerOptions::default()).expect("controller")
}

/// A buffer of another DMA context has an IOVA that means another buffer
/// here: the safe submission path refuses it before the device sees it.
#[test]
fn a_buffer_of_another_dma_context_is_refused() {
    let ctrl = emu();
    let ns = ctrl.namespace(1).expect("ns");
    let mut qp = ctrl.create_qpair(QueueOptions::default()).expect("qp");
    let other = DmaContext::host();
    let foreign = other.alloc(4096).expect("buffer");
    match qp.read(&ns, 0, &foreign.as_slice(), 1) {
        Err(nvme::SubmitError::Invalid(why)) => assert!(why.contains("DMA context"), "{why}"),
        other => panic!("a foreign buffer was taken: {other:?}"),
    }
    assert_eq!(qp.outstanding(), 0);
}
