//! The `emu:` and `sgemu:` factories of a build without the emulators:
//! the spec grammar keeps both kinds, and opening one says which feature
//! brings them.

use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::BdevError;
use crate::nvme_leaf::NvmeEnvironment;
use crate::spec::{LeafError, LeafFactory, LeafSpec};

/// Refuses `emu:` leaves: this build has no emulated NVMe controller.
pub(crate) struct EmuFactory;

impl EmuFactory {
    pub(crate) fn new(_env: NvmeEnvironment) -> EmuFactory {
        EmuFactory
    }
}

impl LeafFactory for EmuFactory {
    fn open(&self, _spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        Err(BdevError::EmulatorNotBuilt { kind: "emu" }.into())
    }
}

/// Refuses `sgemu:` leaves: this build has no emulated SCSI target (the
/// `emu` feature brings it).
#[derive(Debug, Default)]
pub struct SgEmuFactory;

impl SgEmuFactory {
    /// The factory.
    pub fn new() -> SgEmuFactory {
        SgEmuFactory
    }
}

impl LeafFactory for SgEmuFactory {
    fn open(&self, _spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        Err(BdevError::EmulatorNotBuilt { kind: "sgemu" }.into())
    }
}
