//! READ CAPACITY(16) parameter data (SBC-3, "READ CAPACITY (16) parameter
//! data").

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::ParseError;

/// READ CAPACITY(16) parameter data as it appears on the wire (32 bytes,
/// big-endian). Bit fields are decoded by [`Capacity16`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ReadCapacity16Wire {
    /// RETURNED LOGICAL BLOCK ADDRESS: the last LBA.
    pub returned_lba: U64,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub logical_block_length: U32,
    /// RC BASIS (5..4, SBC-4), P_TYPE (3..1), PROT_EN (0).
    pub byte12: u8,
    /// P_I_EXPONENT (7..4), LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT (3..0).
    pub byte13: u8,
    /// LBPME (15), LBPRZ (14), LOWEST ALIGNED LOGICAL BLOCK ADDRESS (13..0).
    pub bytes14_15: U16,
    /// Reserved.
    pub _rsvd16: [u8; 16],
}

const _: () = {
    assert!(size_of::<ReadCapacity16Wire>() == 32);
    assert!(std::mem::offset_of!(ReadCapacity16Wire, logical_block_length) == 8);
    assert!(std::mem::offset_of!(ReadCapacity16Wire, byte12) == 12);
    assert!(std::mem::offset_of!(ReadCapacity16Wire, bytes14_15) == 14);
};

/// Decoded READ CAPACITY(16) parameter data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Capacity16 {
    /// RETURNED LOGICAL BLOCK ADDRESS: the LBA of the last logical block
    /// (not the count).
    pub returned_lba: u64,
    /// LOGICAL BLOCK LENGTH IN BYTES.
    pub logical_block_length: u32,
    /// RC BASIS (SBC-4): what RETURNED LOGICAL BLOCK ADDRESS is based on
    /// (0: may not be the capacity of the medium in use, 1: the capacity of
    /// the logical unit). 0 on SBC-3 devices.
    pub rc_basis: u8,
    /// PROT_EN: protection information is enabled.
    pub prot_en: bool,
    /// P_TYPE: protection type minus one (when `prot_en`).
    pub p_type: u8,
    /// P_I_EXPONENT: protection information intervals per logical block,
    /// as a power of two.
    pub p_i_exponent: u8,
    /// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT.
    pub lbppbe: u8,
    /// LBPME: logical block provisioning (thin provisioning, UNMAP) enabled.
    pub lbpme: bool,
    /// LBPRZ: unmapped blocks read as zeros.
    pub lbprz: bool,
    /// LOWEST ALIGNED LOGICAL BLOCK ADDRESS (a 14-bit field, widened to the
    /// crate's LBA type).
    pub lowest_aligned_lba: u64,
}

impl Capacity16 {
    /// Length of the parameter data.
    pub const LEN: usize = 32;

    /// Parse the bytes the device actually transferred; fewer than 32 bytes
    /// is an error.
    pub fn parse(bytes: &[u8]) -> Result<Capacity16, ParseError> {
        let (w, _) =
            ReadCapacity16Wire::read_from_prefix(bytes).map_err(|_| ParseError::Truncated {
                what: "READ CAPACITY(16) parameter data",
                needed: Self::LEN,
                available: bytes.len(),
            })?;
        let b14 = w.bytes14_15.get();
        Ok(Capacity16 {
            returned_lba: w.returned_lba.get(),
            logical_block_length: w.logical_block_length.get(),
            rc_basis: (w.byte12 >> 4) & 0x03,
            prot_en: w.byte12 & 0x01 != 0,
            p_type: (w.byte12 >> 1) & 0x07,
            p_i_exponent: w.byte13 >> 4,
            lbppbe: w.byte13 & 0x0f,
            lbpme: b14 & 0x8000 != 0,
            lbprz: b14 & 0x4000 != 0,
            lowest_aligned_lba: u64::from(b14 & 0x3fff),
        })
    }

    /// The wire form, e.g. for a target to return. Fields wider than their
    /// wire field are masked.
    pub fn to_bytes(&self) -> [u8; 32] {
        let w = ReadCapacity16Wire {
            returned_lba: U64::new(self.returned_lba),
            logical_block_length: U32::new(self.logical_block_length),
            byte12: ((self.rc_basis & 0x03) << 4)
                | ((self.p_type & 0x07) << 1)
                | u8::from(self.prot_en),
            byte13: ((self.p_i_exponent & 0x0f) << 4) | (self.lbppbe & 0x0f),
            bytes14_15: U16::new(
                (u16::from(self.lbpme) << 15)
                    | (u16::from(self.lbprz) << 14)
                    | u16::try_from(self.lowest_aligned_lba & 0x3fff).unwrap_or(0),
            ),
            _rsvd16: [0; 16],
        };
        zerocopy::transmute!(w)
    }

    /// Number of logical blocks (`returned_lba + 1`); `None` if the device
    /// reported `u64::MAX`, which has no representable count.
    pub fn block_count(&self) -> Option<u64> {
        self.returned_lba.checked_add(1)
    }

    /// Capacity in bytes; `None` on overflow (a device claiming more than
    /// 2^64 bytes is lying or broken).
    pub fn capacity_bytes(&self) -> Option<u64> {
        self.block_count()?
            .checked_mul(u64::from(self.logical_block_length))
    }

    /// Logical blocks per physical block (`2^lbppbe`).
    pub fn logical_per_physical(&self) -> u32 {
        1u32 << self.lbppbe.min(15)
    }

    /// Protection type 1..=3 when protection is enabled (`p_type + 1`).
    pub fn protection_type(&self) -> Option<u8> {
        self.prot_en.then_some(self.p_type + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 131072 blocks of 512 bytes (64 MiB): LIO FILEIO or a QEMU disk with
    /// discard (LBPME, LBPRZ).
    pub(crate) fn readcap_64mib() -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&0x1_ffffu64.to_be_bytes());
        b[8..12].copy_from_slice(&512u32.to_be_bytes());
        b[14] = 0xc0;
        b
    }

    #[test]
    fn parse_64mib() {
        let c = Capacity16::parse(&readcap_64mib()).unwrap();
        assert_eq!(c.returned_lba, 131_071);
        assert_eq!(c.block_count(), Some(131_072));
        assert_eq!(c.logical_block_length, 512);
        assert_eq!(c.capacity_bytes(), Some(64 << 20));
        assert!(!c.prot_en);
        assert_eq!(c.protection_type(), None);
        assert!(c.lbpme && c.lbprz);
        assert_eq!(c.lbppbe, 0);
        assert_eq!(c.logical_per_physical(), 1);
        assert_eq!(c.lowest_aligned_lba, 0);
        assert_eq!(c.to_bytes(), readcap_64mib());
    }

    #[test]
    fn bit_fields() {
        let mut b = readcap_64mib();
        b[12] = 0x15; // RC BASIS 1, P_TYPE 2 (type 3), PROT_EN
        b[13] = 0x23; // P_I_EXPONENT 2, LBPPBE 3 (4K physical)
        b[14] = 0x3f;
        b[15] = 0xff;
        let c = Capacity16::parse(&b).unwrap();
        assert!(c.prot_en);
        assert_eq!(c.rc_basis, 1);
        assert_eq!(c.p_type, 2);
        assert_eq!(c.protection_type(), Some(3));
        assert_eq!(c.p_i_exponent, 2);
        assert_eq!(c.lbppbe, 3);
        assert_eq!(c.logical_per_physical(), 8);
        assert!(!c.lbpme && !c.lbprz);
        assert_eq!(c.lowest_aligned_lba, 0x3fff);
        assert_eq!(c.to_bytes(), b);
    }

    #[test]
    fn overflow_and_short() {
        let mut b = readcap_64mib();
        b[..8].copy_from_slice(&u64::MAX.to_be_bytes());
        let c = Capacity16::parse(&b).unwrap();
        assert_eq!(c.block_count(), None);
        assert_eq!(c.capacity_bytes(), None);
        b[..8].copy_from_slice(&(u64::MAX / 2).to_be_bytes());
        assert_eq!(Capacity16::parse(&b).unwrap().capacity_bytes(), None);
        assert!(matches!(
            Capacity16::parse(&b[..31]),
            Err(ParseError::Truncated {
                needed: 32,
                available: 31,
                ..
            })
        ));
    }
}
