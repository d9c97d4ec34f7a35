//! One stack, one channel per thread: threads writing and reading their own
//! ranges concurrently see their own data, and the leaves end up with all of
//! it.

mod common;

use std::thread;

use bdev_stack::spec;
use common::{SyncIo, pattern, read_device};

#[test]
fn channels_on_several_threads_share_one_stack() {
    let device = spec::build(
        "mirror(region=32k, stripe(chunk=12k, mem:8m, mem:8m), concat(mem:9m, mem:7m))",
    )
    .expect("build");
    const THREADS: u64 = 4;
    let share = device.info().block_count / THREADS;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let device = device.clone();
            thread::spawn(move || {
                let mut io = SyncIo::open(device.as_ref());
                let base = t * share;
                for round in 0..20u64 {
                    let lba = base + (round * 389) % (share - 96);
                    let data = pattern(t * 1000 + round, 96 * 512);
                    io.write(lba, &data).expect("write");
                    assert_eq!(
                        io.read(lba, 96).expect("read"),
                        data,
                        "thread {t} round {round}"
                    );
                }
                // Leave a known final image of this thread's share.
                let image = pattern(t + 77, (share * 512) as usize);
                io.write(base, &image).expect("final write");
                image
            })
        })
        .collect();
    let images: Vec<Vec<u8>> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    let whole = read_device(&device, 0, share * THREADS);
    assert!(
        whole == images.concat(),
        "device differs from what the threads wrote"
    );
    for leg in device.members() {
        assert!(
            read_device(&leg, 0, share * THREADS) == whole,
            "a leg differs"
        );
    }
}
