//! DMA contexts and environments: a buffer of one environment submitted
//! to a leaf of another is refused before it reaches the device, and
//! nobody's memory at that IOVA is touched; the stacks of one registry
//! share one context, those of two registries do not.

use std::sync::Arc;

use bdev_stack::nvme_leaf::dma_allocator_for;
use bdev_stack::spec::LeafRegistry;
use bdev_stack::{
    BdevError, BlockDevice, IoErrorKind, NvmeDmaAllocator, NvmeDmaBuffer, NvmeEnvironment,
    OwnedChannel, Stripe, SubmitError,
};

fn wait(ch: &mut OwnedChannel<NvmeDmaBuffer>) -> (Result<(), bdev_stack::IoError>, NvmeDmaBuffer) {
    let mut done = None;
    while done.is_none() {
        ch.poll(1, |_, result, buf| done = Some((result, buf)));
    }
    let (result, buf) = done.expect("loop ends with a completion");
    (
        result,
        buf.expect("reads and writes give their buffer back"),
    )
}

fn bytes(buf: &NvmeDmaBuffer) -> Vec<u8> {
    let mut out = vec![0u8; buf.len()];
    buf.read_bytes(0, &mut out).expect("read buffer");
    out
}

/// A buffer of `alloc` at exactly `iova` (fresh contexts hand IOVAs out
/// upwards from the same base), with the ones below it kept alive.
fn buffer_at(
    alloc: &NvmeDmaAllocator,
    iova: u64,
    len: usize,
) -> (NvmeDmaBuffer, Vec<NvmeDmaBuffer>) {
    let mut below = Vec::new();
    loop {
        let buf = alloc.alloc(len).expect("buffer");
        let at = buf.inner().iova();
        if at == iova {
            return (buf, below);
        }
        assert!(at < iova, "IOVA {iova:#x} skipped (got {at:#x})");
        below.push(buf);
    }
}

#[test]
fn a_buffer_of_another_environment_is_refused_and_touches_nothing() {
    let ours = LeafRegistry::with_defaults();
    let theirs = LeafRegistry::with_defaults();
    let dev = ours.build("emu:1m").expect("emu");
    let alloc = ours.nvme_environment().emu_allocator();
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(dev.as_ref(), 4).expect("channel");

    // The device holds a pattern; a stranger's buffer of our context holds
    // 0x5a; the foreign buffer sits at the stranger's IOVA in theirs.
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 1) as u8).collect();
    let buf = alloc.alloc(4096).expect("buffer");
    buf.write_bytes(0, &data).expect("fill");
    ch.write(0, 8, buf, 0).map_err(|r| r.error).expect("submit");
    assert!(wait(&mut ch).0.is_ok());
    let stranger = alloc.alloc(4096).expect("buffer");
    stranger.write_bytes(0, &[0x5a; 4096]).expect("fill");
    let (foreign, _below) = buffer_at(
        &theirs.nvme_environment().emu_allocator(),
        stranger.inner().iova(),
        4096,
    );
    foreign.write_bytes(0, &[0xc3; 4096]).expect("fill");
    let (ours_id, theirs_id) = (alloc.context().id(), foreign.dma_context());
    assert_ne!(ours_id, theirs_id);

    let refused = |rejected: bdev_stack::Rejected<NvmeDmaBuffer>| {
        let SubmitError::Invalid(e) = rejected.error else {
            panic!("busy, not refused");
        };
        assert_eq!(
            e.kind,
            IoErrorKind::WrongDmaContext {
                buffer: theirs_id,
                device: ours_id,
            }
        );
        assert!(e.to_string().contains("dma_allocator_for"), "{e}");
        rejected.buf.expect("the buffer comes back")
    };
    // A read would have overwritten the stranger with the device's bytes.
    let foreign = refused(ch.read(0, 8, foreign, 1).expect_err("foreign buffer"));
    // A write would have put the stranger's bytes on the device.
    let foreign = refused(ch.write(0, 8, foreign, 2).expect_err("foreign buffer"));
    assert_eq!(ch.outstanding(), 0, "nothing reached the device");
    assert_eq!(bytes(&stranger), vec![0x5a; 4096], "stranger untouched");
    assert_eq!(
        bytes(&foreign),
        vec![0xc3; 4096],
        "caller's buffer untouched"
    );
    ch.read(0, 8, alloc.alloc(4096).expect("buffer"), 3)
        .map_err(|r| r.error)
        .expect("submit");
    let (result, back) = wait(&mut ch);
    assert!(result.is_ok());
    assert_eq!(bytes(&back), data, "device untouched");
}

#[test]
fn a_stack_refuses_a_foreign_buffer_before_its_leaves() {
    let ours = LeafRegistry::with_defaults();
    let theirs = LeafRegistry::with_defaults();
    let dev = ours
        .build("mirror(stripe(chunk=8, emu:512k, emu:512k), mem:1m)")
        .expect("stack");
    assert_eq!(
        dev.info().dma_context,
        Some(ours.nvme_environment().emu_context().id())
    );
    let foreign = theirs
        .nvme_environment()
        .emu_allocator()
        .alloc(32 * 512)
        .expect("buffer");
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(dev.as_ref(), 4).expect("channel");
    // Refused at the top: the memory leg is not written either, so the
    // legs cannot diverge, and no leg is failed for the caller's mistake.
    let rejected = ch.write(4, 32, foreign, 0).expect_err("foreign buffer");
    assert!(
        matches!(
            rejected.error,
            SubmitError::Invalid(e) if matches!(e.kind, IoErrorKind::WrongDmaContext { .. })
        ),
        "{:?}",
        rejected.error
    );
    assert_eq!(ch.outstanding(), 0);
}

#[test]
fn each_leaf_refuses_what_is_not_its_own_in_a_mixed_stack() {
    let a = LeafRegistry::with_defaults();
    let b = LeafRegistry::with_defaults();
    let (la, lb) = (
        a.build("emu:64k").expect("emu"),
        b.build("emu:64k").expect("emu"),
    );
    let stripe: Arc<dyn BlockDevice> = Arc::new(Stripe::new(vec![la, lb], 8).expect("stripe"));
    assert_eq!(stripe.info().dma_context, None, "no context serves both");
    let buf = a
        .nvme_environment()
        .emu_allocator()
        .alloc(4096)
        .expect("buffer");
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(stripe.as_ref(), 4).expect("channel");
    // Blocks 8..16 are the second leaf's, of the other environment.
    let kind = match ch.write(8, 8, buf, 0) {
        Err(r) => match r.error {
            SubmitError::Invalid(e) => e.kind,
            SubmitError::Busy => panic!("busy"),
        },
        Ok(()) => wait(&mut ch).0.expect_err("refused").kind,
    };
    assert!(
        matches!(kind, IoErrorKind::WrongDmaContext { .. }),
        "{kind:?}"
    );
}

#[test]
fn registries_have_separate_environments() {
    let a = LeafRegistry::with_defaults();
    let b = LeafRegistry::with_defaults();
    assert!(!NvmeEnvironment::same(
        a.nvme_environment(),
        b.nvme_environment()
    ));
    assert!(NvmeEnvironment::same(
        a.nvme_environment(),
        a.clone().nvme_environment()
    ));
    let context = |r: &LeafRegistry| {
        let dev = r.build("emu:64k").expect("emu");
        dma_allocator_for(&dev).expect("allocator").dma_context()
    };
    let (ca, cb) = (context(&a), context(&b));
    assert_eq!(ca, Some(a.nvme_environment().emu_context().id()));
    assert_eq!(cb, Some(b.nvme_environment().emu_context().id()));
    assert_ne!(ca, cb);
    // Over one given environment, two registries are one DMA domain.
    let shared = NvmeEnvironment::new();
    let c = LeafRegistry::with_environment(shared.clone());
    let d = LeafRegistry::with_environment(shared.clone());
    assert_eq!(context(&c), context(&d));
    assert_eq!(context(&c), Some(shared.emu_context().id()));
}

#[test]
fn the_stacks_of_one_registry_share_one_context() {
    let registry = LeafRegistry::with_defaults();
    let stripe = registry
        .build("stripe(chunk=8, emu:512k, emu:512k)")
        .expect("stack");
    let other = registry.build("emu:64k").expect("emu");
    let alloc = dma_allocator_for(&stripe).expect("one context");
    let id = registry.nvme_environment().emu_context().id();
    assert_eq!(alloc.dma_context(), Some(id));
    assert_eq!(
        dma_allocator_for(&other).expect("allocator").dma_context(),
        Some(id)
    );
    // One buffer, split over both leaves, goes and comes back.
    let typed = registry.nvme_environment().emu_allocator();
    let data: Vec<u8> = (0..16 * 512u32).map(|i| (i % 251) as u8).collect();
    let buf = typed.alloc(data.len()).expect("buffer");
    buf.write_bytes(0, &data).expect("fill");
    let mut ch = OwnedChannel::<NvmeDmaBuffer>::open(stripe.as_ref(), 4).expect("channel");
    ch.write(4, 16, buf, 0)
        .map_err(|r| r.error)
        .expect("submit");
    assert!(wait(&mut ch).0.is_ok());
    ch.read(4, 16, typed.alloc(data.len()).expect("buffer"), 1)
        .map_err(|r| r.error)
        .expect("submit");
    let (result, back) = wait(&mut ch);
    assert!(result.is_ok());
    assert_eq!(bytes(&back), data);
}

#[test]
fn a_stack_across_two_environments_has_no_allocator() {
    let a = LeafRegistry::with_defaults().build("emu:64k").expect("emu");
    let b = LeafRegistry::with_defaults().build("emu:64k").expect("emu");
    let stripe: Arc<dyn BlockDevice> = Arc::new(Stripe::new(vec![a, b], 8).expect("stripe"));
    match dma_allocator_for(&stripe) {
        Err(BdevError::InvalidParameter { reason, .. }) => {
            assert!(reason.contains("different DMA contexts"), "{reason}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("no one buffer serves both leaves"),
    }
    // Host memory needs no context: a memory stack gets host buffers.
    let mem = bdev_stack::spec::build("mem:64k").expect("mem");
    assert_eq!(dma_allocator_for(&mem).expect("host").dma_context(), None);
}
