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

/// What provisioning has to do, decided from the facts alone so the
/// decision (and its messages) can be tested without a second machine.
#[derive(Debug, PartialEq, Eq)]
enum Plan {
    /// Install these Debian packages (as root), then fetch the kernel if it
    /// is not cached.
    Install(Vec<&'static str>),
    /// Nothing to install.
    Ready,
}

/// The host as provisioning sees it.
struct Host {
    debian: bool,
    root: bool,
    /// Packages (Debian names) whose tools are missing.
    missing: Vec<&'static str>,
    kernel_cached: bool,
}

fn plan(host: &Host, cache: &Path) -> std::result::Result<Plan, String> {
    if !host.debian {
        if host.missing.is_empty() && host.kernel_cached {
            return Ok(Plan::Ready);
        }
        let tools: Vec<&str> = PACKAGES
            .iter()
            .filter(|(pkg, _)| host.missing.contains(pkg))
            .map(|(_, cmd)| *cmd)
            .collect();
        let mut what = Vec::new();
        if !tools.is_empty() {
            what.push(format!(
                "install the commands {} (Debian packages: {})",
                tools.join(", "),
                host.missing.join(", ")
            ));
        }
        if !host.kernel_cached {
            what.push(format!(
                "unpack a Debian cloud kernel package ({KERNEL_META}) into {}/RELEASE and \
                 write RELEASE into {}/current",
                cache.join("kernel").display(),
                cache.join("kernel").display()
            ));
        }
        return Err(format!(
            "the VM rig provisions itself only on Debian; on this system, {}",
            what.join(", and ")
        ));
    }
    if host.missing.is_empty() {
        return Ok(Plan::Ready);
    }
    if !host.root {
        return Err(format!(
            "the VM rig needs {}: run it as root, or install them first with \
             `apt-get install {}`",
            host.missing.join(", "),
            host.missing.join(" ")
        ));
    }
    Ok(Plan::Install(host.missing.clone()))
}

/// Installs what is missing; returns the kernel to boot.
pub fn provision(cache: &Path) -> Result<Kernel> {
    let debian = is_debian();
    let missing = if debian {
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
    let host = Host {
        debian,
        root: is_root(),
        missing,
        kernel_cached: kernel.is_some(),
    };
    let mut updated = false;
    match plan(&host, cache).map_err(Error::msg)? {
        Plan::Ready => {}
        Plan::Install(packages) => {
            eprintln!("vmtest: installing {}", packages.join(" "));
            apt_update()?;
            updated = true;
            let mut cmd = Command::new("apt-get");
            cmd.env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&packages);
            run_checked(&mut cmd)?;
        }
    }
    match kernel {
        Some(k) => Ok(k),
        None => download_kernel(cache, updated),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn host(debian: bool, root: bool, missing: &[&'static str], kernel_cached: bool) -> Host {
        Host {
            debian,
            root,
            missing: missing.to_vec(),
            kernel_cached,
        }
    }

    const CACHE: &str = "/w/target/vmtest/cache";

    #[test]
    fn debian_root_installs_what_is_missing() {
        let p = plan(&host(true, true, &["fio", "ddpt"], false), Path::new(CACHE));
        assert_eq!(p, Ok(Plan::Install(vec!["fio", "ddpt"])));
        let p = plan(&host(true, false, &[], true), Path::new(CACHE));
        assert_eq!(p, Ok(Plan::Ready));
    }

    #[test]
    fn not_root_names_the_packages_and_the_command() {
        let err = plan(
            &host(true, false, &["qemu-system-x86", "fio"], true),
            Path::new(CACHE),
        )
        .unwrap_err();
        assert!(err.contains("qemu-system-x86, fio"), "{err}");
        assert!(err.contains("apt-get install qemu-system-x86 fio"), "{err}");
        assert!(err.contains("root"), "{err}");
    }

    #[test]
    fn not_debian_names_the_commands_and_the_kernel_layout() {
        let err = plan(&host(false, true, &["sg3-utils"], false), Path::new(CACHE)).unwrap_err();
        assert!(err.contains("only on Debian"), "{err}");
        assert!(err.contains("sg_inq"), "{err}");
        assert!(err.contains(KERNEL_META), "{err}");
        assert!(err.contains(&format!("{CACHE}/kernel/current")), "{err}");
        // Everything present: nothing stands in the way.
        assert_eq!(
            plan(&host(false, false, &[], true), Path::new(CACHE)),
            Ok(Plan::Ready)
        );
    }
}
