//! Submit + complete on the inline emulated controller with a null
//! namespace: the driver's and the emulator's per-command overhead.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use nvme::emu::{EmuConfig, EmuController, NamespaceConfig};
use nvme::{Controller, ControllerOptions, DmaContext, QueueOptions};

fn submit_complete(c: &mut Criterion) {
    let ctx = DmaContext::host();
    let emu = EmuController::new(
        &ctx,
        EmuConfig {
            namespaces: vec![NamespaceConfig::null(4096, 1 << 20)],
            ..EmuConfig::default()
        },
    )
    .expect("emulator");
    let ctrl = Controller::new(emu, ControllerOptions::default()).expect("bring-up");
    let ns = ctrl.namespace(1).expect("namespace 1");
    let mut qp = ctrl
        .create_qpair(QueueOptions {
            entries: 256,
            timeout: None,
            ..QueueOptions::default()
        })
        .expect("queue pair");
    let buf = ctrl.dma_alloc(4096).expect("buffer");
    let s = buf.as_slice();
    let mut g = c.benchmark_group("nvme_emu_inline_null_read_4k");
    for batch in [1u64, 32, 128] {
        g.throughput(Throughput::Elements(batch));
        g.bench_function(format!("batch_{batch}"), |b| {
            b.iter(|| {
                for i in 0..batch {
                    qp.read(&ns, i, &s, i).expect("room in the queue");
                }
                let mut done = 0;
                while done < batch as usize {
                    done += qp
                        .poll(batch as usize, |c| {
                            black_box(c);
                        })
                        .expect("poll");
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, submit_complete);
criterion_main!(benches);
