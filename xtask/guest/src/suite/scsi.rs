//! SCSI through SG_IO against LIO and virtio-scsi, cross-checked with sg3_utils.

use super::{GuestEnv, GuestTest, Kind};
use crate::reference::{SgInq, SgReadcap};
use crate::setup::{ScsiDevice, tool_output};
use crate::topology::DEFAULT;
use std::time::Duration;

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
