//! Packs the guest's initramfs: busybox, the kernel modules the rig needs
//! (with their dependencies), the reference tools with their shared
//! libraries, the guest test binary, and a per-boot configuration archive.

use crate::provision::{Kernel, which};
use crate::{Error, Result, run_checked};
use std::collections::{BTreeSet, VecDeque};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Modules loaded at boot, in this order (dependencies are added and loaded
/// by modprobe).
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_scsi",
    "sd_mod",
    "sg",
    "configfs",
    "target_core_mod",
    "target_core_file",
    "tcm_loop",
    "vfio_iommu_type1",
    "vfio-pci",
];

/// Modules packed but loaded only by the setup of a topology that needs
/// them (nvmet over TCP, null_blk, the kernel's NVMe/TCP initiator).
pub const ON_DEMAND_MODULES: &[&str] = &["null_blk", "nvmet", "nvmet_tcp", "nvme_tcp"];

/// Reference tools copied into the guest, for cross-checks.
pub const TOOLS: &[&str] = &[
    "nvme",
    "sg_inq",
    "sg_readcap",
    "sg_vpd",
    "sg_dd",
    "sg_raw",
    "sg_turs",
    "sg_luns",
    "sg_xcopy",
    "sg_copy_results",
    "ddpt",
    "fio",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin:/usr/sbin:/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/lib64
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
depmod
for m in $(cat /etc/ustor/modules); do
    modprobe "$m" || echo "@@ustor setup-failed modprobe $m failed"
done
mount -t configfs configfs /sys/kernel/config
/bin/ustor-guest run
poweroff -f
"#;

/// Names a module file declares it depends on (its `.modinfo` `depends=`).
fn module_depends(path: &Path) -> Result<Vec<String>> {
    let bytes = fs::read(path)?;
    let key = b"depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let rest = &bytes[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    Ok(String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect())
}

/// Maps module names (with `-` and `_` equivalent) to their files.
fn module_index(modules: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    let mut dirs = vec![modules.join("kernel")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                out.push((stem.replace('-', "_"), path));
            }
        }
    }
    Ok(out)
}

/// Files of `wanted` and everything they depend on.
pub fn module_closure(modules: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let index = module_index(modules)?;
    let builtin = fs::read_to_string(modules.join("modules.builtin")).unwrap_or_default();
    let is_builtin = |name: &str| {
        builtin.lines().any(|l| {
            l.rsplit('/')
                .next()
                .and_then(|f| f.strip_suffix(".ko"))
                .is_some_and(|f| f.replace('-', "_") == name)
        })
    };
    let mut seen = BTreeSet::new();
    let mut files = Vec::new();
    let mut queue: VecDeque<String> = wanted.iter().map(|w| w.replace('-', "_")).collect();
    while let Some(name) = queue.pop_front() {
        if !seen.insert(name.clone()) {
            continue;
        }
        match index.iter().find(|(n, _)| *n == name) {
            Some((_, path)) => {
                queue.extend(
                    module_depends(path)?
                        .into_iter()
                        .map(|d| d.replace('-', "_")),
                );
                files.push(path.clone());
            }
            None if is_builtin(&name) => {}
            None => {
                return Err(Error::msg(format!(
                    "kernel module {name} is neither in {} nor built in",
                    modules.display()
                )));
            }
        }
    }
    Ok(files)
}

/// Shared libraries (and the loader) a dynamic executable needs.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(exe)
        .output()
        .map_err(|e| Error::msg(format!("running ldd: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rhs)) => rhs.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// Copies `src` to the same absolute path under `root`, following links.
fn install_at_same_path(root: &Path, src: &Path) -> Result<()> {
    let rel = src.strip_prefix("/").unwrap_or(src);
    let dst = root.join(rel);
    if let Some(parent) = dst.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(src, &dst)
        .map_err(|e| Error::msg(format!("copying {} into the initramfs: {e}", src.display())))?;
    Ok(())
}

fn cpio(dir: &Path, out: &Path) -> Result<()> {
    let file = fs::File::create(out)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg("find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R +0:+0 --quiet")
        .current_dir(dir)
        .stdout(Stdio::from(file))
        .status()
        .map_err(|e| Error::msg(format!("running cpio: {e}")))?;
    if !status.success() {
        return Err(Error::msg(format!(
            "packing {} failed ({status})",
            dir.display()
        )));
    }
    Ok(())
}

/// Builds the base initramfs (everything but the per-boot configuration).
pub fn build_base(work: &Path, kernel: &Kernel, programs: &[PathBuf]) -> Result<PathBuf> {
    let root = work.join("initramfs");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    for dir in [
        "bin",
        "sbin",
        "etc/ustor",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "usr/bin",
    ] {
        fs::create_dir_all(root.join(dir))?;
    }
    fs::copy("/bin/busybox", root.join("bin/busybox"))
        .map_err(|e| Error::msg(format!("copying /bin/busybox (busybox-static): {e}")))?;
    for program in programs {
        let name = program
            .file_name()
            .ok_or_else(|| Error::msg(format!("{}: no file name", program.display())))?;
        fs::copy(program, root.join("bin").join(name)).map_err(|e| {
            Error::msg(format!(
                "copying {} into the initramfs: {e}",
                program.display()
            ))
        })?;
    }
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    // Kernel modules.
    let mod_root = root.join("lib/modules").join(&kernel.release);
    let packed: Vec<&str> = MODULES.iter().chain(ON_DEMAND_MODULES).copied().collect();
    for file in module_closure(&kernel.modules, &packed)? {
        let rel = file.strip_prefix(&kernel.modules).unwrap_or(&file);
        let dst = mod_root.join(rel);
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(&file, &dst)?;
    }
    for meta in [
        "modules.builtin",
        "modules.order",
        "modules.builtin.modinfo",
    ] {
        let src = kernel.modules.join(meta);
        if src.exists() {
            fs::copy(&src, mod_root.join(meta))?;
        }
    }
    fs::write(root.join("etc/ustor/modules"), MODULES.join("\n") + "\n")?;

    // Reference tools and their libraries.
    let mut libs = BTreeSet::new();
    for tool in TOOLS {
        let path = which(tool).ok_or_else(|| {
            Error::msg(format!(
                "reference tool {tool} is not installed on the host"
            ))
        })?;
        fs::copy(&path, root.join("usr/bin").join(tool))?;
        libs.extend(shared_libraries(&path)?);
    }
    for lib in &libs {
        install_at_same_path(&root, lib)?;
    }

    let out = work.join("base.cpio");
    cpio(&root, &out)?;
    Ok(out)
}

/// Builds the per-boot archive holding `run.json`, appended after the base
/// (the kernel unpacks concatenated archives in order).
pub fn build_config(work: &Path, name: &str, run_json: &str) -> Result<PathBuf> {
    let root = work.join(format!("config-{name}"));
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    fs::create_dir_all(root.join("etc/ustor"))?;
    fs::write(root.join("etc/ustor/run.json"), run_json)?;
    let out = work.join(format!("config-{name}.cpio"));
    cpio(&root, &out)?;
    Ok(out)
}

/// Concatenates the base and the per-boot archive into one initrd.
pub fn combine(base: &Path, config: &Path, out: &Path) -> Result<()> {
    let mut bytes = fs::read(base)?;
    bytes.extend(fs::read(config)?);
    fs::write(out, bytes)?;
    Ok(())
}

/// Builds the guest programs statically for the VM: the test runner and
/// the `ustor-stack` tool the tests drive as a user would.
pub fn build_guest(workspace: &Path, target_dir: &Path) -> Result<Vec<PathBuf>> {
    let triple = "x86_64-unknown-linux-gnu";
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "ustor-guest",
            "--bin",
            "ustor-guest",
            "-p",
            "ustor-tools",
            "--bin",
            "ustor-stack",
        ])
        .args(["--target", triple])
        .arg("--target-dir")
        .arg(target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    run_checked(&mut cmd)?;
    let release = target_dir.join(triple).join("release");
    Ok(vec![
        release.join("ustor-guest"),
        release.join("ustor-stack"),
    ])
}
