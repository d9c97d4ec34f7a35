//! Guest side of the VM rig.
//!
//! The binary `ustor-guest` is packed into the VM's initramfs. Booted, it
//! prepares the devices of the [`topology::Topology`] the host chose (NVMe
//! controllers handed to vfio-pci, LIO LUNs built through configfs), runs
//! the selected [`suite`] each in its own process with a wall-time bound,
//! and reports over the serial console in the [`protocol`] the host parses.
//!
//! The host side (`xtask`) uses this crate as a library for the topology
//! and the protocol, so both sides share one definition of each.

pub mod protocol;
pub mod reference;
pub mod runner;
pub mod setup;
pub mod suite;
pub mod supervise;
pub mod topology;
