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
