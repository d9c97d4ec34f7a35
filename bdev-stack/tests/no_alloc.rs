//! The splitting path allocates nothing per I/O at steady state: a counting
//! global allocator watches this thread while requests that cross chunk,
//! member, region and max-transfer boundaries run through a mirror of a
//! stripe and a concat.

use bdev_stack::{HostBuffer, IoOp, OwnedChannel, spec};

#[path = "support/counting.rs"]
mod counting;

use counting::{CountingAllocator, counted};

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

const DEPTH: usize = 8;
const IO_BLOCKS: u64 = 200;

/// Runs `rounds` rounds of DEPTH requests in flight over the whole device,
/// reusing `buffers`; returns the I/Os completed.
fn run(
    ch: &mut OwnedChannel<HostBuffer>,
    buffers: &mut Vec<HostBuffer>,
    blocks: u64,
    rounds: u64,
) -> u64 {
    let mut completed = 0;
    let mut failed = 0;
    for round in 0..rounds {
        for i in 0..DEPTH as u64 {
            let n = round * DEPTH as u64 + i;
            // Odd offsets and lengths cross every kind of boundary.
            let lba = (n * 977) % (blocks - IO_BLOCKS);
            let op = match n % 5 {
                0 | 1 => IoOp::Write,
                2 | 3 => IoOp::Read,
                _ => IoOp::WriteZeroes,
            };
            let buf = if op.moves_data() { buffers.pop() } else { None };
            if let Err(rejected) = ch.submit(op, lba, IO_BLOCKS, buf, n) {
                panic!("submit refused: {}", rejected.error);
            }
        }
        while ch.outstanding() > 0 {
            ch.poll(DEPTH, |_, result, buf| {
                completed += 1;
                failed += u64::from(result.is_err());
                if let Some(buf) = buf {
                    buffers.push(buf);
                }
            });
        }
    }
    assert_eq!(failed, 0);
    completed
}

#[test]
fn splitting_path_allocates_nothing_per_io_at_steady_state() {
    let device = spec::build(
        "mirror(region=64k, stripe(chunk=24k, mem:4m,max=16k, mem:4m), concat(mem:3m, mem:1m,max=8k, mem:1m))",
    )
    .expect("build");
    let blocks = device.info().block_count;
    let mut ch = OwnedChannel::<HostBuffer>::open(device.as_ref(), DEPTH).expect("channel");
    let mut buffers: Vec<HostBuffer> = (0..DEPTH)
        .map(|_| HostBuffer::new((IO_BLOCKS * 512) as usize).expect("buffer"))
        .collect();

    // Warm-up: touches every block once, so the sparse memory leaves have
    // allocated their chunks, and sizes everything lazily sized.
    run(&mut ch, &mut buffers, blocks, blocks / IO_BLOCKS + 64);

    let (completed, allocations) = counted(|| run(&mut ch, &mut buffers, blocks, 200));

    assert_eq!(completed, 200 * DEPTH as u64);
    assert_eq!(
        allocations, 0,
        "allocations during {completed} I/Os at steady state"
    );
}

#[test]
fn nvme_tcp_leaf_allocates_nothing_per_io_at_steady_state() {
    use nvme::emu::{EmuConfig, NamespaceConfig};
    use nvme::tcp::serve::{ServeConfig, TcpServer};
    // The target runs on threads of its own; this thread is the
    // initiator's: capsules, R2T and H2CData, C2HData, completions.
    let server = TcpServer::start(ServeConfig {
        emu: EmuConfig {
            namespaces: vec![NamespaceConfig::memory(512, 8192)],
            ..EmuConfig::default()
        },
        ..ServeConfig::default()
    })
    .expect("serve");
    let device =
        spec::build(&format!("nvme-tcp:{}/{}/1", server.addr(), server.subnqn())).expect("build");
    let blocks = device.info().block_count;
    let mut ch = OwnedChannel::<HostBuffer>::open(device.as_ref(), DEPTH).expect("channel");
    let mut buffers: Vec<HostBuffer> = (0..DEPTH)
        .map(|_| HostBuffer::new((IO_BLOCKS * 512) as usize).expect("buffer"))
        .collect();
    run(&mut ch, &mut buffers, blocks, 16);
    let (completed, allocations) = counted(|| run(&mut ch, &mut buffers, blocks, 100));
    assert_eq!(completed, 100 * DEPTH as u64);
    assert_eq!(
        allocations, 0,
        "allocations during {completed} I/Os over NVMe/TCP at steady state"
    );
}
