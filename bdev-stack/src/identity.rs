//! Identities the library controls, on which the copy engine pairs
//! offloads and judges overlap.
//!
//! A string a device reports (an NVMe SUBNQN, a copy manager's name, a
//! LUN's NAA designator) can repeat across devices: real drives share NQNs,
//! QEMU derives them from `serial=`, LIO builds NAA designators from the
//! first 25 hex digits of a serial. Pairing an offload on such a string
//! sends a copy to the wrong device. So pairing uses an [`OffloadDomain`]:
//! the handle this process opened (an NVMe controller, an emulated target)
//! or a transport address the library resolved itself (a SCSI
//! host:channel:target nexus); a device-reported string may add a check,
//! never grant. Overlap uses a [`BackingId`]: what the blocks of a leaf are
//! (file device and inode, controller and namespace, a designator verified
//! unique), so two handles of one file are seen to overlap.

use std::any::Any;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};

use crate::device::DeviceId;

/// Where an offload can be executed: two leaves with equal domains reach
/// one executor (one NVMe controller, one SCSI copy manager).
#[derive(Clone)]
pub struct OffloadDomain(Domain);

#[derive(Clone)]
enum Domain {
    /// An object this process opened, compared by identity. Weak: the
    /// domain does not keep the handle open, and the allocation it points
    /// to cannot be reused while the domain exists.
    Handle(Weak<dyn Any + Send + Sync>),
    /// A transport address the library resolved (not one a device
    /// reported).
    Address(Arc<str>),
}

impl OffloadDomain {
    /// The domain of one opened handle: equal only to domains made from
    /// the same `Arc`.
    pub fn handle<T: Any + Send + Sync>(handle: &Arc<T>) -> OffloadDomain {
        let weak: Weak<dyn Any + Send + Sync> = Arc::downgrade(handle) as _;
        OffloadDomain(Domain::Handle(weak))
    }

    /// The domain of a transport address the library resolved itself,
    /// e.g. `scsi-nexus:2:0:1` from sysfs or a PCI address.
    pub fn address(address: &str) -> OffloadDomain {
        OffloadDomain(Domain::Address(Arc::from(address)))
    }

    fn handle_ptr(weak: &Weak<dyn Any + Send + Sync>) -> *const () {
        weak.as_ptr() as *const ()
    }
}

impl PartialEq for OffloadDomain {
    fn eq(&self, other: &OffloadDomain) -> bool {
        match (&self.0, &other.0) {
            (Domain::Handle(a), Domain::Handle(b)) => {
                std::ptr::eq(OffloadDomain::handle_ptr(a), OffloadDomain::handle_ptr(b))
            }
            (Domain::Address(a), Domain::Address(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for OffloadDomain {}

impl Hash for OffloadDomain {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match &self.0 {
            Domain::Handle(weak) => (OffloadDomain::handle_ptr(weak) as usize).hash(state),
            Domain::Address(address) => address.hash(state),
        }
    }
}

impl fmt::Debug for OffloadDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for OffloadDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Domain::Handle(weak) => write!(f, "handle@{:p}", OffloadDomain::handle_ptr(weak)),
            Domain::Address(address) => f.write_str(address),
        }
    }
}

/// What a leaf's blocks are. Two leaves with equal backings read and write
/// the same blocks, whatever objects the process holds for them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackingId {
    /// Blocks no other leaf reaches (memory of its own, or a device whose
    /// identity cannot be verified).
    Device(DeviceId),
    /// A regular file (`st_dev`, `st_ino`) or a block device (`st_rdev`,
    /// with `ino` 0).
    File {
        /// The file system's device number, or the block device's.
        dev: u64,
        /// The inode number; 0 for a block device.
        ino: u64,
    },
    /// A namespace of one opened NVMe controller.
    Namespace {
        /// The controller.
        controller: OffloadDomain,
        /// Namespace id.
        nsid: u32,
    },
    /// A SCSI LUN, by a designator verified unique among the LUNs its copy
    /// manager reaches.
    Lun {
        /// The copy manager.
        copy_manager: OffloadDomain,
        /// The designator.
        designator: Arc<[u8]>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_equal_only_to_themselves() {
        let (a, b) = (Arc::new(1u32), Arc::new(1u32));
        assert_eq!(OffloadDomain::handle(&a), OffloadDomain::handle(&a));
        assert_ne!(OffloadDomain::handle(&a), OffloadDomain::handle(&b));
        assert_ne!(
            OffloadDomain::handle(&a),
            OffloadDomain::address(&format!("{:p}", Arc::as_ptr(&a)))
        );
        assert_eq!(
            OffloadDomain::address("scsi-nexus:1:0:0"),
            OffloadDomain::address("scsi-nexus:1:0:0")
        );
    }

    #[test]
    fn a_handle_keeps_its_identity_after_the_object_is_gone() {
        let a = Arc::new(7u64);
        let domain = OffloadDomain::handle(&a);
        drop(a);
        // The Weak holds the allocation: a new object cannot take its
        // address while the domain exists.
        let b = Arc::new(7u64);
        assert_ne!(domain, OffloadDomain::handle(&b));
    }
}
