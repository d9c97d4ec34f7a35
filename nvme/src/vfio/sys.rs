//! Raw VFIO ioctls and syscalls that vfio-ioctls does not wrap (or wraps
//! without returning errors). Each `unsafe` block says why it is sound.

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_TYPE, vfio_iommu_type1_info, vfio_region_info,
};
use zerocopy::FromBytes;

use super::iova::IovaRange;

/// `_IO(type, nr)`: direction and size bits are zero for VFIO's ioctls.
const fn io(nr: u32) -> libc::Ioctl {
    (((VFIO_TYPE as u32) << 8) | nr) as libc::Ioctl
}

const VFIO_DEVICE_GET_REGION_INFO: libc::Ioctl = io(VFIO_BASE + 8);
const VFIO_IOMMU_GET_INFO: libc::Ioctl = io(VFIO_BASE + 12);

const _: () = {
    // Numbers from include/uapi/linux/vfio.h.
    assert!(VFIO_DEVICE_GET_REGION_INFO == 0x3B6C);
    assert!(VFIO_IOMMU_GET_INFO == 0x3B70);
    assert!(size_of::<vfio_region_info>() == 32);
    assert!(size_of::<vfio_iommu_type1_info>() == 24);
};

/// VFIO_DEVICE_GET_REGION_INFO for region `index` of the device `fd`
/// (without its capability chain).
pub(crate) fn region_info(fd: RawFd, index: u32) -> io::Result<vfio_region_info> {
    let mut info = vfio_region_info {
        argsz: size_of::<vfio_region_info>() as u32,
        index,
        ..Default::default()
    };
    // SAFETY: VFIO_DEVICE_GET_REGION_INFO reads and writes at most `argsz`
    // bytes of the struct we pass, which is a live, exclusively borrowed
    // `vfio_region_info` of exactly that size. A bad fd only yields an error.
    let ret = unsafe { libc::ioctl(fd, VFIO_DEVICE_GET_REGION_INFO, &mut info as *mut _) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// What VFIO_IOMMU_GET_INFO says about a type1 container.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct IommuInfo {
    /// Bitmap of supported IOMMU page sizes, if reported.
    pub pgsizes: Option<u64>,
    /// Usable IOVA ranges, if the kernel has the IOVA-range capability.
    pub iova_ranges: Option<Vec<IovaRange>>,
}

/// Largest info buffer we accept from the kernel (guards the retry loop).
const MAX_INFO_LEN: usize = 1 << 20;

/// VFIO_IOMMU_GET_INFO on the container `fd`, with its capability chain.
/// Must be called after the container's IOMMU type is set (i.e. after a
/// group was attached).
pub(crate) fn iommu_info(fd: RawFd) -> io::Result<IommuInfo> {
    let mut argsz = size_of::<vfio_iommu_type1_info>();
    loop {
        let mut buf = vec![0u8; argsz];
        let len = buf.len();
        // The kernel reads `argsz`, the first field, to learn the buffer size.
        buf[..4].copy_from_slice(&(len as u32).to_ne_bytes());
        // SAFETY: the kernel writes at most `argsz` (= `len`) bytes into the
        // buffer, a live, exclusively borrowed allocation of `len` bytes
        // (it copies with copy_to_user, so alignment does not matter). A bad
        // fd only yields an error.
        let ret = unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        match parse_iommu_info(&buf)? {
            Parsed::Done(info) => return Ok(info),
            Parsed::NeedMore(want) if want > len && want <= MAX_INFO_LEN => argsz = want,
            Parsed::NeedMore(want) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("VFIO_IOMMU_GET_INFO asks for an odd buffer size {want}"),
                ));
            }
        }
    }
}

#[derive(Debug)]
enum Parsed {
    Done(IommuInfo),
    NeedMore(usize),
}

#[derive(FromBytes)]
#[repr(C)]
struct CapHeader {
    id: u16,
    _version: u16,
    next: u32,
}

#[derive(FromBytes)]
#[repr(C)]
struct RangeRaw {
    start: u64,
    end: u64,
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Parses a VFIO_IOMMU_GET_INFO answer (native endian), walking the
/// capability chain with bounds checks on every offset.
fn parse_iommu_info(bytes: &[u8]) -> io::Result<Parsed> {
    let (info, _) = vfio_iommu_type1_info_raw::read_from_prefix(bytes)
        .map_err(|_| bad("short VFIO_IOMMU_GET_INFO answer"))?;
    let argsz = info.argsz as usize;
    if argsz > bytes.len() {
        return Ok(Parsed::NeedMore(argsz));
    }
    let mut out = IommuInfo {
        pgsizes: (info.flags & VFIO_IOMMU_INFO_PGSIZES != 0).then_some(info.iova_pgsizes),
        iova_ranges: None,
    };
    if info.flags & VFIO_IOMMU_INFO_CAPS == 0 {
        return Ok(Parsed::Done(out));
    }
    let bytes = &bytes[..argsz];
    let mut off = info.cap_offset as usize;
    let mut hops = 0;
    while off != 0 {
        hops += 1;
        if hops > 64 || off < size_of::<vfio_iommu_type1_info>() {
            return Err(bad("VFIO capability chain loops or points into the header"));
        }
        let cap = bytes
            .get(off..)
            .ok_or_else(|| bad("VFIO capability out of bounds"))?;
        let (hdr, body) =
            CapHeader::read_from_prefix(cap).map_err(|_| bad("VFIO capability out of bounds"))?;
        if u32::from(hdr.id) == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
            let (nr, body) =
                <[u32; 2]>::read_from_prefix(body).map_err(|_| bad("short IOVA range cap"))?;
            let nr = nr[0] as usize;
            let mut ranges = Vec::with_capacity(nr.min(64));
            let mut rest = body;
            for _ in 0..nr {
                let (r, tail) =
                    RangeRaw::read_from_prefix(rest).map_err(|_| bad("short IOVA range cap"))?;
                rest = tail;
                // VFIO's `end` is inclusive.
                if let Some(range) = IovaRange::from_inclusive(r.start, r.end) {
                    ranges.push(range);
                }
            }
            out.iova_ranges = Some(ranges);
        }
        let next = hdr.next as usize;
        if next != 0 && next <= off {
            return Err(bad("VFIO capability chain goes backwards"));
        }
        off = next;
    }
    Ok(Parsed::Done(out))
}

/// `vfio_iommu_type1_info` with zerocopy's derive (the binding has none).
#[derive(FromBytes)]
#[repr(C)]
#[allow(non_camel_case_types)]
struct vfio_iommu_type1_info_raw {
    argsz: u32,
    flags: u32,
    iova_pgsizes: u64,
    cap_offset: u32,
    _pad: u32,
}

const _: () = assert!(size_of::<vfio_iommu_type1_info_raw>() == size_of::<vfio_iommu_type1_info>());

/// Reads exactly `buf.len()` bytes at `offset` of the device `fd`
/// (a VFIO region access: `offset` includes the region's offset).
pub(crate) fn pread_exact(fd: RawFd, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| bad("offset too large"))?;
    // SAFETY: pread writes at most `buf.len()` bytes into `buf`, a live,
    // exclusively borrowed slice. A bad fd or offset only yields an error.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), off) };
    match usize::try_from(n) {
        Err(_) => Err(io::Error::last_os_error()),
        Ok(n) if n == buf.len() => Ok(()),
        Ok(_) => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
    }
}

/// Writes all of `buf` at `offset` of the device `fd`.
pub(crate) fn pwrite_all(fd: RawFd, buf: &[u8], offset: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| bad("offset too large"))?;
    // SAFETY: pwrite reads at most `buf.len()` bytes from `buf`, a live
    // slice. A bad fd or offset only yields an error.
    let n = unsafe { libc::pwrite(fd, buf.as_ptr().cast(), buf.len(), off) };
    match usize::try_from(n) {
        Err(_) => Err(io::Error::last_os_error()),
        Ok(n) if n == buf.len() => Ok(()),
        Ok(_) => Err(io::Error::from(io::ErrorKind::WriteZero)),
    }
}

/// Replaces the mapping at `ptr..ptr + len` (page-aligned, a BAR mapping
/// this process made) with private anonymous memory filled with ones, in
/// one `mmap(MAP_FIXED)`: a thread accessing the range meanwhile meets
/// either the device or the new memory, never an unmapped hole, and the
/// device's mapping is gone.
pub(crate) fn replace_with_ones(ptr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: MAP_FIXED over a range this process mapped (the caller's BAR
    // mapping, which it keeps owning and unmaps on drop) atomically swaps
    // it for fresh anonymous memory of the same size; no other mapping is
    // touched.
    let got = unsafe {
        libc::mmap(
            ptr.cast(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if got == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the range is now private anonymous memory of `len` bytes.
    unsafe { std::ptr::write_bytes(ptr, 0xff, len) };
    Ok(())
}

/// `madvise(MADV_DONTFORK)`: keep DMA memory out of children, so a fork
/// cannot make the parent's pinned pages copy-on-write.
pub(crate) fn dontfork(ptr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: MADV_DONTFORK only changes how the range is inherited by
    // children; it does not change the contents or the mapping in this
    // process. The caller passes a range it owns; a bad range only yields
    // an error.
    let ret = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTFORK) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le_words(words: &[u64]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_ne_bytes()).collect()
    }

    fn info_bytes(argsz: u32, flags: u32, pgsizes: u64, cap_offset: u32, caps: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&argsz.to_ne_bytes());
        v.extend_from_slice(&flags.to_ne_bytes());
        v.extend_from_slice(&pgsizes.to_ne_bytes());
        v.extend_from_slice(&cap_offset.to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        v.extend_from_slice(caps);
        v
    }

    fn iova_cap(next: u32, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE as u16).to_ne_bytes());
        v.extend_from_slice(&1u16.to_ne_bytes());
        v.extend_from_slice(&next.to_ne_bytes());
        v.extend_from_slice(&(ranges.len() as u32).to_ne_bytes());
        v.extend_from_slice(&0u32.to_ne_bytes());
        for &(s, e) in ranges {
            v.extend_from_slice(&le_words(&[s, e]));
        }
        v
    }

    #[test]
    fn parses_intel_iommu_ranges() {
        // What a 39-bit VT-d domain reports on x86: everything below the
        // MSI window, and above it up to 2^39 - 1.
        let cap = iova_cap(0, &[(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)]);
        let argsz = (24 + cap.len()) as u32;
        let bytes = info_bytes(
            argsz,
            VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS,
            0x4020_1000,
            24,
            &cap,
        );
        let Parsed::Done(info) = parse_iommu_info(&bytes).expect("parses") else {
            panic!("complete answer");
        };
        assert_eq!(info.pgsizes, Some(0x4020_1000));
        let ranges = info.iova_ranges.expect("cap present");
        assert_eq!(ranges.len(), 2);
        assert_eq!((ranges[0].start(), ranges[0].end()), (0, 0xfee0_0000));
        assert_eq!((ranges[1].start(), ranges[1].end()), (0xfef0_0000, 1 << 39));
    }

    #[test]
    fn asks_for_more_when_argsz_grows() {
        let bytes = info_bytes(200, VFIO_IOMMU_INFO_CAPS, 0, 0, &[]);
        assert!(matches!(
            parse_iommu_info(&bytes),
            Ok(Parsed::NeedMore(200))
        ));
    }

    #[test]
    fn no_caps_no_ranges() {
        let bytes = info_bytes(24, VFIO_IOMMU_INFO_PGSIZES, 0x1000, 0, &[]);
        let Parsed::Done(info) = parse_iommu_info(&bytes).expect("parses") else {
            panic!("complete answer");
        };
        assert_eq!(info.iova_ranges, None);
        assert_eq!(info.pgsizes, Some(0x1000));
    }

    #[test]
    fn rejects_bad_chains() {
        // Capability pointing into the header.
        let bytes = info_bytes(24, VFIO_IOMMU_INFO_CAPS, 0, 8, &[]);
        assert!(parse_iommu_info(&bytes).is_err());
        // Capability past the end.
        let bytes = info_bytes(24, VFIO_IOMMU_INFO_CAPS, 0, 4000, &[]);
        assert!(parse_iommu_info(&bytes).is_err());
        // Self loop.
        let cap = iova_cap(24, &[(0, 0xffff_ffff)]);
        let bytes = info_bytes((24 + cap.len()) as u32, VFIO_IOMMU_INFO_CAPS, 0, 24, &cap);
        assert!(parse_iommu_info(&bytes).is_err());
        // Range count larger than the buffer.
        let mut cap = iova_cap(0, &[(0, 0xffff_ffff)]);
        cap[8] = 200;
        let bytes = info_bytes((24 + cap.len()) as u32, VFIO_IOMMU_INFO_CAPS, 0, 24, &cap);
        assert!(parse_iommu_info(&bytes).is_err());
        // Truncated input never panics.
        let cap = iova_cap(0, &[(0, 0xffff_ffff)]);
        let full = info_bytes((24 + cap.len()) as u32, VFIO_IOMMU_INFO_CAPS, 0, 24, &cap);
        for n in 0..full.len() {
            let _ = parse_iommu_info(&full[..n]);
        }
    }
}
