//! Leaves on their own: the file leaf against the file's bytes, request
//! validation, queue-full as a value, and the fault injector's Nth-op rule.

mod common;

use std::sync::Arc;

use bdev_stack::{
    BlockDevice, Completion, FaultyDevice, FileDevice, HostBuffer, IoErrorKind, IoOp, IoRequest,
    MemDevice, SubmitError,
};
use common::{SyncIo, pattern};

#[test]
fn file_leaf_writes_land_at_their_offsets_in_the_file() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("file-leaf-{}.img", std::process::id()));
    let device = FileDevice::open(&path, 512, Some(1 << 20)).expect("open");
    assert_eq!(device.info().block_count, 2048);
    let mut io = SyncIo::open(&device);
    let data = pattern(1, 300 * 512);
    io.write(1000, &data).expect("write");
    assert_eq!(io.read(1000, 300).expect("read"), data);
    io.op(IoOp::Flush, 0, 0).expect("flush");
    io.op(IoOp::WriteZeroes, 1010, 5).expect("write zeroes");
    io.op(IoOp::Deallocate, 1100, 16).expect("deallocate");
    drop(io);
    drop(device);

    let mut expected = data.clone();
    expected[10 * 512..15 * 512].fill(0);
    expected[100 * 512..116 * 512].fill(0);
    let bytes = std::fs::read(&path).expect("read the file");
    assert_eq!(bytes.len(), 1 << 20);
    assert!(
        bytes[1000 * 512..1300 * 512] == expected[..],
        "file bytes differ"
    );
    assert!(bytes[..1000 * 512].iter().all(|&b| b == 0));
    std::fs::remove_file(&path).expect("remove");
}

#[test]
fn direct_file_leaf_refuses_misaligned_buffers() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("file-align-{}.img", std::process::id()));
    let device = FileDevice::open(&path, 512, Some(1 << 16)).expect("open");
    let mut ch = device.open_channel(1).expect("channel");
    let mut buf = HostBuffer::new(1024).expect("buffer");
    let slice = bdev_stack::DmaMemory::dma_slice(&mut buf)
        .sub(1, 512)
        .expect("inside");
    // SAFETY: `buf` outlives the request, which is refused or polled below.
    let result = unsafe { ch.submit(IoRequest::read(0, 1, slice, 0)) };
    if device.is_direct() {
        match result {
            Err(SubmitError::Invalid(e)) => {
                assert_eq!(e.kind, IoErrorKind::Misaligned { align: 512 })
            }
            other => panic!("misaligned O_DIRECT read accepted: {other:?}"),
        }
    } else {
        eprintln!(
            "SKIP alignment check: O_DIRECT not supported under {}",
            path.display()
        );
        result.expect("buffered I/O takes any alignment");
        let mut out = [Completion::EMPTY];
        while ch.poll(&mut out) == 0 {}
    }
    drop(ch);
    std::fs::remove_file(&path).expect("remove");
}

#[test]
fn invalid_requests_are_refused_with_device_op_and_range() {
    let device = MemDevice::new(64 * 512, 512, 8 * 512).expect("mem");
    let id = device.info().id;
    let mut ch = device.open_channel(4).expect("channel");
    let mut buf = HostBuffer::new(16 * 512).expect("buffer");
    let slice = bdev_stack::DmaMemory::dma_slice(&mut buf);
    let mut refused = |req: IoRequest| {
        // SAFETY: every request here is refused before touching `buf`.
        match unsafe { ch.submit(req) } {
            Err(SubmitError::Invalid(e)) => {
                assert_eq!(
                    (e.device, e.op, e.lba, e.blocks),
                    (id, req.op, req.lba, req.blocks)
                );
                e.kind
            }
            other => panic!("{req:?} accepted: {other:?}"),
        }
    };
    let sub = |blocks: usize| slice.sub(0, blocks * 512).expect("inside");
    assert_eq!(
        refused(IoRequest::read(60, 8, sub(8), 0)),
        IoErrorKind::OutOfRange { block_count: 64 }
    );
    assert_eq!(
        refused(IoRequest::read(0, 16, sub(16), 0)),
        IoErrorKind::TooLarge { max_blocks: 8 }
    );
    assert_eq!(
        refused(IoRequest::write(0, 4, sub(2), 0)),
        IoErrorKind::BufferLength {
            buffer_bytes: 1024,
            transfer_bytes: 2048
        }
    );
    assert_eq!(
        refused(IoRequest::write(0, 0, sub(0), 0)),
        IoErrorKind::Empty
    );
}

#[test]
fn a_full_queue_is_busy_and_drains_by_polling() {
    let device = MemDevice::new(64 * 512, 512, 8 * 512).expect("mem");
    let mut ch = device.open_channel(2).expect("channel");
    // SAFETY: no buffers.
    let submit = |ch: &mut Box<dyn bdev_stack::Channel>, ctx| unsafe {
        ch.submit(IoRequest::no_data(IoOp::WriteZeroes, 0, 4, ctx))
    };
    submit(&mut ch, 1).expect("room");
    submit(&mut ch, 2).expect("room");
    assert_eq!(submit(&mut ch, 3), Err(SubmitError::Busy));
    let mut out = [Completion::EMPTY; 1];
    assert_eq!(ch.poll(&mut out), 1, "poll returns at most out.len()");
    assert_eq!(out[0].ctx, 1);
    submit(&mut ch, 3).expect("room again");
    assert_eq!(ch.outstanding(), 2);
}

#[test]
fn fault_injector_fails_exactly_the_nth_operation() {
    let inner: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::new(64 * 512, 512, 8 * 512).expect("mem"));
    let (device, faults) = FaultyDevice::new(inner);
    let mut io = SyncIo::open(&device);
    faults.fail_nth(3);
    let results: Vec<bool> = (0..5)
        .map(|i| io.op(IoOp::WriteZeroes, i, 1).is_ok())
        .collect();
    assert_eq!(results, [true, true, false, true, true]);
    assert_eq!(faults.injected(), 1);
}

#[test]
fn devices_that_need_an_iova_refuse_host_memory() {
    let device = MemDevice::new(64 * 512, 512, 8 * 512).expect("mem");
    let mut info = device.info().clone();
    info.needs_iova = true;
    let mut buf = HostBuffer::new(512).expect("buffer");
    let host = bdev_stack::DmaMemory::dma_slice(&mut buf);
    let error = info
        .validate(&IoRequest::write(0, 1, host, 0))
        .expect_err("host memory has no IOVA");
    assert_eq!(error.kind, IoErrorKind::NotDmaMapped);
    let context = nvme::DmaContext::host().id();
    // SAFETY: describes `buf` itself, with a made-up IOVA that nothing
    // dereferences: only validation looks at it.
    let mapped = unsafe {
        bdev_stack::DmaSlice::from_raw_parts(
            std::ptr::NonNull::new(host.host_ptr()).expect("non-null"),
            host.len(),
            Some(bdev_stack::DmaAddress {
                iova: 0x1000_0000,
                context,
            }),
        )
    };
    info.validate(&IoRequest::write(0, 1, mapped, 0))
        .expect("a mapped buffer passes");
    assert_eq!(
        mapped.sub(256, 256).and_then(|s| s.iova()),
        Some(0x1000_0100)
    );
    assert_eq!(
        mapped.sub(256, 256).and_then(|s| s.dma_context()),
        Some(context)
    );
    // A device of another context refuses it: its IOVA means nothing there.
    let theirs = nvme::DmaContext::host().id();
    info.dma_context = Some(theirs);
    let error = info
        .validate(&IoRequest::write(0, 1, mapped, 0))
        .expect_err("another context");
    assert_eq!(
        error.kind,
        IoErrorKind::WrongDmaContext {
            buffer: context,
            device: theirs
        }
    );
}

#[test]
fn file_leaf_on_io_uring_keeps_many_requests_in_flight() {
    use bdev_stack::FileEngine;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("file-uring-{}.img", std::process::id()));
    let device = FileDevice::open_with(&path, 512, Some(4 << 20), FileEngine::Uring)
        .expect("io_uring file leaf");
    assert_eq!(device.engine(), FileEngine::Uring);
    let depth = 64;
    let mut ch = device.open_channel(depth).expect("channel");
    // 64 writes of 8 KiB at scattered offsets, all submitted before any
    // poll: the ring holds them together.
    let mut bufs: Vec<HostBuffer> = (0..depth)
        .map(|i| {
            let mut b = HostBuffer::new(8192).expect("buffer");
            b.as_mut_slice()
                .copy_from_slice(&pattern(i as u64 + 7, 8192));
            b
        })
        .collect();
    let lba = |i: usize| ((i * 37) % depth * 16) as u64;
    for (i, b) in bufs.iter_mut().enumerate() {
        let slice = bdev_stack::DmaMemory::dma_slice(b);
        // SAFETY: the buffers outlive the requests, polled to completion.
        unsafe { ch.submit(IoRequest::write(lba(i), 16, slice, i as u64)) }.expect("submit");
    }
    assert_eq!(ch.outstanding(), depth);
    assert!(matches!(
        unsafe { ch.submit(IoRequest::no_data(IoOp::Flush, 0, 0, 99)) },
        Err(SubmitError::Busy)
    ));
    let mut out = vec![Completion::EMPTY; depth];
    let mut done = 0;
    while done < depth {
        let n = ch.poll(&mut out);
        for c in &out[..n] {
            c.result.expect("write");
        }
        done += n;
    }
    assert_eq!(ch.outstanding(), 0);
    drop(ch);
    let bytes = std::fs::read(&path).expect("file");
    for i in 0..depth {
        let at = lba(i) as usize * 512;
        assert!(
            bytes[at..at + 8192] == pattern(i as u64 + 7, 8192)[..],
            "write {i}"
        );
    }
    std::fs::remove_file(&path).expect("remove");
}

/// Pinned memory of this process (`VmPin`), in KiB.
fn pinned_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmPin")
}

#[test]
fn file_leaf_buffers_are_registered_with_its_rings() {
    use bdev_stack::nvme_leaf::dma_allocator_for;
    use bdev_stack::{DmaMemory, FileEngine, OwnedChannel, REGISTERED_BYTES};
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("file-registered-{}.img", std::process::id()));
    let device: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open_with(&path, 512, Some(4 << 20), FileEngine::Uring).expect("file leaf"),
    );
    // The stack's allocator is the leaf's registered memory ...
    let alloc = dma_allocator_for(&device).expect("allocator");
    let before = pinned_kib();
    // ... which a ring opened now registers (pins) once.
    let mut ch = OwnedChannel::<Box<dyn DmaMemory>>::open(&*device, 8).expect("channel");
    let pinned = pinned_kib() - before;
    assert!(
        pinned >= (REGISTERED_BYTES / 1024) as u64,
        "the ring pinned {pinned} KiB"
    );
    // Fixed-buffer writes and reads land and read back.
    for i in 0..8u64 {
        let mut buf = alloc.allocate(4096).expect("buffer");
        buf.fill_from(0, &pattern(i + 100, 4096)).expect("fill");
        ch.write(i * 8, 8, buf, i)
            .map_err(|r| r.error)
            .expect("write");
    }
    let mut done = 0;
    while done < 8 {
        done += ch.poll(8, |_, r, _| r.expect("write"));
    }
    for i in 0..8u64 {
        let buf = alloc.allocate(4096).expect("buffer");
        ch.read(i * 8, 8, buf, i)
            .map_err(|r| r.error)
            .expect("read");
    }
    let mut back = vec![Vec::new(); 8];
    let mut done = 0;
    while done < 8 {
        done += ch.poll(8, |ctx, r, buf| {
            r.expect("read");
            let mut bytes = vec![0u8; 4096];
            buf.expect("buffer").copy_to(0, &mut bytes).expect("copy");
            back[ctx as usize] = bytes;
        });
    }
    for (i, bytes) in back.iter().enumerate() {
        assert!(
            bytes[..] == pattern(i as u64 + 100, 4096)[..],
            "block run {i}"
        );
    }
    drop(ch);
    let file = std::fs::read(&path).expect("file");
    assert!(file[..4096] == pattern(100, 4096)[..]);
    std::fs::remove_file(&path).expect("remove");
}
