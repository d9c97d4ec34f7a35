//! Provisioning: the Debian packages the rig needs and the guest kernel,
//! cached under `target/vmtest/cache` so a second run downloads nothing.

use crate::{Error, Result, run_checked};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian packages the rig needs on the host, with the command each one
/// provides (checked before installing anything).
pub const PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "qemu-system-x86_64"),
    ("busybox-static", "busybox"),
    ("cpio", "cpio"),
    ("nvme-cli", "nvme"),
    ("sg3-utils", "sg_inq"),
    ("ddpt", "ddpt"),
    ("fio", "fio"),
];

/// The meta-package whose dependency names the current cloud kernel.
const KERNEL_META: &str = "linux-image-cloud-amd64";

/// A guest kernel unpacked in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// Kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// The bzImage.
    pub image: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    pub modules: PathBuf,
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists() && Path::new("/usr/bin/apt-get").exists()
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .filter(|(pkg, _)| !is_installed(pkg))
        .map(|(pkg, _)| *pkg)
        .collect()
}

/// Installs what is missing; returns the kernel to boot.
pub fn provision(cache: &Path) -> Result<Kernel> {
    let missing = if is_debian() {
        missing_packages()
    } else {
        // Without dpkg, judge by the commands themselves.
        PACKAGES
            .iter()
            .filter(|(_, cmd)| which(cmd).is_none())
            .map(|(pkg, _)| *pkg)
            .collect()
    };
    let kernel = cached_kernel(cache);
    if !is_debian() {
        if let (true, Some(kernel)) = (missing.is_empty(), kernel) {
            return Ok(kernel);
        }
        return Err(Error::msg(format!(
            "the VM rig provisions itself only on Debian (as root). On this system, install \
             {} and place an unpacked Debian cloud kernel ({KERNEL_META}) under {}",
            describe(&missing),
            cache.join("kernel").display()
        )));
    }
    let mut updated = false;
    if !missing.is_empty() {
        if !is_root() {
            return Err(Error::msg(format!(
                "the VM rig needs {}: run as root, or install them first with \
                 `apt-get install {}`",
                missing.join(", "),
                missing.join(" ")
            )));
        }
        eprintln!("vmtest: installing {}", missing.join(" "));
        apt_update()?;
        updated = true;
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing);
        run_checked(&mut cmd)?;
    }
    match kernel {
        Some(k) => Ok(k),
        None => download_kernel(cache, updated),
    }
}

fn describe(missing: &[&str]) -> String {
    if missing.is_empty() {
        "nothing else".to_string()
    } else {
        format!("the tools of {}", missing.join(", "))
    }
}

fn apt_update() -> Result<()> {
    run_checked(Command::new("apt-get").args(["update", "-q"]))
}

/// Finds `cmd` on PATH.
pub fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join(cmd))
        .find(|p| p.is_file())
}

fn kernel_dir(cache: &Path) -> PathBuf {
    cache.join("kernel")
}

/// The kernel a previous run unpacked, if it is complete.
fn cached_kernel(cache: &Path) -> Option<Kernel> {
    let dir = kernel_dir(cache);
    let release = fs::read_to_string(dir.join("current")).ok()?;
    let release = release.trim().to_string();
    let root = dir.join(&release);
    let image = root.join("boot").join(format!("vmlinuz-{release}"));
    let modules = root.join("lib/modules").join(&release);
    (image.is_file() && modules.is_dir()).then_some(Kernel {
        release,
        image,
        modules,
    })
}

/// The package `linux-image-cloud-amd64` depends on now.
fn current_kernel_package() -> Result<Option<String>> {
    let out = Command::new("apt-cache")
        .args(["depends", KERNEL_META])
        .output()
        .map_err(|e| Error::msg(format!("running apt-cache: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
        .map(str::to_string))
}

fn download_kernel(cache: &Path, updated: bool) -> Result<Kernel> {
    let mut package = current_kernel_package()?;
    if package.is_none() && !updated {
        if !is_root() {
            return Err(Error::msg(format!(
                "apt knows no {KERNEL_META}: run `apt-get update` as root, then retry"
            )));
        }
        apt_update()?;
        package = current_kernel_package()?;
    }
    let package = package.ok_or_else(|| {
        Error::msg(format!(
            "apt-cache found no kernel that {KERNEL_META} depends on: is this Debian with \
             its main archive in the apt sources?"
        ))
    })?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let dir = kernel_dir(cache);
    let downloads = dir.join("downloads");
    fs::create_dir_all(&downloads)?;
    eprintln!("vmtest: downloading {package}");
    run_checked(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&downloads),
    )?;
    let deb = fs::read_dir(&downloads)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
        })
        .ok_or_else(|| Error::msg(format!("apt-get download left no {package} .deb")))?;
    let root = dir.join(&release);
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    run_checked(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    fs::write(dir.join("current"), &release)?;
    cached_kernel(cache).ok_or_else(|| {
        Error::msg(format!(
            "{} unpacked, but it holds no boot/vmlinuz-{release} or lib/modules/{release}",
            deb.display()
        ))
    })
}
