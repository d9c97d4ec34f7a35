//! The durable write-intent bitmap's cost: random 4 KiB writes at QD 32 on
//! a two-leg mirror over emulated NVMe namespaces (null: the leaves cost
//! next to nothing, so the mirror's own work is what is measured), with
//! metadata (bits made durable on the members before a region's first
//! write, cleared lazily) and without, side by side in one run.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use ustor::bdev_stack::nvme_leaf::dma_allocator_for;
use ustor::bdev_stack::spec::LeafRegistry;
use ustor::bdev_stack::{BlockDevice, Completion, IoRequest, Mirror};

const QD: usize = 32;

fn run(c: &mut Criterion, name: &str, dev: &Arc<dyn BlockDevice>) {
    let allocator = dma_allocator_for(dev).expect("allocator");
    let mut bufs: Vec<_> = (0..QD)
        .map(|_| allocator.allocate(4096).expect("buffer"))
        .collect();
    let slices: Vec<_> = bufs.iter_mut().map(|b| b.dma_slice()).collect();
    let mut ch = dev.open_channel(QD).expect("channel");
    let mut done = vec![Completion::EMPTY; QD];
    let blocks = dev.info().block_count / 8;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut group = c.benchmark_group("mirror_intent");
    group.throughput(Throughput::Elements(QD as u64));
    group.bench_function(name, |b| {
        b.iter(|| {
            for (i, s) in slices.iter().enumerate() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let lba = (x % blocks) * 8;
                // SAFETY: the buffers are library DMA memory that outlive
                // the requests, which complete before the next iteration;
                // nothing else touches them.
                unsafe { ch.submit(IoRequest::write(lba, 8, *s, i as u64)) }.expect("submit");
            }
            let mut got = 0;
            while got < QD {
                got += ch.poll(&mut done);
            }
        })
    });
    group.finish();
}

fn intent(c: &mut Criterion) {
    let registry = LeafRegistry::with_defaults();
    let leg = || registry.build("emu:64m,null").expect("leaf");
    let plain: Arc<dyn BlockDevice> =
        Arc::new(Mirror::new(vec![leg(), leg()], 2048).expect("mirror"));
    let members = vec![leg(), leg()];
    let allocator = dma_allocator_for(&members[0]).expect("allocator");
    let with_meta: Arc<dyn BlockDevice> =
        // Null legs read zeros: equal, no initial sync needed.
        Arc::new(Mirror::create_assume_clean(members, 2048, allocator).expect("mirror with metadata"));
    run(c, "without_metadata", &plain);
    run(c, "with_durable_bitmap", &with_meta);
}

criterion_group!(benches, intent);
criterion_main!(benches);
