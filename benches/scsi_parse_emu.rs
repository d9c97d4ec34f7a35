//! Hot paths of scsi-sg on the host: decoding sense data and VPD pages,
//! building EXTENDED COPY lists, and a 4 KiB READ(16) through the typed
//! command path on the in-process target (the per-command overhead of the
//! crate plus the emulator).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use scsi_sg::emu::{EmuConfig, EmuTarget};
use scsi_sg::tpc::{CscdId, ExtendedCopy, Segment};
use scsi_sg::vpd::{BlockLimits, ThirdPartyCopy};
use scsi_sg::{ScsiDevice, Sense, SenseKey};

fn parsers(c: &mut Criterion) {
    let sense = Sense::new(SenseKey::IllegalRequest, 0x23, 0x07).to_fixed();
    c.bench_function("scsi_sense_parse_fixed", |b| {
        b.iter(|| Sense::parse(black_box(&sense)))
    });
    let bl = BlockLimits {
        max_transfer: 8192,
        ..BlockLimits::default()
    }
    .to_bytes();
    c.bench_function("scsi_vpd_block_limits_parse", |b| {
        b.iter(|| BlockLimits::parse(black_box(&bl)))
    });
    let tpc = ThirdPartyCopy {
        supported_commands: vec![(0x83, vec![0x00, 0x10, 0x11]), (0x84, vec![0x03, 0x07])],
        ..ThirdPartyCopy::default()
    }
    .to_bytes();
    c.bench_function("scsi_vpd_third_party_copy_parse", |b| {
        b.iter(|| ThirdPartyCopy::parse(black_box(&tpc)))
    });
    let list = ExtendedCopy {
        list_id: 0,
        no_list_id: true,
        cscds: vec![
            CscdId {
                naa: vec![0x60; 16],
                block_len: 512,
            },
            CscdId {
                naa: vec![0x61; 16],
                block_len: 512,
            },
        ],
        segments: vec![Segment {
            source: 0,
            destination: 1,
            blocks: 2048,
            source_lba: 0,
            destination_lba: 4096,
        }],
    };
    c.bench_function("scsi_xcopy_list_build", |b| {
        b.iter(|| black_box(&list).to_bytes())
    });
}

fn emu_read(c: &mut Criterion) {
    let t = EmuTarget::new("bench", EmuConfig::default());
    let dev = ScsiDevice::probe(t.add_memory_lun(1 << 16, 512)).expect("probe");
    let mut buf = vec![0u8; 4096];
    let mut g = c.benchmark_group("scsi_emu_read16_4k");
    g.throughput(Throughput::Elements(1));
    let mut lba = 0u64;
    g.bench_function("typed", |b| {
        b.iter(|| {
            lba = (lba + 8) % (1 << 16);
            dev.read(lba, black_box(&mut buf)).expect("read")
        })
    });
    g.finish();
}

criterion_group!(benches, parsers, emu_read);
criterion_main!(benches);
