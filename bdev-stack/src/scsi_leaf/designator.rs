//! Whether a LUN's NAA designator is unique among the LUNs its copy manager
//! reaches, and the SCSI nexus that copy manager is found by.
//!
//! EXTENDED COPY names its source and destination by designator, and the
//! copy manager resolves each to the first LUN it reaches that reports it.
//! Designators repeat in practice (LIO builds its NAA from only the first
//! 25 hex digits of the unit serial), so a copy naming a repeated one may
//! read or write another LUN. The leaf looks at every other LUN the copy
//! manager reaches and offers its designator for pairing only when none
//! reports it; when it cannot look, it does not offer it.

use std::fs;
use std::path::Path;

#[cfg(feature = "emu")]
use scsi_sg::emu::EmuLun;
use scsi_sg::vpd::{self, Designator};

/// What the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Uniqueness {
    /// No other LUN reached through the copy manager reports the
    /// designator.
    Verified,
    /// Another LUN reports it.
    Repeated {
        /// That LUN.
        other: String,
    },
    /// The LUNs could not all be looked at.
    Unverifiable {
        /// Why.
        reason: String,
    },
}

impl Uniqueness {
    /// For a LUN that reports no NAA designator at all.
    pub(super) fn no_designator() -> Uniqueness {
        Uniqueness::Unverifiable {
            reason: "the LUN reports no NAA designator".into(),
        }
    }

    pub(super) fn is_verified(&self) -> bool {
        *self == Uniqueness::Verified
    }
}

/// The designators each other LUN reports, or why they could not be read.
type OtherLun = (String, Result<Vec<Designator>, String>);

/// Whether `naa` is absent from every other LUN's designators. Any NAA
/// designator counts, whatever its association: a copy manager may match
/// on it.
fn decide(naa: &[u8], others: impl IntoIterator<Item = OtherLun>) -> Uniqueness {
    for (label, designators) in others {
        match designators {
            Err(reason) => {
                return Uniqueness::Unverifiable {
                    reason: format!("cannot read the designators of {label}: {reason}"),
                };
            }
            Ok(designators) if reports(&designators, naa) => {
                return Uniqueness::Repeated { other: label };
            }
            Ok(_) => {}
        }
    }
    Uniqueness::Verified
}

fn reports(designators: &[Designator], naa: &[u8]) -> bool {
    designators
        .iter()
        .any(|d| d.designator_type == vpd::DESIGNATOR_NAA && d.designator == naa)
}

/// Checks `naa` of `lun` against the other LUNs of its emulated target
/// (the target is its copy manager), asking each for its Device
/// Identification page as an initiator would.
#[cfg(feature = "emu")]
pub(super) fn emulated(lun: &EmuLun, naa: &[u8]) -> Uniqueness {
    let target = lun.target();
    let others = (0..target.lun_count())
        .filter(|&index| index != lun.index())
        .map(|index| {
            let label = format!("LUN {index} of the target");
            let designators = match target.lun(index) {
                None => Err("the LUN is gone".to_string()),
                Some(other) => scsi_sg::vpd_page(
                    &other,
                    vpd::PAGE_DEVICE_IDENTIFICATION,
                    scsi_sg::DEFAULT_TIMEOUT,
                )
                .map_err(|e| e.to_string())
                .and_then(|page| {
                    vpd::parse_device_identification(&page).map_err(|e| e.to_string())
                }),
            };
            (label, designators)
        });
    decide(naa, others)
}

/// A SCSI device address, `host:channel:target:lun`, as sysfs names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Hctl {
    host: u32,
    channel: u32,
    target: u32,
    lun: u64,
}

impl Hctl {
    /// Parses `H:C:T:L` (decimal).
    pub(super) fn parse(text: &str) -> Option<Hctl> {
        let mut parts = text.split(':');
        let mut field = || -> Option<&str> {
            parts
                .next()
                .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        };
        let hctl = Hctl {
            host: field()?.parse().ok()?,
            channel: field()?.parse().ok()?,
            target: field()?.parse().ok()?,
            lun: field()?.parse().ok()?,
        };
        parts.next().is_none().then_some(hctl)
    }

    /// The device behind the sg node `path` (`/dev/sgN`), from
    /// `<sysfs>/class/scsi_generic/sgN/device`.
    pub(super) fn of_sg_node(sysfs: &Path, path: &Path) -> Option<Hctl> {
        let node = path.file_name()?.to_str()?;
        let link =
            fs::read_link(sysfs.join("class/scsi_generic").join(node).join("device")).ok()?;
        Hctl::parse(link.file_name()?.to_str()?)
    }

    /// The target nexus, `scsi-nexus:H:C:T`: the LUNs of one target (of
    /// one LIO `tcm_loop` target, say) share its copy manager.
    pub(super) fn nexus(&self) -> String {
        format!("scsi-nexus:{}:{}:{}", self.host, self.channel, self.target)
    }

    fn same_target(&self, other: &Hctl) -> bool {
        (self.host, self.channel, self.target) == (other.host, other.channel, other.target)
    }
}

impl std::fmt::Display for Hctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.host, self.channel, self.target, self.lun
        )
    }
}

/// Checks `naa` of the LUN at `own` against the other LUNs of its target
/// nexus, from the Device Identification pages the kernel keeps in
/// `<sysfs>/class/scsi_device/H:C:T:L/device/vpd_pg83`. The LUN's own
/// page must be there and report `naa` too, so that the check is about
/// the LUN that was probed.
pub(super) fn sysfs(sysfs: &Path, own: Hctl, naa: &[u8]) -> Uniqueness {
    let dir = sysfs.join("class/scsi_device");
    let unverifiable = |reason: String| Uniqueness::Unverifiable { reason };
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => return unverifiable(format!("cannot list {}: {e}", dir.display())),
    };
    let read = |name: &str| -> Result<Vec<Designator>, String> {
        let page = dir.join(name).join("device/vpd_pg83");
        let bytes = fs::read(&page).map_err(|e| format!("{}: {e}", page.display()))?;
        vpd::parse_device_identification(&bytes).map_err(|e| format!("{}: {e}", page.display()))
    };
    let mut own_checked = false;
    let mut others = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) => return unverifiable(format!("cannot list {}: {e}", dir.display())),
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        let Some(hctl) = Hctl::parse(name) else {
            continue;
        };
        if !hctl.same_target(&own) {
            continue;
        }
        if hctl == own {
            match read(name) {
                Ok(designators) if reports(&designators, naa) => own_checked = true,
                Ok(_) => {
                    return unverifiable(format!(
                        "sysfs reports other designators for {own} than the LUN did"
                    ));
                }
                Err(reason) => return unverifiable(reason),
            }
            continue;
        }
        others.push((format!("LUN {hctl}"), read(name)));
    }
    if !own_checked {
        return unverifiable(format!("{own} is not in {}", dir.display()));
    }
    decide(naa, others)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A directory tree laid out as sysfs lays out SCSI devices, removed
    /// on drop.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new(test: &str) -> FakeSysfs {
            let root =
                std::env::temp_dir().join(format!("ustor-sysfs-{}-{test}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("class/scsi_device")).expect("sysfs root");
            FakeSysfs(root)
        }

        /// A LUN at `hctl` whose VPD 0x83 holds `designators` (or no page).
        fn lun(&self, hctl: &str, designators: Option<&[&[u8]]>) {
            let dir = self.0.join("class/scsi_device").join(hctl).join("device");
            fs::create_dir_all(&dir).expect("device dir");
            if let Some(designators) = designators {
                let list: Vec<Designator> =
                    designators.iter().map(|d| Designator::naa(d)).collect();
                fs::write(
                    dir.join("vpd_pg83"),
                    vpd::build_device_identification(&list),
                )
                .expect("vpd_pg83");
            }
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const A: &[u8] = &[0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
    const B: &[u8] = &[0x60, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 16];

    fn own() -> Hctl {
        Hctl::parse("2:0:1:0").expect("hctl")
    }

    #[test]
    fn hctl_parses_only_four_decimal_fields() {
        assert_eq!(own().to_string(), "2:0:1:0");
        assert_eq!(own().nexus(), "scsi-nexus:2:0:1");
        for bad in ["2:0:1", "2:0:1:0:0", "2:0:x:0", "2::1:0", "", "-1:0:0:0"] {
            assert_eq!(Hctl::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_designator_no_other_lun_of_the_nexus_reports_is_verified() {
        let sysfs = FakeSysfs::new("verified");
        sysfs.lun("2:0:1:0", Some(&[A]));
        sysfs.lun("2:0:1:1", Some(&[B]));
        // Another target's LUN may repeat it: another copy manager.
        sysfs.lun("2:0:2:0", Some(&[A]));
        sysfs.lun("3:0:1:0", None);
        assert_eq!(super::sysfs(&sysfs.0, own(), A), Uniqueness::Verified);
    }

    #[test]
    fn a_designator_another_lun_of_the_nexus_reports_is_repeated() {
        let sysfs = FakeSysfs::new("repeated");
        sysfs.lun("2:0:1:0", Some(&[A]));
        sysfs.lun("2:0:1:3", Some(&[B, A]));
        assert_eq!(
            super::sysfs(&sysfs.0, own(), A),
            Uniqueness::Repeated {
                other: "LUN 2:0:1:3".into()
            }
        );
    }

    #[test]
    fn a_lun_whose_page_cannot_be_read_leaves_it_unverified() {
        let sysfs = FakeSysfs::new("unreadable");
        sysfs.lun("2:0:1:0", Some(&[A]));
        sysfs.lun("2:0:1:1", None);
        assert!(matches!(
            super::sysfs(&sysfs.0, own(), A),
            Uniqueness::Unverifiable { .. }
        ));
        // Garbage in a page is the same.
        fs::write(
            sysfs.0.join("class/scsi_device/2:0:1:1/device/vpd_pg83"),
            [0u8, 0x83, 0, 9, 0x01],
        )
        .expect("write");
        assert!(matches!(
            super::sysfs(&sysfs.0, own(), A),
            Uniqueness::Unverifiable { .. }
        ));
    }

    #[test]
    fn the_lun_itself_must_be_there_with_the_designator_it_reported() {
        let sysfs = FakeSysfs::new("own");
        sysfs.lun("2:0:1:1", Some(&[B]));
        assert!(matches!(
            super::sysfs(&sysfs.0, own(), A),
            Uniqueness::Unverifiable { .. }
        ));
        sysfs.lun("2:0:1:0", Some(&[B]));
        assert!(matches!(
            super::sysfs(&sysfs.0, own(), A),
            Uniqueness::Unverifiable { .. }
        ));
        let missing = FakeSysfs::new("missing");
        fs::remove_dir_all(missing.0.join("class")).expect("remove");
        assert!(matches!(
            super::sysfs(&missing.0, own(), A),
            Uniqueness::Unverifiable { .. }
        ));
    }

    #[test]
    fn the_sg_node_resolves_to_its_device() {
        let sysfs = FakeSysfs::new("sgnode");
        let node = sysfs.0.join("class/scsi_generic/sg3");
        fs::create_dir_all(&node).expect("node");
        std::os::unix::fs::symlink(
            "../../../devices/pci0/host2/target2:0:1/2:0:1:0",
            node.join("device"),
        )
        .expect("link");
        assert_eq!(
            Hctl::of_sg_node(&sysfs.0, Path::new("/dev/sg3")),
            Some(own())
        );
        assert_eq!(Hctl::of_sg_node(&sysfs.0, Path::new("/dev/sg4")), None);
    }
}
