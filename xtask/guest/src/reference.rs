//! Parsers for what the reference tools (nvme-cli, sg3_utils) print, so
//! guest tests can compare the drivers' view of a device with theirs.
//!
//! The tools' output is text meant for people; these parsers look for the
//! labelled values and fail loudly when a label is missing, so a change in
//! a tool's format shows up as a test error, never as a silent pass.

use std::collections::BTreeMap;

/// Finds `key` in `text` and parses the unsigned number right after it
/// (decimal, or hex with a `0x` prefix). Keys are matched at a word start
/// so that `LBA=` does not match inside `Last LBA=`.
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let mut from = 0;
    while let Some(pos) = text[from..].find(key) {
        let at = from + pos;
        let boundary = at == 0
            || !text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if boundary {
            let rest = text[at + key.len()..].trim_start();
            return parse_number(rest);
        }
        from = at + key.len();
    }
    None
}

fn parse_number(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        let digits: String = hex.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        u64::from_str_radix(&digits, 16).ok()
    } else {
        let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok()
    }
}

/// The text after `label` up to the end of its line, trimmed.
pub fn text_after<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|line| line.trim_start().strip_prefix(label))
        .map(str::trim)
}

/// `KEY=VALUE` tokens of `sg_inq`'s flag block, brackets stripped.
pub fn flag_tokens(text: &str) -> BTreeMap<String, String> {
    text.split_whitespace()
        .map(|t| t.trim_matches(|c| c == '[' || c == ']' || c == ','))
        .filter_map(|t| t.split_once('='))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// What `sg_inq DEVICE` printed of a standard INQUIRY.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgInq {
    /// PQual.
    pub peripheral_qualifier: u8,
    /// PDT.
    pub peripheral_device_type: u8,
    /// RMB.
    pub removable: bool,
    /// version (hex).
    pub version: u8,
    /// Resp_data_format.
    pub response_data_format: u8,
    /// NormACA.
    pub normaca: bool,
    /// HiSUP.
    pub hisup: bool,
    /// SCCS.
    pub sccs: bool,
    /// TPGS.
    pub tpgs: u8,
    /// 3PC.
    pub third_party_copy: bool,
    /// Protect.
    pub protect: bool,
    /// CmdQue.
    pub cmdque: bool,
    /// Vendor identification.
    pub vendor: String,
    /// Product identification.
    pub product: String,
    /// Product revision level.
    pub revision: String,
}

impl SgInq {
    /// Parses `sg_inq`'s output.
    pub fn parse(text: &str) -> Result<SgInq, String> {
        let flags = flag_tokens(text);
        let num = |key: &str| -> Result<u64, String> {
            let v = flags
                .get(key)
                .ok_or_else(|| format!("sg_inq printed no {key}="))?;
            parse_number(v).ok_or_else(|| format!("sg_inq printed {key}={v}, not a number"))
        };
        let label = |l: &str| -> Result<String, String> {
            text_after(text, l)
                .map(str::to_string)
                .ok_or_else(|| format!("sg_inq printed no '{l}'"))
        };
        Ok(SgInq {
            peripheral_qualifier: num("PQual")? as u8,
            peripheral_device_type: num("PDT")? as u8,
            removable: num("RMB")? != 0,
            version: num("version")? as u8,
            response_data_format: num("Resp_data_format")? as u8,
            normaca: num("NormACA")? != 0,
            hisup: num("HiSUP")? != 0,
            sccs: num("SCCS")? != 0,
            tpgs: num("TPGS")? as u8,
            third_party_copy: num("3PC")? != 0,
            protect: num("Protect")? != 0,
            cmdque: num("CmdQue")? != 0,
            vendor: label("Vendor identification:")?,
            product: label("Product identification:")?,
            revision: label("Product revision level:")?,
        })
    }
}

/// What `sg_readcap -16 DEVICE` printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgReadcap {
    /// prot_en.
    pub prot_en: bool,
    /// p_type.
    pub p_type: u8,
    /// lbpme.
    pub lbpme: bool,
    /// lbprz.
    pub lbprz: bool,
    /// Last LBA.
    pub last_lba: u64,
    /// Number of logical blocks.
    pub block_count: u64,
    /// Logical block length in bytes.
    pub block_length: u32,
    /// Logical blocks per physical block exponent.
    pub lbppbe: u8,
    /// Lowest aligned LBA.
    pub lowest_aligned_lba: u64,
}

impl SgReadcap {
    /// Parses `sg_readcap -16`'s output.
    pub fn parse(text: &str) -> Result<SgReadcap, String> {
        let num = |key: &str| {
            number_after(text, key).ok_or_else(|| format!("sg_readcap printed no '{key}'"))
        };
        Ok(SgReadcap {
            prot_en: num("prot_en=")? != 0,
            p_type: num("p_type=")? as u8,
            lbpme: num("lbpme=")? != 0,
            lbprz: num("lbprz=")? != 0,
            last_lba: num("Last LBA=")?,
            block_count: num("Number of logical blocks=")?,
            block_length: num("Logical block length=")? as u32,
            lbppbe: num("Logical blocks per physical block exponent=")? as u8,
            lowest_aligned_lba: num("Lowest aligned LBA=")?,
        })
    }
}

/// What `nvme show-regs` (plain and `-H`) printed of CAP and VS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShowRegs {
    /// CAP as a raw value.
    pub cap: u64,
    /// VS as a raw value.
    pub version: u32,
    /// "Maximum Queue Entries Supported (MQES)" as nvme-cli decodes it.
    pub mqes_decoded: u64,
    /// "Doorbell Stride (DSTRD)" in bytes as nvme-cli decodes it.
    pub doorbell_stride_bytes: u64,
    /// "NVMe specification X.Y" as nvme-cli decodes it.
    pub spec_version: String,
}

impl ShowRegs {
    /// Parses the plain and human-readable `nvme show-regs` outputs.
    pub fn parse(plain: &str, human: &str) -> Result<ShowRegs, String> {
        let hex_field = |name: &str| -> Result<u64, String> {
            let line = plain
                .lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name))
                .ok_or_else(|| format!("nvme show-regs printed no '{name}'"))?;
            let value = line.split_once(':').map(|(_, v)| v.trim()).unwrap_or("");
            let value = value.trim_start_matches("0x");
            u64::from_str_radix(value, 16)
                .map_err(|e| format!("nvme show-regs printed {name} = {value:?}: {e}"))
        };
        let decoded = |key: &str| {
            number_after(human, key).ok_or_else(|| format!("nvme show-regs -H printed no '{key}'"))
        };
        let spec_version = text_after(human, "NVMe specification")
            .map(str::to_string)
            .ok_or_else(|| "nvme show-regs -H printed no 'NVMe specification'".to_string())?;
        Ok(ShowRegs {
            cap: hex_field("cap")?,
            version: hex_field("version")? as u32,
            mqes_decoded: decoded("(MQES):")?,
            doorbell_stride_bytes: decoded("(DSTRD):")?,
            spec_version,
        })
    }
}

/// What `sg_vpd -p bl DEVICE` printed of the Block Limits page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgVpdBlockLimits {
    /// Maximum transfer length (blocks).
    pub max_transfer: u64,
    /// Optimal transfer length (blocks).
    pub optimal_transfer: u64,
    /// Maximum unmap LBA count (absent from short, SBC-2 style pages).
    pub max_unmap_lba_count: Option<u64>,
    /// Maximum unmap block descriptor count (absent from short pages).
    pub max_unmap_descriptors: Option<u64>,
    /// Maximum write same length (blocks; absent from short pages).
    pub max_write_same: Option<u64>,
}

impl SgVpdBlockLimits {
    /// Parses `sg_vpd -p bl`'s output.
    pub fn parse(text: &str) -> Result<SgVpdBlockLimits, String> {
        let num = |label: &str| {
            number_after(text, label).ok_or_else(|| format!("sg_vpd -p bl printed no '{label}'"))
        };
        Ok(SgVpdBlockLimits {
            max_transfer: num("Maximum transfer length:")?,
            optimal_transfer: num("Optimal transfer length:")?,
            max_unmap_lba_count: number_after(text, "Maximum unmap LBA count:"),
            max_unmap_descriptors: number_after(text, "Maximum unmap block descriptor count:"),
            max_write_same: number_after(text, "Maximum write same length:"),
        })
    }
}

/// What `sg_vpd -p di DEVICE` printed: the logical unit's NAA designator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgVpdDesignators {
    /// The NAA designator of the addressed logical unit, as `0x` + hex.
    pub naa: String,
}

impl SgVpdDesignators {
    /// Parses `sg_vpd -p di`'s output: the first hex line after a
    /// "designator type: NAA" line.
    pub fn parse(text: &str) -> Result<SgVpdDesignators, String> {
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.contains("designator type: NAA") {
                let hex = lines
                    .next()
                    .map(str::trim)
                    .filter(|l| l.starts_with("0x"))
                    .ok_or_else(|| format!("sg_vpd -p di: no hex line after '{}'", line.trim()))?;
                return Ok(SgVpdDesignators {
                    naa: hex.to_ascii_lowercase(),
                });
            }
        }
        Err("sg_vpd -p di printed no NAA designator".to_string())
    }
}

/// What `sg_vpd -p sn DEVICE` printed.
pub fn sg_vpd_serial(text: &str) -> Result<String, String> {
    text_after(text, "Unit serial number:")
        .map(str::to_string)
        .ok_or_else(|| "sg_vpd -p sn printed no 'Unit serial number:'".to_string())
}

/// What `sg_vpd -p lbpv DEVICE` printed of the provisioning flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SgVpdLbpv {
    /// Unmap command supported (LBPU).
    pub lbpu: bool,
    /// Write same (16) with unmap bit supported (LBPWS).
    pub lbpws: bool,
    /// Write same (10) with unmap bit supported (LBPWS10).
    pub lbpws10: bool,
}

impl SgVpdLbpv {
    /// Parses `sg_vpd -p lbpv`'s output.
    pub fn parse(text: &str) -> Result<SgVpdLbpv, String> {
        let flag = |label: &str| {
            number_after(text, label)
                .map(|v| v != 0)
                .ok_or_else(|| format!("sg_vpd -p lbpv printed no '{label}'"))
        };
        Ok(SgVpdLbpv {
            lbpu: flag("(LBPU):")?,
            lbpws: flag("(LBPWS):")?,
            lbpws10: flag("(LBPWS10):")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_after_matches_at_word_starts_only() {
        let t = "Last LBA=131071 (0x1ffff), Number of logical blocks=131072\n lba=7";
        assert_eq!(number_after(t, "Last LBA="), Some(131071));
        assert_eq!(number_after(t, "BA="), None);
        assert_eq!(number_after(t, "ast LBA="), None);
        assert_eq!(number_after(t, "blocks="), Some(131072));
        assert_eq!(number_after(t, "lba="), Some(7));
        assert_eq!(number_after("x v=0x1f", "v="), Some(0x1f));
    }

    const SG_INQ_LIO: &str = include_str!("../testdata/sg_inq-lio.txt");
    const SG_INQ_QEMU: &str = include_str!("../testdata/sg_inq-qemu.txt");
    const SG_READCAP_LIO: &str = include_str!("../testdata/sg_readcap-lio.txt");
    const SG_READCAP_QEMU: &str = include_str!("../testdata/sg_readcap-qemu.txt");
    const SHOW_REGS: &str = include_str!("../testdata/nvme-show-regs.txt");
    const SHOW_REGS_HUMAN: &str = include_str!("../testdata/nvme-show-regs-human.txt");

    #[test]
    fn sg_inq_of_a_lio_lun() {
        let inq = SgInq::parse(SG_INQ_LIO).unwrap();
        assert_eq!(inq.vendor, "LIO-ORG");
        assert_eq!(inq.product, "FILEIO");
        assert_eq!(inq.revision, "4.0");
        assert_eq!(inq.version, 6);
        assert_eq!(inq.tpgs, 3);
        assert!(inq.third_party_copy && inq.sccs && inq.cmdque && !inq.hisup);
        assert_eq!(
            (inq.peripheral_qualifier, inq.peripheral_device_type),
            (0, 0)
        );
    }

    #[test]
    fn sg_inq_of_a_qemu_disk() {
        let inq = SgInq::parse(SG_INQ_QEMU).unwrap();
        assert_eq!(inq.vendor, "QEMU");
        assert_eq!(inq.product, "QEMU HARDDISK");
        assert_eq!(inq.revision, "2.5+");
        assert_eq!(inq.version, 5);
        assert!(!inq.third_party_copy && inq.hisup);
    }

    #[test]
    fn sg_readcap_outputs() {
        let lio = SgReadcap::parse(SG_READCAP_LIO).unwrap();
        assert_eq!(
            (lio.last_lba, lio.block_count, lio.block_length),
            (131071, 131072, 512)
        );
        assert!(!lio.lbpme);
        let qemu = SgReadcap::parse(SG_READCAP_QEMU).unwrap();
        assert_eq!((qemu.last_lba, qemu.block_count), (65535, 65536));
        assert!(qemu.lbpme && !qemu.lbprz && !qemu.prot_en);
        assert_eq!((qemu.lbppbe, qemu.lowest_aligned_lba), (0, 0));
    }

    #[test]
    fn nvme_show_regs_of_qemu() {
        let regs = ShowRegs::parse(SHOW_REGS, SHOW_REGS_HUMAN).unwrap();
        assert_eq!(regs.cap, 0x4018200f0107ff);
        assert_eq!(regs.version, 0x10400);
        assert_eq!(regs.mqes_decoded, 2048);
        assert_eq!(regs.doorbell_stride_bytes, 4);
        assert_eq!(regs.spec_version, "1.4");
    }

    #[test]
    fn missing_labels_are_errors_not_defaults() {
        assert!(SgInq::parse("").is_err());
        assert!(SgInq::parse(&SG_INQ_LIO.replace("3PC=1", "")).is_err());
        assert!(SgReadcap::parse(&SG_READCAP_LIO.replace("Last LBA", "Final LBA")).is_err());
        assert!(ShowRegs::parse(SHOW_REGS, &SHOW_REGS_HUMAN.replace("(DSTRD)", "")).is_err());
        assert!(ShowRegs::parse("cap : zz\n", SHOW_REGS_HUMAN).is_err());
    }

    #[test]
    fn flag_tokens_strip_brackets() {
        let f = flag_tokens("  [AERC=0]  [TrmTsk=]  NormACA=1 version=0x06  [SPC-4]");
        assert_eq!(f.get("AERC").map(String::as_str), Some("0"));
        assert_eq!(f.get("NormACA").map(String::as_str), Some("1"));
        assert_eq!(f.get("version").map(String::as_str), Some("0x06"));
        assert!(!f.contains_key("TrmTsk"));
    }

    #[test]
    fn sg_vpd_pages() {
        let bl = SgVpdBlockLimits::parse(include_str!("../testdata/sg_vpd-bl-lio.txt")).unwrap();
        assert_eq!(bl.max_transfer, 16384);
        assert_eq!(bl.optimal_transfer, 16384);
        assert_eq!(bl.max_unmap_descriptors, None);
        let long = "Maximum transfer length: 8 blocks\nOptimal transfer length: 8 blocks\n\
                    Maximum unmap LBA count: 0 [Unmap command not implemented]\n\
                    Maximum unmap block descriptor count: 1\nMaximum write same length: 0xffff blocks";
        let bl = SgVpdBlockLimits::parse(long).unwrap();
        assert_eq!(
            (
                bl.max_unmap_lba_count,
                bl.max_unmap_descriptors,
                bl.max_write_same
            ),
            (Some(0), Some(1), Some(0xffff))
        );
        let di = SgVpdDesignators::parse(include_str!("../testdata/sg_vpd-di-lio.txt")).unwrap();
        assert_eq!(di.naa, "0x60014050123456789ab4cde8f0123456");
        let sn = sg_vpd_serial(include_str!("../testdata/sg_vpd-sn-lio.txt")).unwrap();
        assert!(sn.starts_with("01234567"), "{sn}");
        let lbpv = SgVpdLbpv::parse(include_str!("../testdata/sg_vpd-lbpv-lio.txt")).unwrap();
        assert!(!lbpv.lbpu);
        assert!(SgVpdBlockLimits::parse("nothing").is_err());
        assert!(SgVpdDesignators::parse("designator type: NAA\n  garbage").is_err());
    }
}
