//! Opening a backing file or block device safely.
//!
//! - A file that may be created (a size is given) is opened without
//!   following a symbolic link at its last component: a link planted at
//!   the path would otherwise have us create or extend a file of the
//!   planter's choosing. A missing file is created exclusively
//!   (`O_CREAT | O_EXCL`), readable and writable by its owner only.
//! - An existing device opened without a size may be named through links
//!   (`/dev/disk/by-id/...`): it is only opened, never created or resized.
//! - Block devices are opened with `O_EXCL`, which Linux turns into an
//!   exclusive claim: a mounted file system, or a device another program
//!   holds exclusively, is refused with `EBUSY` instead of being written
//!   under its feet.
//! - An existing file is extended to the size asked for, never shrunk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why a backing path could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FileOpenError {
    /// The path is a symbolic link where one must not be followed.
    #[error(
        "{} is a symbolic link, and a size was given (the file may be created or extended): \
         name the file itself, or leave the size out to open an existing device through the link",
        .path.display()
    )]
    SymbolicLink {
        /// The path.
        path: PathBuf,
    },
    /// A block device in use: mounted, or held exclusively by another
    /// program.
    #[error(
        "{} is in use (a mounted file system, or held exclusively by another program): \
         unmount it or stop its other user",
        .path.display()
    )]
    Busy {
        /// The device.
        path: PathBuf,
        /// The OS error (EBUSY).
        #[source]
        source: io::Error,
    },
    /// Neither a regular file nor a block device.
    #[error("{} is neither a regular file nor a block device", .path.display())]
    NotFileOrBlockDevice {
        /// The path.
        path: PathBuf,
    },
    /// An existing file that may be extended, and is not this user's own
    /// or has other names: someone may have planted it to read what is
    /// written, or to have us write over another file.
    #[error(
        "{} (owner uid {owner}, {links} links) is not a file of this user with one name, and a \
         size was given (it may be extended and written): name a file of your own, or leave \
         the size out to use it as it is",
        .path.display()
    )]
    NotOwnFile {
        /// The path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// Its hard links.
        links: u64,
    },
    /// An operating-system call failed.
    #[error("{}: {action}", .path.display())]
    Os {
        /// The path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl FileOpenError {
    /// The closest [`io::ErrorKind`], for callers that carry I/O errors.
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            FileOpenError::SymbolicLink { .. }
            | FileOpenError::NotFileOrBlockDevice { .. }
            | FileOpenError::NotOwnFile { .. } => io::ErrorKind::InvalidInput,
            FileOpenError::Busy { .. } => io::ErrorKind::ResourceBusy,
            FileOpenError::Os { source, .. } => source.kind(),
        }
    }

    /// As an [`io::Error`] of the same kind, this error as its message
    /// and cause chain.
    pub fn into_io(self) -> io::Error {
        io::Error::new(self.kind(), self)
    }
}

/// A backing file or block device, opened.
#[derive(Debug)]
pub struct OpenedFile {
    /// The open file, read-write.
    pub file: File,
    /// Created by this open.
    pub created: bool,
    /// A block device (held exclusively).
    pub block_device: bool,
    /// I/O bypasses the page cache (`O_DIRECT` was asked for and the file
    /// system took it).
    pub direct: bool,
}

/// Opens `path` read-write as a backing store.
///
/// With `create_size`, a missing file is created (exclusively, mode 0600)
/// and a smaller regular file is extended to that many bytes; the path
/// must not be a symbolic link. Without, the path must exist and may be a
/// link. With `direct`, `O_DIRECT` is set where the file system allows it
/// ([`OpenedFile::direct`] says whether it did).
pub fn open_file(
    path: &Path,
    create_size: Option<u64>,
    direct: bool,
) -> Result<OpenedFile, FileOpenError> {
    let os = |action, source| FileOpenError::Os {
        path: path.to_path_buf(),
        action,
        source,
    };
    // Check the type before opening: opening a character device can act
    // (a watchdog arms on open) or block (a terminal).
    let looked = if create_size.is_some() {
        std::fs::symlink_metadata(path)
    } else {
        std::fs::metadata(path)
    };
    if let Ok(meta) = looked {
        if meta.file_type().is_symlink() {
            return Err(FileOpenError::SymbolicLink {
                path: path.to_path_buf(),
            });
        }
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(FileOpenError::NotFileOrBlockDevice {
                path: path.to_path_buf(),
            });
        }
    }
    let open_existing = || {
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        // O_EXCL without O_CREAT: an exclusive claim on a block device,
        // ignored for other files.
        let mut flags = libc::O_EXCL | libc::O_CLOEXEC;
        if create_size.is_some() {
            flags |= libc::O_NOFOLLOW;
        }
        options
            .custom_flags(flags)
            .open(path)
            .map_err(|e| classify(path, "open", e))
    };
    let mut created = false;
    let file = match open_existing() {
        Ok(file) => file,
        Err(FileOpenError::Os { source, .. })
            if source.kind() == io::ErrorKind::NotFound && create_size.is_some() =>
        {
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(path)
            {
                Ok(file) => {
                    created = true;
                    file
                }
                // Something appeared at the path meanwhile (a dangling link
                // counts): open that, under the same rules.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => open_existing()?,
                Err(e) => return Err(classify(path, "create", e)),
            }
        }
        Err(e) => return Err(e),
    };
    let meta = file.metadata().map_err(|e| os("stat", e))?;
    let block_device = meta.file_type().is_block_device();
    if !block_device && !meta.is_file() {
        return Err(FileOpenError::NotFileOrBlockDevice {
            path: path.to_path_buf(),
        });
    }
    if create_size.is_some() && meta.is_file() && !created {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me || meta.nlink() != 1 {
            return Err(FileOpenError::NotOwnFile {
                path: path.to_path_buf(),
                owner: meta.uid(),
                links: meta.nlink(),
            });
        }
    }
    if let Some(size) = create_size
        && meta.is_file()
        && meta.len() < size
    {
        file.set_len(size).map_err(|e| os("extend", e))?;
    }
    let direct = direct && set_direct(&file);
    Ok(OpenedFile {
        file,
        created,
        block_device,
        direct,
    })
}

/// Sets `O_DIRECT` on an open file; false where the file system refuses it
/// (tmpfs).
fn set_direct(file: &File) -> bool {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_DIRECT) == 0
    }
}

/// The typed error for an OS error of `open`.
fn classify(path: &Path, action: &'static str, source: io::Error) -> FileOpenError {
    match source.raw_os_error() {
        Some(libc::ELOOP) => FileOpenError::SymbolicLink {
            path: path.to_path_buf(),
        },
        Some(libc::EBUSY) => FileOpenError::Busy {
            path: path.to_path_buf(),
            source,
        },
        _ => FileOpenError::Os {
            path: path.to_path_buf(),
            action,
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("backing-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_created_file_is_new_and_owner_only() {
        let dir = scratch("create");
        let path = dir.join("disk");
        let opened = open_file(&path, Some(1 << 20), false).unwrap();
        assert!(opened.created && !opened.block_device);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 1 << 20);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_planted_link_is_refused_when_the_file_may_be_created() {
        let dir = scratch("link");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let planted = dir.join("disk");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let e = open_file(&planted, Some(1 << 20), false).unwrap_err();
        assert!(matches!(e, FileOpenError::SymbolicLink { .. }), "{e}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious", "untouched");
        // A dangling link: nothing is created at its target.
        let dangling = dir.join("dangling");
        let target = dir.join("would-be-created");
        std::os::unix::fs::symlink(&target, &dangling).unwrap();
        let e = open_file(&dangling, Some(1 << 20), false).unwrap_err();
        assert!(matches!(e, FileOpenError::SymbolicLink { .. }), "{e}");
        assert!(!target.exists());
        // Without a size an existing device may be named by a link.
        let opened = open_file(&planted, None, false).unwrap();
        assert!(!opened.created);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_existing_file_is_extended_never_shrunk() {
        let dir = scratch("grow");
        let path = dir.join("disk");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        open_file(&path, Some(4096), false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 8192);
        open_file(&path, Some(16384), false).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 16384);
        assert_eq!(&std::fs::read(&path).unwrap()[..8192], &[7u8; 8192][..]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_file_with_other_names_is_not_extended() {
        let dir = scratch("links");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let planted = dir.join("disk");
        std::fs::hard_link(&victim, &planted).unwrap();
        let e = open_file(&planted, Some(1 << 20), false).unwrap_err();
        assert!(
            matches!(e, FileOpenError::NotOwnFile { links: 2, .. }),
            "{e}"
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // Used as it is, without a size: fine.
        open_file(&planted, None, false).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_and_odd_paths_are_typed_errors() {
        let dir = scratch("odd");
        let e = open_file(&dir.join("absent"), None, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("absent"), "{e}");
        let e = open_file(Path::new("/dev/null"), None, false).unwrap_err();
        assert!(
            matches!(e, FileOpenError::NotFileOrBlockDevice { .. }),
            "{e}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
