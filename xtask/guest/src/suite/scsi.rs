//! SCSI through SG_IO against LIO and virtio-scsi, cross-checked with sg3_utils.

use super::{GuestEnv, GuestTest, Kind};
use crate::reference::{
    SgInq, SgReadcap, SgVpdBlockLimits, SgVpdDesignators, SgVpdLbpv, sg_vpd_serial,
};
use crate::setup::{ScsiDevice, tool_output};
use crate::topology::DEFAULT;
use scsi_sg::conformance;
use scsi_sg::{AlignedBuf, AsyncXfer, SgDevice, SgQueue, cdb};
use std::time::{Duration, Instant};

/// The tests of this module.
pub(super) static TESTS: &[GuestTest] = &[
    GuestTest {
        name: "sg_inquiry_matches_sg_inq",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: sg_inquiry_matches_sg_inq,
    },
    GuestTest {
        name: "sg_readcap16_matches_sg_readcap",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: sg_readcap16_matches_sg_readcap,
    },
    GuestTest {
        name: "sg_probe_matches_sg_vpd",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: sg_probe_matches_sg_vpd,
    },
    GuestTest {
        name: "sg_virtio_reports_no_third_party_copy",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(60),
        run: sg_virtio_reports_no_third_party_copy,
    },
    GuestTest {
        name: "sg_conformance_on_lio",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(120),
        run: sg_conformance_on_lio,
    },
    GuestTest {
        name: "sg_queue_write_read_verify_many_in_flight",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(120),
        run: sg_queue_write_read_verify_many_in_flight,
    },
    GuestTest {
        name: "sg_xcopy_lun0_to_lun1_matches_ddpt",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(120),
        run: sg_xcopy_lun0_to_lun1_matches_ddpt,
    },
    GuestTest {
        name: "sg_stack_concat_across_the_boundary_matches_sg_dd",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(120),
        run: sg_stack_concat_across_the_boundary_matches_sg_dd,
    },
    GuestTest {
        name: "sg_stack_copy_engine_lun0_to_lun1_is_extended_copy",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(120),
        run: sg_stack_copy_engine_lun0_to_lun1_is_extended_copy,
    },
    GuestTest {
        name: "sg_copy_into_a_mirror_of_two_luns_offloads_on_both_legs",
        kind: Kind::Test,
        topology: DEFAULT,
        timeout: Duration::from_secs(120),
        run: sg_copy_into_a_mirror_of_two_luns_offloads_on_both_legs,
    },
    GuestTest {
        name: "scsi_bench_queue_qd16_vs_fio_sg",
        kind: Kind::Bench,
        topology: DEFAULT,
        timeout: Duration::from_secs(240),
        run: scsi_bench_queue_qd16_vs_fio_sg,
    },
];

fn scsi_devices(env: &GuestEnv) -> impl Iterator<Item = (&'static str, &ScsiDevice)> {
    let lio = env.devices.lio.iter().map(|d| ("LIO", d));
    let virtio = env.devices.virtio.iter().map(|d| ("virtio-scsi", d));
    lio.chain(virtio)
}

fn sg_inquiry_matches_sg_inq(env: &GuestEnv) -> Result<(), String> {
    for (kind, dev) in scsi_devices(env) {
        let path = dev.sg_path.display().to_string();
        let sg = scsi_sg::SgDevice::open(&dev.sg_path).map_err(|e| format!("{path}: {e}"))?;
        let ours = sg.inquiry().map_err(|e| format!("{path}: INQUIRY: {e}"))?;
        let theirs =
            SgInq::parse(&tool_output("sg_inq", &[&path])?).map_err(|e| format!("{path}: {e}"))?;
        let what = |field: &str| format!("{path} ({kind}) {field}");
        ensure_eq!(
            what("PQual"),
            ours.peripheral_qualifier,
            theirs.peripheral_qualifier
        );
        ensure_eq!(
            what("PDT"),
            ours.peripheral_device_type,
            theirs.peripheral_device_type
        );
        ensure_eq!(what("RMB"), ours.removable, theirs.removable);
        ensure_eq!(what("version"), ours.version, theirs.version);
        ensure_eq!(
            what("response data format"),
            ours.response_data_format,
            theirs.response_data_format
        );
        ensure_eq!(what("NormACA"), ours.normaca, theirs.normaca);
        ensure_eq!(what("HiSUP"), ours.hisup, theirs.hisup);
        ensure_eq!(what("SCCS"), ours.sccs, theirs.sccs);
        ensure_eq!(what("TPGS"), ours.tpgs, theirs.tpgs);
        ensure_eq!(what("3PC"), ours.third_party_copy, theirs.third_party_copy);
        ensure_eq!(what("Protect"), ours.protect, theirs.protect);
        ensure_eq!(what("CmdQue"), ours.cmdque, theirs.cmdque);
        ensure_eq!(what("vendor"), ours.vendor, theirs.vendor);
        ensure_eq!(what("product"), ours.product, theirs.product);
        ensure_eq!(what("revision"), ours.revision, theirs.revision);
        // What the rig built, independent of both parsers.
        let (vendor, tpc) = match kind {
            "LIO" => ("LIO-ORG", true),
            _ => ("QEMU", false),
        };
        ensure_eq!(what("expected vendor"), ours.vendor.as_str(), vendor);
        ensure_eq!(what("expected 3PC"), ours.third_party_copy, tpc);
    }
    Ok(())
}

fn sg_readcap16_matches_sg_readcap(env: &GuestEnv) -> Result<(), String> {
    for (kind, dev) in scsi_devices(env) {
        let path = dev.sg_path.display().to_string();
        let sg = scsi_sg::SgDevice::open(&dev.sg_path).map_err(|e| format!("{path}: {e}"))?;
        let ours = sg
            .read_capacity16()
            .map_err(|e| format!("{path}: READ CAPACITY(16): {e}"))?;
        let theirs = SgReadcap::parse(&tool_output("sg_readcap", &["-16", &path])?)
            .map_err(|e| format!("{path}: {e}"))?;
        let what = |field: &str| format!("{path} ({kind}) {field}");
        ensure_eq!(what("last LBA"), ours.returned_lba, theirs.last_lba);
        ensure_eq!(
            what("block count"),
            ours.block_count(),
            Some(theirs.block_count)
        );
        ensure_eq!(
            what("block length"),
            ours.logical_block_length,
            theirs.block_length
        );
        ensure_eq!(what("prot_en"), ours.prot_en, theirs.prot_en);
        ensure_eq!(what("p_type"), ours.p_type, theirs.p_type);
        ensure_eq!(what("lbpme"), ours.lbpme, theirs.lbpme);
        ensure_eq!(what("lbprz"), ours.lbprz, theirs.lbprz);
        ensure_eq!(what("LBPPBE"), ours.lbppbe, theirs.lbppbe);
        ensure_eq!(
            what("lowest aligned LBA"),
            ours.lowest_aligned_lba,
            theirs.lowest_aligned_lba
        );
        ensure_eq!(
            what("expected block length"),
            ours.logical_block_length,
            dev.block_size
        );
        ensure_eq!(
            what("expected size"),
            ours.capacity_bytes(),
            Some(dev.size_bytes)
        );
    }
    Ok(())
}

fn lio_pair(
    env: &GuestEnv,
) -> Result<(scsi_sg::ScsiDevice<SgDevice>, scsi_sg::ScsiDevice<SgDevice>), String> {
    let [a, b, ..] = env.devices.lio.as_slice() else {
        return Err(format!(
            "need two LIO LUNs, setup found {}",
            env.devices.lio.len()
        ));
    };
    let open = |d: &ScsiDevice| {
        scsi_sg::ScsiDevice::open(&d.sg_path)
            .map_err(|e| format!("probing {}: {e}", d.sg_path.display()))
    };
    Ok((open(a)?, open(b)?))
}

fn sg_probe_matches_sg_vpd(env: &GuestEnv) -> Result<(), String> {
    for dev in &env.devices.lio {
        let path = dev.sg_path.display().to_string();
        let lun = scsi_sg::ScsiDevice::open(&dev.sg_path).map_err(|e| format!("{path}: {e}"))?;
        conformance::probe_sane(&lun).map_err(|e| format!("{path}: {e}"))?;
        let id = lun.identity();
        let what = |field: &str| format!("{path} (LIO) {field}");

        let inq = SgInq::parse(&tool_output("sg_inq", &[&path])?)?;
        ensure_eq!(what("vendor"), id.inquiry.vendor, inq.vendor);
        ensure_eq!(what("product"), id.inquiry.product, inq.product);
        ensure_eq!(
            what("3PC"),
            id.inquiry.third_party_copy,
            inq.third_party_copy
        );

        let cap = SgReadcap::parse(&tool_output("sg_readcap", &["-16", &path])?)?;
        ensure_eq!(what("block count"), lun.block_count(), cap.block_count);
        ensure_eq!(what("block length"), lun.block_len(), cap.block_length);
        ensure_eq!(
            what("expected size"),
            lun.block_count() * u64::from(lun.block_len()),
            dev.size_bytes
        );

        let text = tool_output("sg_vpd", &["-p", "di", &path])?;
        println!("sg_vpd -p di {path}:\n{text}");
        let di = SgVpdDesignators::parse(&text).map_err(|e| format!("{e}\n{text}"))?;
        let naa = id
            .naa()
            .ok_or_else(|| format!("{path}: probe found no NAA"))?;
        let ours: String = std::iter::once("0x".to_string())
            .chain(naa.iter().map(|b| format!("{b:02x}")))
            .collect();
        ensure_eq!(what("NAA designator"), ours, di.naa);

        let text = tool_output("sg_vpd", &["-p", "sn", &path])?;
        println!("sg_vpd -p sn {path}:\n{text}");
        let sn = sg_vpd_serial(&text).map_err(|e| format!("{e}\n{text}"))?;
        ensure_eq!(what("unit serial"), id.serial.clone(), Some(sn.clone()));
        ensure_eq!(what("expected serial"), Some(sn), dev.serial.clone());

        let text = tool_output("sg_vpd", &["-p", "bl", &path])?;
        println!("sg_vpd -p bl {path}:\n{text}");
        let bl = SgVpdBlockLimits::parse(&text).map_err(|e| format!("{e}\n{text}"))?;
        let ours = id
            .block_limits
            .ok_or_else(|| format!("{path}: probe found no block limits page"))?;
        ensure_eq!(
            what("max transfer"),
            u64::from(ours.max_transfer),
            bl.max_transfer
        );
        ensure_eq!(
            what("optimal transfer"),
            u64::from(ours.optimal_transfer),
            bl.optimal_transfer
        );
        // Fields past a short page read as 0 in ours; sg_vpd omits them.
        ensure_eq!(
            what("max unmap LBA count"),
            u64::from(ours.max_unmap_lba_count),
            bl.max_unmap_lba_count.unwrap_or(0)
        );
        ensure_eq!(
            what("max unmap descriptors"),
            u64::from(ours.max_unmap_descriptors),
            bl.max_unmap_descriptors.unwrap_or(0)
        );
        ensure_eq!(
            what("max write same"),
            ours.max_write_same,
            bl.max_write_same.unwrap_or(0)
        );

        if let Some(p) = id.provisioning {
            let text = tool_output("sg_vpd", &["-p", "lbpv", &path])?;
            println!("sg_vpd -p lbpv {path}:\n{text}");
            let lbpv = SgVpdLbpv::parse(&text).map_err(|e| format!("{e}\n{text}"))?;
            ensure_eq!(what("LBPU"), p.lbpu, lbpv.lbpu);
            ensure_eq!(what("LBPWS"), p.lbpws, lbpv.lbpws);
            ensure_eq!(what("LBPWS10"), p.lbpws10, lbpv.lbpws10);
        }

        // LIO's copy manager (VM-NOTES): 2 CSCDs, 1 segment, 1024-byte
        // list, 256 MiB segments, codes 0x02 and 0xE4; no ROD tokens.
        let x = id
            .copy
            .extended_copy
            .as_ref()
            .ok_or_else(|| format!("{path}: probe found no EXTENDED COPY"))?;
        ensure_eq!(what("max CSCDs"), x.max_cscd_descriptors, 2);
        ensure_eq!(what("max segments"), x.max_segment_descriptors, 1);
        ensure_eq!(what("max list length"), x.max_descriptor_list_length, 1024);
        ensure_eq!(what("max segment length"), x.max_segment_length, 256 << 20);
        ensure_eq!(
            what("descriptor codes"),
            x.descriptor_codes.clone(),
            vec![0x02, 0xe4]
        );
        conformance::no_rod_tokens(&lun).map_err(|e| format!("{path}: {e}"))?;
        println!(
            "ok {path}: no ROD tokens detected (VPD pages {:02x?})",
            id.vpd_pages
        );
    }
    Ok(())
}

fn sg_virtio_reports_no_third_party_copy(env: &GuestEnv) -> Result<(), String> {
    let dev = env
        .devices
        .virtio
        .first()
        .ok_or("setup found no virtio-scsi disk")?;
    let path = dev.sg_path.display().to_string();
    let lun = scsi_sg::ScsiDevice::open(&dev.sg_path).map_err(|e| format!("{path}: {e}"))?;
    let id = lun.identity();
    ensure_eq!(
        format!("{path} block length"),
        lun.block_len(),
        dev.block_size
    );
    ensure_eq!(format!("{path} 3PC"), id.inquiry.third_party_copy, false);
    ensure_eq!(format!("{path} any third-party copy"), id.copy.any(), false);
    conformance::no_rod_tokens(&lun).map_err(|e| format!("{path}: {e}"))?;
    match lun.copy_to(0, &lun, 8, 1) {
        Err(scsi_sg::Error::Unsupported { .. }) => {}
        other => {
            return Err(format!(
                "{path}: EXTENDED COPY on virtio-scsi gave {other:?}"
            ));
        }
    }
    println!("ok {path}: no third-party copy");
    Ok(())
}

fn sg_conformance_on_lio(env: &GuestEnv) -> Result<(), String> {
    let (a, b) = lio_pair(env)?;
    conformance::write_read_verify(&a, 1000, 64, 1)?;
    conformance::write_read_verify(&b, a.block_count() - 16, 16, 2)?;
    println!("ok write/read verify on both LUNs");
    conformance::error_paths(&a)?;
    println!("ok error paths (LBA out of range, invalid opcode, invalid CDB field, short RCOP)");
    conformance::extended_copy(&a, &b, 2000, 3000, 300, 3)?;
    println!("ok EXTENDED COPY LUN0 -> LUN1 verified; refusals match");
    Ok(())
}

/// Random distinct 4 KiB-aligned LBAs (in 512-byte blocks) below `limit`.
fn distinct_lbas(count: usize, limit: u64, seed: u64) -> Vec<u64> {
    let slots = limit / 8;
    let mut x = seed | 1;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(count);
    while out.len() < count && (seen.len() as u64) < slots {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let s = x % slots;
        if seen.insert(s) {
            out.push(s * 8);
        }
    }
    out
}

/// Keep up to `depth` commands in flight until every index of `lbas` is
/// done; `make` builds the command for index i, `check` sees each result.
fn run_queued(
    q: &mut SgQueue,
    depth: usize,
    count: usize,
    mut make: impl FnMut(usize, AlignedBuf) -> ([u8; 16], AsyncXfer),
    mut check: impl FnMut(usize, &[u8]) -> Result<(), String>,
) -> Result<usize, String> {
    let mut free: Vec<AlignedBuf> = (0..depth)
        .map(|_| AlignedBuf::new(4096).ok_or("allocating buffers"))
        .collect::<Result<_, _>>()?;
    let mut next = 0;
    let mut done = 0;
    let mut max_in_flight = 0;
    let mut err = None;
    while done < count {
        while next < count && q.in_flight() < depth {
            let Some(buf) = free.pop() else { break };
            let (c, xfer) = make(next, buf);
            match q.submit(next as u64, &c, xfer, Duration::from_secs(30)) {
                Ok(()) => next += 1,
                Err(r) => {
                    if let Some(b) = Option::<AlignedBuf>::from(r.xfer) {
                        free.push(b);
                    }
                    if !matches!(r.reason, scsi_sg::RejectReason::QueueFull) {
                        return Err(format!("submit {next}: {:?}", r.reason));
                    }
                    break;
                }
            }
        }
        max_in_flight = max_in_flight.max(q.in_flight());
        let n = q
            .poll(64, |c| {
                let i = c.tag as usize;
                let buf = c.buf;
                match c.result {
                    Ok(o) if o.status.is_success() => {
                        if let Some(b) = &buf
                            && let Err(e) = check(i, b.as_slice())
                        {
                            err.get_or_insert(e);
                        }
                    }
                    Ok(o) => {
                        err.get_or_insert(format!("command {i}: {} {:?}", o.status, o.sense()));
                    }
                    Err(e) => {
                        err.get_or_insert(format!("command {i}: {e}"));
                    }
                }
                if let Some(b) = buf {
                    free.push(b);
                }
            })
            .map_err(|e| e.to_string())?;
        done += n;
        if let Some(e) = err.take() {
            return Err(e);
        }
    }
    Ok(max_in_flight)
}

fn block_pattern(lba: u64, pass: u64) -> [u8; 4096] {
    let mut b = [0u8; 4096];
    for (i, chunk) in b.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(
            &(lba.wrapping_mul(0x9e37_79b9) ^ (i as u64) ^ (pass << 56)).to_le_bytes(),
        );
    }
    b
}

fn sg_queue_write_read_verify_many_in_flight(env: &GuestEnv) -> Result<(), String> {
    let dev = env.devices.lio.first().ok_or("no LIO LUN")?;
    let path = dev.sg_path.display().to_string();
    let blocks = dev.size_bytes / 512;
    // Two files: up to 32 in flight, more than one sg file holds.
    let mut q = SgQueue::open(&dev.sg_path, 2).map_err(|e| format!("{path}: {e}"))?;
    let lbas = distinct_lbas(1024, blocks, 0x5eed);
    let depth = 32;
    let max_w = run_queued(
        &mut q,
        depth,
        lbas.len(),
        |i, mut buf| {
            let lba = lbas[i];
            buf.as_mut_slice()[..4096].copy_from_slice(&block_pattern(lba, 1));
            (cdb::write16(lba, 8, false), AsyncXfer::ToDevice(buf, 4096))
        },
        |_, _| Ok(()),
    )
    .map_err(|e| format!("{path}: queued writes: {e}"))?;
    let max_r = run_queued(
        &mut q,
        depth,
        lbas.len(),
        |i, buf| {
            (
                cdb::read16(lbas[i], 8, false),
                AsyncXfer::FromDevice(buf, 4096),
            )
        },
        |i, data| {
            if data[..4096] != block_pattern(lbas[i], 1) {
                return Err(format!("LBA {} read back differs", lbas[i]));
            }
            Ok(())
        },
    )
    .map_err(|e| format!("{path}: queued reads: {e}"))?;
    println!(
        "ok {path}: {} writes and reads verified, max in flight {max_w}/{max_r}",
        lbas.len()
    );
    if max_w <= 16 || max_r <= 16 {
        return Err(format!(
            "{path}: never had more than 16 in flight (writes {max_w}, reads {max_r})"
        ));
    }
    // The block node answers SG_GET_VERSION_NUM too, but write(2) on it
    // would hit the medium: the queue must refuse it.
    if let Some(block) = &dev.block_path {
        match SgQueue::open(block, 1) {
            Err(scsi_sg::Error::NotSgCapable { .. }) => {
                println!("ok {}: refused for the queued interface", block.display());
            }
            other => return Err(format!("{}: SgQueue::open gave {other:?}", block.display())),
        }
    }
    // Cross-check with the synchronous path on a few blocks.
    let sg = scsi_sg::ScsiDevice::open(&dev.sg_path).map_err(|e| e.to_string())?;
    for &lba in lbas.iter().take(8) {
        let mut b = vec![0u8; 4096];
        sg.read(lba, &mut b).map_err(|e| e.to_string())?;
        if b[..] != block_pattern(lba, 1)[..] {
            return Err(format!("{path}: LBA {lba} differs through SG_IO"));
        }
    }
    Ok(())
}

fn sg_xcopy_lun0_to_lun1_matches_ddpt(env: &GuestEnv) -> Result<(), String> {
    let (a, b) = lio_pair(env)?;
    let (pa, pb) = (
        a.path().display().to_string(),
        b.path().display().to_string(),
    );
    let count: u64 = 2048; // 1 MiB; ddpt needs bpt >= count (VM-NOTES)
    let (src, ours_at, ddpt_at) = (40_000u64, 50_000u64, 60_000u64);
    let n = usize::try_from(count * 512).map_err(|e| e.to_string())?;
    // Fresh data, and a different fill on both destinations.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64);
    let data = conformance::pattern(seed, n);
    a.write(src, &data, false).map_err(|e| e.to_string())?;
    b.write(ours_at, &vec![0x11; n], false)
        .map_err(|e| e.to_string())?;
    b.write(ddpt_at, &vec![0x22; n], false)
        .map_err(|e| e.to_string())?;
    let commands = a
        .copy_to(src, &b, ours_at, count)
        .map_err(|e| format!("EXTENDED COPY: {e}"))?;
    println!("ok our EXTENDED COPY: {commands} command(s)");
    let args = [
        format!("if={pa}"),
        format!("skip={src}"),
        format!("of={pb}"),
        format!("seek={ddpt_at}"),
        format!("count={count}"),
        format!("bpt={count}"),
        "bs=512".to_string(),
        "--xcopy".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tool_output("ddpt", &args)?;
    println!("ddpt: {}", out.trim());
    let mut ours = vec![0u8; n];
    let mut theirs = vec![0u8; n];
    b.read(ours_at, &mut ours).map_err(|e| e.to_string())?;
    b.read(ddpt_at, &mut theirs).map_err(|e| e.to_string())?;
    if ours != data {
        return Err("our EXTENDED COPY: LUN1 does not hold the source data".into());
    }
    if theirs != data {
        return Err("ddpt --xcopy: LUN1 does not hold the source data".into());
    }
    if ours != theirs {
        return Err("our copy and ddpt's differ".into());
    }
    println!("ok {count} blocks LUN0@{src} -> LUN1: ours@{ours_at} == ddpt@{ddpt_at} == source");
    Ok(())
}

/// 4 KiB random reads at QD `depth` for `secs` through the queued
/// interface; returns IOPS. `spin`: busy-poll; else sleep in poll(2) when
/// nothing is ready.
fn queue_randread(
    path: &std::path::Path,
    blocks: u64,
    depth: usize,
    secs: f64,
    spin: bool,
) -> Result<f64, String> {
    let mut q = SgQueue::open(path, depth.div_ceil(16)).map_err(|e| e.to_string())?;
    let mut free: Vec<AlignedBuf> = (0..depth)
        .map(|_| AlignedBuf::new(4096).ok_or("alloc"))
        .collect::<Result<_, _>>()?;
    let slots = blocks / 8;
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let start = Instant::now();
    let mut done: u64 = 0;
    let mut err = None;
    loop {
        let running = start.elapsed().as_secs_f64() < secs;
        while running && q.in_flight() < depth {
            let Some(buf) = free.pop() else { break };
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let lba = (x % slots) * 8;
            if let Err(r) = q.submit(
                0,
                &cdb::read16(lba, 8, false),
                AsyncXfer::FromDevice(buf, 4096),
                Duration::from_secs(30),
            ) {
                if let Some(b) = Option::<AlignedBuf>::from(r.xfer) {
                    free.push(b);
                }
                break;
            }
        }
        if !running && q.in_flight() == 0 {
            break;
        }
        let n = q
            .poll(depth, |c| {
                match c.result {
                    Ok(o) if o.status.is_success() => {}
                    Ok(o) => {
                        err.get_or_insert(format!("{} {:?}", o.status, o.sense()));
                    }
                    Err(e) => {
                        err.get_or_insert(e.to_string());
                    }
                }
                if let Some(b) = c.buf {
                    free.push(b);
                }
            })
            .map_err(|e| e.to_string())?;
        if let Some(e) = err.take() {
            return Err(e);
        }
        done += n as u64;
        if n == 0 && !spin {
            q.wait(Duration::from_millis(10))
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(done as f64 / start.elapsed().as_secs_f64())
}

fn fio_randread(path: &str, depth: usize, secs: u32) -> Result<f64, String> {
    let out = tool_output(
        "fio",
        &[
            "--name=scsi",
            &format!("--filename={path}"),
            "--ioengine=sg",
            "--rw=randread",
            "--bs=4k",
            &format!("--iodepth={depth}"),
            &format!("--runtime={secs}"),
            "--time_based",
            "--output-format=json",
        ],
    )?;
    let start = out.find('{').ok_or("fio printed no JSON")?;
    let v: serde_json::Value =
        serde_json::from_str(&out[start..]).map_err(|e| format!("fio JSON: {e}"))?;
    v["jobs"][0]["read"]["iops"]
        .as_f64()
        .ok_or_else(|| "fio JSON has no jobs[0].read.iops".to_string())
}

fn scsi_bench_queue_qd16_vs_fio_sg(env: &GuestEnv) -> Result<(), String> {
    let dev = env.devices.lio.first().ok_or("no LIO LUN")?;
    let path = dev.sg_path.display().to_string();
    let blocks = dev.size_bytes / 512;
    // Let sg DMA straight into our aligned buffers (falls back otherwise).
    let dio = std::fs::write("/sys/module/sg/parameters/allow_dio", "1").is_ok()
        || std::fs::write("/proc/scsi/sg/allow_dio", "1").is_ok();
    // Clear any pending UNIT ATTENTION (LUN creation) before measuring:
    // the probe retries it once.
    scsi_sg::ScsiDevice::open(&dev.sg_path).map_err(|e| format!("{path}: {e}"))?;
    println!("{path}: 4 KiB random reads, QD16, 5 s per run, direct I/O allowed: {dio}");
    let (mut ours_spin, mut ours_wait, mut fio) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=3 {
        let s = queue_randread(&dev.sg_path, blocks, 16, 5.0, true)?;
        let f = fio_randread(&path, 16, 5)?;
        let w = queue_randread(&dev.sg_path, blocks, 16, 5.0, false)?;
        println!(
            "round {round}: ustor spin {s:.0} IOPS, fio sg {f:.0} IOPS, ustor poll(2) {w:.0} IOPS"
        );
        ours_spin.push(s);
        fio.push(f);
        ours_wait.push(w);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, w, f) = (
        median(&mut ours_spin),
        median(&mut ours_wait),
        median(&mut fio),
    );
    println!("median: ustor spin {s:.0}, ustor poll(2) {w:.0}, fio sg {f:.0} IOPS");
    if f <= 0.0 {
        return Err("fio measured 0 IOPS".into());
    }
    // The ratio is the polled (spinning) mode, the library's model; the
    // poll(2) figure is printed for information only.
    println!("ustor(poll(2))/fio ratio: {:.2}", w / f);
    println!("ustor/fio iops ratio: qd16={:.2}", s / f);
    Ok(())
}

/// The sg nodes of the two LIO LUNs.
fn lio_sg_paths(env: &GuestEnv) -> Result<(String, String), String> {
    let [a, b, ..] = env.devices.lio.as_slice() else {
        return Err(format!(
            "need two LIO LUNs, setup found {}",
            env.devices.lio.len()
        ));
    };
    Ok((
        a.sg_path.display().to_string(),
        b.sg_path.display().to_string(),
    ))
}

/// Writes `data` at `lba` of `dev` through a stack channel, 16 blocks a
/// request with up to 40 in flight (more than one sg file's 16, so the sg
/// leaf spreads them over several files and meets a full queue), then
/// flushes.
fn stack_write(
    dev: &dyn ustor::bdev_stack::BlockDevice,
    lba: u64,
    data: &[u8],
) -> Result<(), String> {
    use ustor::bdev_stack::{HostBuffer, IoOp, OwnedChannel, SubmitError};
    const DEPTH: usize = 40;
    const BLOCKS: usize = 16;
    let bs = dev.info().block_size as usize;
    let mut ch = OwnedChannel::<HostBuffer>::open(dev, DEPTH).map_err(|e| e.to_string())?;
    let mut failures = Vec::new();
    let mut in_flight = 0usize;
    let mut peak = 0usize;
    for (i, chunk) in data.chunks(BLOCKS * bs).enumerate() {
        let mut buf = HostBuffer::new(chunk.len()).map_err(|e| e.to_string())?;
        buf.as_mut_slice().copy_from_slice(chunk);
        let at = lba + (i * BLOCKS) as u64;
        let mut pending = Some(buf);
        while let Some(buf) = pending.take() {
            match ch.write(at, (chunk.len() / bs) as u64, buf, at) {
                Ok(()) => {
                    in_flight += 1;
                    peak = peak.max(in_flight);
                }
                Err(r) if r.error == SubmitError::Busy => {
                    pending = r.buf;
                    if pending.is_none() {
                        return Err("a busy channel kept the buffer".into());
                    }
                    in_flight -= ch.poll(DEPTH, |ctx, r, _| {
                        if let Err(e) = r {
                            failures.push(format!("write at {ctx}: {e}"));
                        }
                    });
                }
                Err(r) => return Err(format!("write at {at}: {}", r.error)),
            }
        }
    }
    while in_flight > 0 {
        in_flight -= ch.poll(DEPTH, |ctx, r, _| {
            if let Err(e) = r {
                failures.push(format!("write at {ctx}: {e}"));
            }
        });
    }
    if !failures.is_empty() {
        return Err(failures.join("; "));
    }
    println!("ok stack writes: up to {peak} in flight");
    ch.submit(IoOp::Flush, 0, 0, None, 0)
        .map_err(|r| r.error.to_string())?;
    let mut result = None;
    while result.is_none() {
        ch.poll(1, |_, r, _| result = Some(r));
    }
    match result {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(format!("stack flush: {e}")),
        None => Err("no completion".into()),
    }
}

/// One operation without data (write zeroes, deallocate, flush) through
/// a stack channel, waited for.
fn stack_op(
    dev: &dyn ustor::bdev_stack::BlockDevice,
    op: ustor::bdev_stack::IoOp,
    lba: u64,
    blocks: u64,
) -> Result<(), String> {
    use ustor::bdev_stack::{HostBuffer, OwnedChannel};
    let mut ch = OwnedChannel::<HostBuffer>::open(dev, 1).map_err(|e| e.to_string())?;
    ch.submit(op, lba, blocks, None, 0)
        .map_err(|r| r.error.to_string())?;
    let mut result = None;
    while result.is_none() {
        ch.poll(1, |_, r, _| result = Some(r));
    }
    match result {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(format!("{op} of {blocks} blocks at {lba}: {e}")),
        None => Err("no completion".into()),
    }
}

/// Reads `count` 512-byte blocks at `skip` of the sg node `path` with
/// sg_dd, the reference tool.
fn sg_dd_read(path: &str, skip: u64, count: u64) -> Result<Vec<u8>, String> {
    let out = format!("/run/ustor/sg_dd-{}-{skip}.bin", std::process::id());
    let args = [
        format!("if={path}"),
        format!("of={out}"),
        "bs=512".to_string(),
        format!("skip={skip}"),
        format!("count={count}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tool_output("sg_dd", &args)?;
    let bytes = std::fs::read(&out).map_err(|e| format!("reading {out}: {e}"))?;
    std::fs::remove_file(&out).map_err(|e| format!("removing {out}: {e}"))?;
    Ok(bytes)
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64)
}

/// `concat(sg:LUN0, sg:LUN1)`: a pattern written across the members'
/// boundary through the stack lands at the right place on each LUN, as
/// sg_dd reads them after the stack has let go of the devices.
fn sg_stack_concat_across_the_boundary_matches_sg_dd(env: &GuestEnv) -> Result<(), String> {
    let (a, b) = lio_sg_paths(env)?;
    let spec = format!("concat(sg:{a}, sg:{b})");
    let dev = ustor::bdev_stack::spec::build(&spec).map_err(|e| e.to_string())?;
    let members = dev.members();
    let first = members.first().ok_or("concat without members")?;
    let boundary = first.info().block_count;
    let bs = dev.info().block_size;
    if bs != 512 {
        return Err(format!(
            "LIO LUNs have {bs}-byte blocks, the test expects 512"
        ));
    }
    for m in &members {
        let info = m.info();
        println!(
            "ok {}: {} blocks, max transfer {} blocks, ops {:?}",
            info.name, info.block_count, info.max_transfer_blocks, info.ops
        );
    }
    let (before, after) = (300u64, 500u64);
    let mut data = conformance::pattern(seed(), ((before + after) * 512) as usize);
    stack_write(dev.as_ref(), boundary - before, &data)?;
    // Write zeroes (WRITE SAME) across the boundary too, where LIO offers it.
    if dev
        .info()
        .ops
        .contains(ustor::bdev_stack::SupportedOps::WRITE_ZEROES)
    {
        stack_op(
            dev.as_ref(),
            ustor::bdev_stack::IoOp::WriteZeroes,
            boundary - 40,
            100,
        )?;
        let at = ((before - 40) * 512) as usize;
        data[at..at + 100 * 512].fill(0);
        println!("ok write zeroes of 100 blocks across the boundary");
    } else {
        println!("skip write zeroes: the stack does not offer it on these LUNs");
    }
    drop(members);
    drop(dev);
    let tail = sg_dd_read(&a, boundary - before, before)?;
    let head = sg_dd_read(&b, 0, after)?;
    let split = (before * 512) as usize;
    if tail != data[..split] {
        return Err(format!(
            "LUN0 {a} blocks {}.. differ from what the stack wrote",
            boundary - before
        ));
    }
    if head != data[split..] {
        return Err(format!(
            "LUN1 {b} blocks 0..{after} differ from what the stack wrote"
        ));
    }
    println!("ok {before} blocks at the end of {a} and {after} at the start of {b} match sg_dd");
    Ok(())
}

/// The copy engine, LUN0 -> LUN1 through `sg:` leaves: the two LUNs of
/// the tcm_loop nexus share a copy manager, so the report shows EXTENDED
/// COPY for every byte, and sg_dd finds the source's bytes on LUN1.
fn sg_stack_copy_engine_lun0_to_lun1_is_extended_copy(env: &GuestEnv) -> Result<(), String> {
    use ustor::bdev_stack::LbaRange;
    use ustor::copy_engine::{CopyEngine, CopyOptions, Method};
    let (a, b) = lio_sg_paths(env)?;
    let registry = ustor::bdev_stack::spec::LeafRegistry::with_defaults();
    let src = registry
        .build(&format!("sg:{a}"))
        .map_err(|e| e.to_string())?;
    let dst = registry
        .build(&format!("sg:{b}"))
        .map_err(|e| e.to_string())?;
    println!("ok source offloads {:?}", src.info().copy_offloads);
    println!("ok destination offloads {:?}", dst.info().copy_offloads);
    let (from, to, blocks) = (20_000u64, 70_000u64, 4096u64);
    let data = conformance::pattern(seed(), (blocks * 512) as usize);
    stack_write(src.as_ref(), from, &data)?;
    stack_write(dst.as_ref(), to, &vec![0x5a; data.len()])?;
    let mut engine = CopyEngine::new(CopyOptions::default()).map_err(|e| e.to_string())?;
    let report = engine
        .copy(
            &src,
            &[LbaRange { lba: from, blocks }],
            &dst,
            &[LbaRange { lba: to, blocks }],
        )
        .map_err(|e| e.to_string())?;
    println!("{report}");
    if !report.is_complete() {
        return Err(format!("copy incomplete: {report}"));
    }
    let xcopy = report.method(Method::ExtendedCopy).bytes;
    if xcopy != blocks * 512 || report.method(Method::Bounce).bytes != 0 {
        return Err(format!(
            "expected {} bytes by EXTENDED COPY and none bounced: {report}",
            blocks * 512
        ));
    }
    drop(src);
    drop(dst);
    let back = sg_dd_read(&b, to, blocks)?;
    if back != data {
        return Err(format!(
            "LUN1 {b} blocks {to}.. do not hold the source's bytes"
        ));
    }
    println!("ok {blocks} blocks {a}@{from} -> {b}@{to} by EXTENDED COPY, sg_dd agrees");
    Ok(())
}

/// A copy from LUN 0 into mirror(LUN 0, LUN 1) on LIO: one EXTENDED COPY
/// per leg (the source and the mirror's first leg are two handles of one
/// LUN, seen as one by its verified designator), nothing bounced; `sg_dd`
/// finds the copy on both LUNs.
fn sg_copy_into_a_mirror_of_two_luns_offloads_on_both_legs(env: &GuestEnv) -> Result<(), String> {
    use ustor::bdev_stack::LbaRange;
    use ustor::copy_engine::{CopyEngine, CopyOptions, Method};
    let (a, b) = lio_sg_paths(env)?;
    let registry = ustor::bdev_stack::spec::LeafRegistry::with_defaults();
    let src = registry
        .build(&format!("sg:{a}"))
        .map_err(|e| e.to_string())?;
    let mirror = registry
        .build(&format!("mirror(sg:{a}, sg:{b})"))
        .map_err(|e| e.to_string())?;
    let (from, to, blocks) = (30_000u64, 90_000u64, 2048u64);
    let data = conformance::pattern(seed(), (blocks * 512) as usize);
    stack_write(src.as_ref(), from, &data)?;
    stack_write(mirror.as_ref(), to, &vec![0xa5; data.len()])?;
    let mut engine = CopyEngine::new(CopyOptions::default()).map_err(|e| e.to_string())?;
    let report = engine
        .copy(
            &src,
            &[LbaRange { lba: from, blocks }],
            &mirror,
            &[LbaRange { lba: to, blocks }],
        )
        .map_err(|e| e.to_string())?;
    println!("{report}");
    if !report.is_complete() || report.host_bytes() != 0 {
        return Err(format!(
            "expected a complete copy, nothing bounced: {report}"
        ));
    }
    let legs: Vec<_> = report
        .per_leaf
        .iter()
        .filter(|l| l.method == Method::ExtendedCopy && l.bytes == blocks * 512)
        .collect();
    if legs.len() != 2 {
        return Err(format!(
            "expected EXTENDED COPY of every block on both legs: {report}"
        ));
    }
    drop(engine);
    drop(src);
    drop(mirror);
    for lun in [&a, &b] {
        if sg_dd_read(lun, to, blocks)? != data {
            return Err(format!("{lun} blocks {to}.. do not hold the copy"));
        }
    }
    println!(
        "ok {blocks} blocks {a}@{from} -> mirror({a}, {b})@{to}: EXTENDED COPY on both legs, sg_dd agrees"
    );
    Ok(())
}
