//! Stack splitting: how fast a stripe and a concat cut requests at their
//! boundaries, in the copy engine's mapping (`BlockDevice::map`) and on the
//! I/O path (a channel's submit and poll over null NVMe namespaces, so the
//! leaves cost next to nothing and the split is what is measured).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use ustor::bdev_stack::nvme_leaf::dma_allocator_for;
use ustor::bdev_stack::{Access, BlockDevice, Completion, IoRequest, spec};

fn map(c: &mut Criterion) {
    let mut group = c.benchmark_group("stack_map");
    for (name, stack) in [
        (
            "stripe4_chunk4k_1MiB",
            "stripe(chunk=4k, mem:64m, mem:64m, mem:64m, mem:64m)",
        ),
        (
            "concat8_1MiB",
            "concat(mem:1m, mem:1m, mem:1m, mem:1m, mem:1m, mem:1m, mem:1m, mem:1m)",
        ),
    ] {
        let dev = spec::build(stack).expect("stack");
        let mut out = Vec::new();
        // 1 MiB of 512-byte blocks starting mid-chunk / mid-member.
        let (lba, blocks) = (3, 2048);
        dev.map(lba, blocks, Access::Read, &mut out).expect("map");
        group.throughput(Throughput::Elements(out.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                dev.map(black_box(lba), black_box(blocks), Access::Read, &mut out)
                    .expect("map");
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn submit_poll(c: &mut Criterion) {
    let dev: Arc<dyn BlockDevice> =
        spec::build("stripe(chunk=4k, emu:64m,null, emu:64m,null, emu:64m,null, emu:64m,null)")
            .expect("stripe");
    let allocator = dma_allocator_for(&dev).expect("allocator");
    let mut buf = allocator.allocate(64 << 10).expect("buffer");
    let slice = buf.dma_slice();
    let mut ch = dev.open_channel(64).expect("channel");
    let mut done = vec![Completion::EMPTY; 64];
    let mut group = c.benchmark_group("stack_io");
    // A 64 KiB read over 4 KiB chunks: 16 children on 4 leaves.
    group.throughput(Throughput::Elements(16));
    group.bench_function("stripe4_chunk4k_read64k", |b| {
        b.iter(|| {
            // SAFETY: `buf` is library DMA memory that outlives the
            // request, which completes before the next iteration touches
            // it; nothing else uses it.
            unsafe { ch.submit(IoRequest::read(7, 128, slice, 1)) }.expect("submit");
            let mut got = 0;
            while got == 0 {
                got = ch.poll(&mut done);
            }
            black_box(done[0].result.is_ok())
        })
    });
    group.finish();
}

criterion_group!(benches, map, submit_poll);
criterion_main!(benches);
