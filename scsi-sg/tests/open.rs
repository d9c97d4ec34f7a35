//! Opening paths that are not SG devices: the error says which and why.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use scsi_sg::{Error, SgDevice};

/// A fresh file under the temp dir, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> TempFile {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path =
            std::env::temp_dir().join(format!("scsi-sg-test-{tag}-{}-{nanos}", std::process::id()));
        fs::write(&path, b"not a SCSI device\n").expect("create temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn nonexistent_is_no_such_device() {
    let err = SgDevice::open("/nonexistent").unwrap_err();
    assert!(
        matches!(&err, Error::NoSuchDevice { path } if path.as_os_str() == "/nonexistent"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "/nonexistent: no such device");
    assert_eq!(err.command(), None);
}

#[test]
fn regular_file_is_not_sg_capable() {
    let f = TempFile::new("regular");
    let err = SgDevice::open(&f.0).unwrap_err();
    match &err {
        Error::NotSgCapable { path, source } => {
            assert_eq!(path, &f.0);
            // A regular file has no ioctls: ENOTTY.
            assert_eq!(source.raw_os_error(), Some(libc::ENOTTY), "{source:?}");
        }
        other => panic!("expected NotSgCapable, got {other:?}"),
    }
    assert_eq!(err.path(), f.0.as_path());
}

#[test]
fn read_only_regular_file_is_not_sg_capable() {
    // /etc/hostname is not writable by ordinary users, so open it read-only.
    let path = "/etc/hostname";
    if !std::path::Path::new(path).exists() {
        eprintln!("SKIP read_only_regular_file_is_not_sg_capable: {path} does not exist");
        return;
    }
    let err = SgDevice::open_read_only(path).unwrap_err();
    assert!(matches!(err, Error::NotSgCapable { .. }), "{err:?}");
}

#[test]
fn char_device_without_sg_is_not_sg_capable() {
    let err = SgDevice::open("/dev/null").unwrap_err();
    assert!(matches!(err, Error::NotSgCapable { .. }), "{err:?}");
}

#[test]
fn directory_is_open_error() {
    let dir = std::env::temp_dir();
    let err = SgDevice::open(&dir).unwrap_err();
    match err {
        Error::Open { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::EISDIR)),
        other => panic!("expected Open(EISDIR), got {other:?}"),
    }
}

#[test]
fn unreadable_file_is_permission() {
    // SAFETY-free check of the effective uid via /proc: root bypasses modes.
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid_is_root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if euid_is_root {
        eprintln!("SKIP unreadable_file_is_permission: running as root, modes are not enforced");
        return;
    }
    let f = TempFile::new("noperm");
    fs::set_permissions(&f.0, fs::Permissions::from_mode(0o000)).expect("chmod");
    let err = SgDevice::open(&f.0).unwrap_err();
    assert!(matches!(err, Error::Permission { .. }), "{err:?}");
}

#[test]
fn queue_and_probe_open_errors_are_typed() {
    use scsi_sg::{ScsiDevice, SgQueue};
    assert!(matches!(
        SgQueue::open("/nonexistent", 2),
        Err(Error::NoSuchDevice { .. })
    ));
    assert!(matches!(
        SgQueue::open("/dev/null", 1),
        Err(Error::NotSgCapable { .. })
    ));
    let f = TempFile::new("queue");
    assert!(matches!(
        SgQueue::open(&f.0, 1),
        Err(Error::NotSgCapable { .. })
    ));
    assert!(matches!(
        ScsiDevice::open("/nonexistent"),
        Err(Error::NoSuchDevice { .. })
    ));
    assert!(matches!(
        ScsiDevice::open("/dev/null"),
        Err(Error::NotSgCapable { .. })
    ));
}

#[test]
fn probe_rejects_non_disk() {
    use scsi_sg::emu::{EmuConfig, EmuTarget, Fault, FaultAction};
    // A CD/DVD device is refused by the probe.
    let t = EmuTarget::new(
        "cd",
        EmuConfig {
            peripheral_device_type: 0x05,
            ..EmuConfig::default()
        },
    );
    let err = scsi_sg::ScsiDevice::probe(t.add_memory_lun(8, 2048)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::NotDirectAccess {
                device_type: 0x05,
                ..
            }
        ),
        "{err:?}"
    );
    // A LUN whose INQUIRY fails is reported with its sense.
    let t = EmuTarget::new("nd", EmuConfig::default());
    let lun = t.add_memory_lun(8, 512);
    t.inject_fault(Fault {
        lun: None,
        opcode: scsi_sg::cdb::INQUIRY,
        service_action: None,
        action: FaultAction::Sense(scsi_sg::Sense::new(
            scsi_sg::SenseKey::HardwareError,
            0x44,
            0,
        )),
        count: 1,
    });
    let err = scsi_sg::ScsiDevice::probe(lun).unwrap_err();
    assert_eq!(err.sense().map(|s| s.asc), Some(0x44));
}
