//! Conformance checks shared by the host tests (on [`crate::emu`]) and the
//! VM tests (on LIO through SG_IO): the same expectations of a real target
//! and of the emulator, so the emulator cannot drift from what real
//! targets do.
//!
//! Each check returns `Err` with a description on the first mismatch. They
//! write to the LUNs they are given: use scratch LUNs.

use std::time::Duration;

use crate::cdb;
use crate::sense::SenseKey;
use crate::tpc::{CscdId, ExtendedCopy, Segment};
use crate::{DataTransfer, Error, ScsiDevice, ScsiStatus, ScsiTransport};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A deterministic pattern that differs per `seed` and per block.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn expect_sense<T: ScsiTransport + ?Sized>(
    t: &T,
    what: &str,
    cdb: &[u8],
    data: DataTransfer<'_>,
    key: SenseKey,
    asc: u8,
    ascq: u8,
) -> Result<(), String> {
    let o = t
        .execute(cdb, data, TIMEOUT)
        .map_err(|e| format!("{what}: transport error {e}"))?;
    if o.status != ScsiStatus::CheckCondition {
        return Err(format!(
            "{what}: status {}, expected CHECK CONDITION",
            o.status
        ));
    }
    let sense = match o.sense() {
        Some(Ok(s)) => s,
        other => return Err(format!("{what}: no usable sense ({other:?})")),
    };
    if sense.key != key || sense.asc != asc || sense.ascq != ascq {
        return Err(format!(
            "{what}: sense {sense}, expected {key} {asc:#04x}/{ascq:#04x}"
        ));
    }
    Ok(())
}

/// The probe found what a direct-access LUN must have: a block size, a
/// capacity, a binary NAA designator of the LU, block limits.
pub fn probe_sane<T: ScsiTransport>(dev: &ScsiDevice<T>) -> Result<(), String> {
    let id = dev.identity();
    if !matches!(dev.block_len(), 512 | 1024 | 2048 | 4096) {
        return Err(format!("odd block length {}", dev.block_len()));
    }
    if dev.block_count() == 0 || dev.block_count() == u64::MAX {
        return Err(format!("odd block count {}", dev.block_count()));
    }
    if id.naa().is_none() {
        return Err(format!("no NAA designator among {:?}", id.designators));
    }
    if !id.vpd_pages.contains(&0x83) || !id.vpd_pages.contains(&0xb0) {
        return Err(format!("VPD pages {:02x?} lack 0x83 or 0xb0", id.vpd_pages));
    }
    Ok(())
}

/// Write a pattern (once with FUA), read it back, compare.
pub fn write_read_verify<T: ScsiTransport>(
    dev: &ScsiDevice<T>,
    lba: u64,
    blocks: usize,
    seed: u64,
) -> Result<(), String> {
    let bl = usize::try_from(dev.block_len()).map_err(|e| e.to_string())?;
    let data = pattern(seed, blocks * bl);
    dev.write(lba, &data, false).map_err(|e| e.to_string())?;
    let mut back = vec![0u8; data.len()];
    dev.read(lba, &mut back).map_err(|e| e.to_string())?;
    if back != data {
        return Err(format!("read-back of LBA {lba}+{blocks} differs"));
    }
    // FUA is optional (LIO fileio without a write cache refuses it with
    // INVALID FIELD IN CDB): either it writes, or it is refused and
    // writes nothing.
    let data2 = pattern(seed ^ 0xff, bl);
    let fua = dev.write(lba, &data2, true);
    dev.synchronize_cache().map_err(|e| e.to_string())?;
    dev.read(lba, &mut back[..bl]).map_err(|e| e.to_string())?;
    match fua {
        Ok(()) if back[..bl] == data2[..] => {}
        Ok(()) => return Err(format!("FUA write at LBA {lba} not read back")),
        Err(e)
            if e.sense().is_some_and(|s| {
                (s.key, s.asc, s.ascq) == (SenseKey::IllegalRequest, 0x24, 0x00)
            }) =>
        {
            if back[..bl] != data[..bl] {
                return Err(format!("refused FUA write changed LBA {lba}"));
            }
        }
        Err(e) => return Err(format!("FUA write: {e}")),
    }
    Ok(())
}

/// Error paths every SBC target answers the same way: READ(16) past the
/// end (LBA OUT OF RANGE), an unassigned opcode (INVALID COMMAND
/// OPERATION CODE), standard INQUIRY with a page code (INVALID FIELD IN
/// CDB), RECEIVE COPY OPERATING PARAMETERS with less than 54 bytes (LIO
/// refuses it; INVALID FIELD IN CDB).
pub fn error_paths<T: ScsiTransport>(dev: &ScsiDevice<T>) -> Result<(), String> {
    let t = dev.transport();
    let bl = usize::try_from(dev.block_len()).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; bl];
    expect_sense(
        t,
        "READ(16) past the end",
        &cdb::read16(dev.block_count(), 1, false),
        DataTransfer::FromDevice(&mut buf),
        SenseKey::IllegalRequest,
        0x21,
        0x00,
    )?;
    expect_sense(
        t,
        "unassigned opcode 0x02",
        &[0x02, 0, 0, 0, 0, 0],
        DataTransfer::None,
        SenseKey::IllegalRequest,
        0x20,
        0x00,
    )?;
    let mut inq = [0u8; 36];
    expect_sense(
        t,
        "standard INQUIRY with page code",
        &cdb::inquiry(false, 0x83, 36),
        DataTransfer::FromDevice(&mut inq),
        SenseKey::IllegalRequest,
        0x24,
        0x00,
    )?;
    if dev.identity().copy.extended_copy.is_some() {
        let mut small = [0u8; 32];
        expect_sense(
            t,
            "RECEIVE COPY OPERATING PARAMETERS with 32 bytes",
            &cdb::receive_copy_operating_parameters(32),
            DataTransfer::FromDevice(&mut small),
            SenseKey::IllegalRequest,
            0x24,
            0x00,
        )?;
    }
    // The library refuses a range past the end before sending anything.
    match dev.read(dev.block_count(), &mut buf) {
        Err(Error::InvalidRequest { .. }) => Ok(()),
        other => Err(format!("ScsiDevice::read past the end gave {other:?}")),
    }
}

/// EXTENDED COPY of `blocks` from `src` to `dst`, verified by reading back;
/// then the copy manager's refusals: an unknown NAA (COPY ABORTED, COPY
/// TARGET DEVICE NOT REACHABLE) and more segments than it allows (TOO MANY
/// SEGMENT DESCRIPTORS).
pub fn extended_copy<T: ScsiTransport, U: ScsiTransport>(
    src: &ScsiDevice<T>,
    dst: &ScsiDevice<U>,
    src_lba: u64,
    dst_lba: u64,
    blocks: usize,
    seed: u64,
) -> Result<(), String> {
    let Some(params) = src.identity().copy.extended_copy.clone() else {
        return Err("source has no EXTENDED COPY".into());
    };
    let bl = usize::try_from(src.block_len()).map_err(|e| e.to_string())?;
    let data = pattern(seed, blocks * bl);
    src.write(src_lba, &data, false)
        .map_err(|e| e.to_string())?;
    dst.write(dst_lba, &vec![0u8; data.len()], false)
        .map_err(|e| e.to_string())?;
    let n = u64::try_from(blocks).map_err(|e| e.to_string())?;
    src.copy_to(src_lba, dst, dst_lba, n)
        .map_err(|e| format!("EXTENDED COPY: {e}"))?;
    let mut back = vec![0u8; data.len()];
    dst.read(dst_lba, &mut back).map_err(|e| e.to_string())?;
    if back != data {
        return Err("EXTENDED COPY destination differs from source".into());
    }
    let naa = src.identity().naa().unwrap_or(&[]).to_vec();
    let mut bogus = naa.clone();
    if let Some(b) = bogus.last_mut() {
        *b ^= 0x5a;
    }
    if let Some(b) = bogus.get_mut(5) {
        *b ^= 0xa5;
    }
    let seg = Segment {
        source: 0,
        destination: 1,
        blocks: 1,
        source_lba: src_lba,
        destination_lba: dst_lba,
    };
    let list = |cscds: Vec<CscdId>, segments: Vec<Segment>| ExtendedCopy {
        list_id: 0,
        no_list_id: true,
        cscds,
        segments,
    };
    let id = |naa: &[u8]| CscdId {
        naa: naa.to_vec(),
        block_len: src.block_len(),
    };
    let check = |what: &str, x: ExtendedCopy, key: SenseKey, asc: u8, ascq: u8| {
        let b = x.to_bytes().ok_or("list does not encode")?;
        let len = u32::try_from(b.len()).map_err(|e| e.to_string())?;
        expect_sense(
            src.transport(),
            what,
            &cdb::extended_copy_lid1(len),
            DataTransfer::ToDevice(&b),
            key,
            asc,
            ascq,
        )
    };
    check(
        "EXTENDED COPY to an unknown NAA",
        list(vec![id(&naa), id(&bogus)], vec![seg]),
        SenseKey::CopyAborted,
        0x0d,
        0x02,
    )?;
    let dst_naa = dst.identity().naa().unwrap_or(&[]).to_vec();
    if dst_naa != naa {
        // Sent to the source LUN, naming the destination LUN on both
        // sides: the receiving LUN takes no part (LIO: not reachable).
        let seg = Segment {
            source: 0,
            destination: 0,
            ..seg
        };
        check(
            "EXTENDED COPY between two other LUNs",
            list(vec![id(&dst_naa)], vec![seg]),
            SenseKey::CopyAborted,
            0x0d,
            0x02,
        )?;
    }
    let too_many = usize::from(params.max_segment_descriptors) + 1;
    check(
        "EXTENDED COPY with too many segments",
        list(vec![id(&naa), id(&dst_naa)], vec![seg; too_many]),
        SenseKey::IllegalRequest,
        0x26,
        0x08,
    )?;
    Ok(())
}

/// A LUN without ROD tokens: the probe says so, and the typed token
/// commands refuse without sending anything.
pub fn no_rod_tokens<T: ScsiTransport>(dev: &ScsiDevice<T>) -> Result<(), String> {
    if dev.identity().copy.rod_tokens.is_some() {
        return Err("probe reports ROD tokens".into());
    }
    match dev.populate_token(1, &[crate::tpc::BlockRange { lba: 0, blocks: 1 }], 0) {
        Err(Error::Unsupported { .. }) => Ok(()),
        other => Err(format!(
            "POPULATE TOKEN on a LUN without tokens gave {other:?}"
        )),
    }
}
