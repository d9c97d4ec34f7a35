//! PCI addresses and the sysfs checks done before touching VFIO.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};

/// A PCI function address, `domain:bus:device.function`, as sysfs names it
/// (`0000:00:04.0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    domain: u32,
    bus: u8,
    device: u8,
    function: u8,
}

impl PciAddress {
    /// Builds an address; `None` if `device > 0x1f` or `function > 7`.
    pub const fn new(domain: u32, bus: u8, device: u8, function: u8) -> Option<PciAddress> {
        if device > 0x1f || function > 7 {
            return None;
        }
        Some(PciAddress {
            domain,
            bus,
            device,
            function,
        })
    }

    /// PCI segment (domain).
    pub const fn domain(self) -> u32 {
        self.domain
    }

    /// Bus number.
    pub const fn bus(self) -> u8 {
        self.bus
    }

    /// Device number (0..=31).
    pub const fn device(self) -> u8 {
        self.device
    }

    /// Function number (0..=7).
    pub const fn function(self) -> u8 {
        self.function
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

fn hex_field(s: &str, max_digits: usize) -> Option<u32> {
    if s.is_empty() || s.len() > max_digits || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

impl FromStr for PciAddress {
    type Err = Error;

    /// Parses `DDDD:BB:DD.F` (domain up to 8 hex digits, as Linux prints
    /// domains above 0xffff) or the short `BB:DD.F` form `lspci` prints
    /// (domain 0). Hex digits may be upper or lower case.
    fn from_str(s: &str) -> Result<PciAddress> {
        let err = |reason| Error::InvalidPciAddress {
            input: s.chars().take(64).collect(),
            reason,
        };
        let (rest, function) = s
            .rsplit_once('.')
            .ok_or_else(|| err("missing '.' before the function"))?;
        let function = hex_field(function, 1).ok_or_else(|| err("bad function number"))?;
        let mut parts = rest.rsplitn(3, ':');
        let device = parts.next().ok_or_else(|| err("missing device number"))?;
        let bus = parts.next().ok_or_else(|| err("missing bus number"))?;
        let domain = match parts.next() {
            Some(d) => hex_field(d, 8).ok_or_else(|| err("bad domain number"))?,
            None => 0,
        };
        let device = hex_field(device, 2).ok_or_else(|| err("bad device number"))?;
        let bus = hex_field(bus, 2).ok_or_else(|| err("bad bus number"))?;
        let device = u8::try_from(device).map_err(|_| err("device number above 0x1f"))?;
        let function = u8::try_from(function).map_err(|_| err("function number above 7"))?;
        let bus = u8::try_from(bus).map_err(|_| err("bad bus number"))?;
        PciAddress::new(domain, bus, device, function).ok_or_else(|| {
            if device > 0x1f {
                err("device number above 0x1f")
            } else {
                err("function number above 7")
            }
        })
    }
}

impl TryFrom<&str> for PciAddress {
    type Error = Error;

    fn try_from(s: &str) -> Result<PciAddress> {
        s.parse()
    }
}

/// Where the kernel keeps things; `/` except in tests, which build a fake
/// tree with the same layout.
#[derive(Clone, Debug)]
pub(crate) struct SysRoot {
    /// Normally `/sys`.
    pub sys: PathBuf,
}

impl Default for SysRoot {
    fn default() -> SysRoot {
        SysRoot {
            sys: PathBuf::from("/sys"),
        }
    }
}

impl SysRoot {
    pub fn device_dir(&self, addr: PciAddress) -> PathBuf {
        self.sys.join("bus/pci/devices").join(addr.to_string())
    }
}

/// What sysfs says about a device that is ready for VFIO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SysfsDevice {
    /// `/sys/bus/pci/devices/<addr>`.
    pub path: PathBuf,
    /// IOMMU group number.
    pub group: u32,
}

/// Last path component of a symlink's target, or `None` if there is no link.
fn link_name(path: &Path) -> Result<Option<String>> {
    match std::fs::read_link(path) {
        Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Sysfs {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Checks, in sysfs, everything that must hold before VFIO can open the
/// device, so that each failure gets its own precise error:
/// the device exists, it has an IOMMU group (checked before the driver,
/// because vfio-pci cannot bind without one), and it is bound to vfio-pci.
pub(crate) fn probe(root: &SysRoot, addr: PciAddress) -> Result<SysfsDevice> {
    let path = root.device_dir(addr);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NoSuchDevice { addr, path });
        }
        Err(source) => return Err(Error::Sysfs { path, source }),
    }

    let group = match link_name(&path.join("iommu_group"))? {
        None => return Err(Error::IommuAbsent { addr }),
        Some(name) => name.parse::<u32>().map_err(|_| Error::Sysfs {
            path: path.join("iommu_group"),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("IOMMU group name {name:?} is not a number"),
            ),
        })?,
    };

    match link_name(&path.join("driver"))? {
        Some(d) if d == "vfio-pci" => {}
        driver => return Err(Error::NotBoundToVfio { addr, driver }),
    }

    Ok(SysfsDevice { path, group })
}

/// Devices of IOMMU group `group` bound to a driver other than vfio-pci
/// (these make a group non-viable), as `addr (driver)`. Best effort: an
/// unreadable group directory gives an empty list.
pub(crate) fn group_offenders(root: &SysRoot, group: u32) -> Vec<String> {
    let dir = root
        .sys
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let driver = link_name(&e.path().join("driver")).ok().flatten()?;
            (driver != "vfio-pci").then(|| format!("{name} ({driver})"))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn parses_and_displays() {
        let a: PciAddress = "0000:00:04.0".parse().expect("valid");
        assert_eq!(
            (a.domain(), a.bus(), a.device(), a.function()),
            (0, 0, 4, 0)
        );
        assert_eq!(a.to_string(), "0000:00:04.0");
        let a: PciAddress = "0001:3B:1f.7".parse().expect("valid");
        assert_eq!(a.to_string(), "0001:3b:1f.7");
        let a: PciAddress = "00:04.0".parse().expect("short form");
        assert_eq!(a.to_string(), "0000:00:04.0");
        let a: PciAddress = "10000:e1:00.0".parse().expect("VMD domain");
        assert_eq!(a.to_string(), "10000:e1:00.0");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "0000:00:04",
            "0000:00:04.8",
            "0000:00:20.0",
            "0000:100:04.0",
            "0000:00:04.0.1",
            "0:0:0:0.0",
            "0000:+0:04.0",
            "0000:00:+4.0",
            "0000:00:04.+",
            "000000000:00:04.0",
            " 0000:00:04.0",
            "0000:00:04.0\n",
            "zzzz:00:04.0",
            ":00:04.0",
            "0000::04.0",
            ".",
            "é:00:04.0",
        ] {
            let r = bad.parse::<PciAddress>();
            assert!(
                matches!(r, Err(Error::InvalidPciAddress { .. })),
                "{bad:?} -> {r:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = s.parse::<PciAddress>();
        }

        #[test]
        fn parse_never_panics_near_valid(s in "[0-9a-fA-F:.+ -]{0,20}") {
            if let Ok(a) = s.parse::<PciAddress>() {
                // Whatever parses displays in canonical form and reparses to itself.
                prop_assert_eq!(a.to_string().parse::<PciAddress>().ok(), Some(a));
            }
        }

        #[test]
        fn display_roundtrips(domain in any::<u32>(), bus in any::<u8>(), dev in 0u8..32, func in 0u8..8) {
            let a = PciAddress::new(domain, bus, dev, func).expect("in range");
            prop_assert_eq!(a.to_string().parse::<PciAddress>().ok(), Some(a));
        }
    }

    /// A throwaway fake /sys tree under the temp dir.
    struct FakeSys(PathBuf);

    impl FakeSys {
        fn new() -> FakeSys {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "nvme-fakesys-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(dir.join("bus/pci/devices")).expect("tmp");
            FakeSys(dir)
        }
        fn root(&self) -> SysRoot {
            SysRoot {
                sys: self.0.clone(),
            }
        }
        fn add(&self, addr: &str, group: Option<u32>, driver: Option<&str>) {
            let dev = self.0.join("devices/pci0000:00").join(addr);
            std::fs::create_dir_all(&dev).expect("tmp");
            symlink(&dev, self.0.join("bus/pci/devices").join(addr)).expect("tmp");
            if let Some(g) = group {
                let gdir = self.0.join("kernel/iommu_groups").join(g.to_string());
                std::fs::create_dir_all(gdir.join("devices")).expect("tmp");
                symlink(&gdir, dev.join("iommu_group")).expect("tmp");
                symlink(&dev, gdir.join("devices").join(addr)).expect("tmp");
            }
            if let Some(d) = driver {
                let ddir = self.0.join("bus/pci/drivers").join(d);
                std::fs::create_dir_all(&ddir).expect("tmp");
                symlink(&ddir, dev.join("driver")).expect("tmp");
            }
        }
    }

    impl Drop for FakeSys {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn pa(s: &str) -> PciAddress {
        s.parse().expect("valid")
    }

    #[test]
    fn probe_reports_each_precondition() {
        let sys = FakeSys::new();
        sys.add("0000:00:04.0", Some(3), Some("vfio-pci"));
        sys.add("0000:00:05.0", Some(4), Some("nvme"));
        sys.add("0000:00:06.0", Some(5), None);
        sys.add("0000:00:07.0", None, Some("nvme"));
        let root = sys.root();

        let ok = probe(&root, pa("0000:00:04.0")).expect("ready");
        assert_eq!(ok.group, 3);

        match probe(&root, pa("0000:00:05.0")) {
            Err(Error::NotBoundToVfio { driver, .. }) => {
                assert_eq!(driver.as_deref(), Some("nvme"))
            }
            other => panic!("{other:?}"),
        }
        match probe(&root, pa("0000:00:06.0")) {
            Err(Error::NotBoundToVfio { driver: None, .. }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            probe(&root, pa("0000:00:07.0")),
            Err(Error::IommuAbsent { .. })
        ));
        match probe(&root, pa("0000:ff:1f.7")) {
            Err(Error::NoSuchDevice { addr, path }) => {
                assert_eq!(addr, pa("0000:ff:1f.7"));
                assert!(path.ends_with("bus/pci/devices/0000:ff:1f.7"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn offenders_lists_foreign_drivers() {
        let sys = FakeSys::new();
        sys.add("0000:00:04.0", Some(9), Some("vfio-pci"));
        sys.add("0000:00:04.1", None, Some("e1000"));
        // Put 04.1 in group 9 by hand.
        let gdev = sys.0.join("kernel/iommu_groups/9/devices/0000:00:04.1");
        symlink(sys.0.join("devices/pci0000:00/0000:00:04.1"), gdev).expect("tmp");
        assert_eq!(
            group_offenders(&sys.root(), 9),
            vec!["0000:00:04.1 (e1000)".to_owned()]
        );
        assert!(group_offenders(&sys.root(), 10).is_empty());
    }
}
