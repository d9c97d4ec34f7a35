//! Copy planning throughput: partition intersection, grouping and batching,
//! in pieces per second (target: at least 5 M on one core).

use copy_engine::plan::{CopyLimits, Fragment, batch, intersect, sort_into_groups};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

/// Source: a stripe of 4 leaves with 128-block chunks. Destination: a
/// stripe of 3 leaves with 96-block chunks. The boundaries rarely agree, so
/// nearly every chunk is cut.
fn partitions(total: u64) -> (Vec<Fragment>, Vec<Fragment>) {
    let stripe = |chunk: u64, legs: u32, first_leaf: u32| {
        (0..total.div_ceil(chunk))
            .map(|i| Fragment {
                logical: i * chunk,
                blocks: chunk.min(total - i * chunk),
                leaf: first_leaf + (i % u64::from(legs)) as u32,
                lba: (i / u64::from(legs)) * chunk,
            })
            .collect::<Vec<_>>()
    };
    (stripe(128, 4, 0), stripe(96, 3, 10))
}

fn plan(c: &mut Criterion) {
    let total = 1 << 22;
    let (src, dst) = partitions(total);
    let mut pieces = Vec::new();
    intersect(&src, &dst, &mut pieces).expect("valid partitions");
    let count = pieces.len() as u64;
    let limits = CopyLimits::nvme(128, 256, 15).expect("usable limits");
    let mut group = c.benchmark_group("copy_plan");
    group.throughput(Throughput::Elements(count));
    group.bench_function("intersect_group_batch", |b| {
        let (mut ranges, mut commands) = (Vec::new(), Vec::new());
        b.iter(|| {
            pieces.clear();
            ranges.clear();
            commands.clear();
            intersect(black_box(&src), black_box(&dst), &mut pieces).expect("valid partitions");
            for g in sort_into_groups(&mut pieces) {
                batch(g.pieces, &limits, &mut ranges, &mut commands);
            }
            black_box(commands.len())
        })
    });
    group.finish();
}

criterion_group!(benches, plan);
criterion_main!(benches);
