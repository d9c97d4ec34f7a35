//! The `emu:` and `nvme:` leaf factories: spec strings to leaves opened
//! in the registry's [`NvmeEnvironment`].

#[cfg(feature = "emu")]
use std::path::PathBuf;
use std::sync::Arc;

use nvme::vfio::PciAddress;

use super::env::NvmeEnvironment;
use crate::device::BlockDevice;
use crate::spec::{LeafError, LeafFactory, LeafSpec};
#[cfg(feature = "emu")]
use crate::spec::{bytes_of, option_value, parse_size, size_option};

/// An emulated namespace for [`NvmeEnvironment::open_emu_namespace`].
#[cfg(feature = "emu")]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmuNamespace {
    /// Size in bytes (a multiple of the block size).
    pub size: u64,
    /// 512 or 4096.
    pub block_size: u32,
    /// No data (reads return nothing, writes are dropped): for overhead
    /// benchmarks.
    pub null: bool,
    /// MSRC (0's based), MSSRL, MCL: Copy limits; zero MSSRL or MCL turns
    /// Copy off.
    pub copy: (u8, u16, u32),
    /// Keep the blocks in this file (created if missing, extended to the
    /// size) instead of sparse memory, so they outlive the controller: a
    /// store can be closed, or lose power, and be opened again.
    pub file: Option<PathBuf>,
    /// Run the controller on a thread of its own, as a drive works beside
    /// the host, instead of inside the doorbell write.
    pub threaded: bool,
}

#[cfg(feature = "emu")]
impl EmuNamespace {
    /// A memory-backed namespace with the VM rig's Copy limits (MSRC 15,
    /// MSSRL 128, MCL 256).
    pub fn memory(size: u64, block_size: u32) -> EmuNamespace {
        EmuNamespace {
            size,
            block_size,
            null: false,
            copy: (15, 128, 256),
            file: None,
            threaded: false,
        }
    }
}

/// Opens `emu:SIZE[,bs=512|4096][,null][,msrc=N][,mssrl=N][,mcl=N][,file=PATH][,thread]`
/// leaves in an environment.
#[cfg(feature = "emu")]
pub(crate) struct EmuFactory {
    env: NvmeEnvironment,
}

#[cfg(feature = "emu")]
impl EmuFactory {
    pub(crate) fn new(env: NvmeEnvironment) -> EmuFactory {
        EmuFactory { env }
    }
}

#[cfg(feature = "emu")]
impl LeafFactory for EmuFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        const ALLOWED: &[&str] = &["bs", "null", "msrc", "mssrl", "mcl", "file", "thread"];
        let size = parse_size(spec.body)
            .map(bytes_of)
            .map_err(LeafError::BadBody)?;
        let block_size = match size_option(spec, ALLOWED, "bs")? {
            None => 512,
            Some(bs @ (512 | 4096)) => bs as u32,
            Some(bs) => {
                return Err(LeafError::BadOption {
                    key: "bs".into(),
                    reason: format!("{bs}: emulated namespaces have 512 or 4096-byte blocks"),
                });
            }
        };
        let flag = |key: &str| match option_value(spec, ALLOWED, key)? {
            None => Ok(false),
            Some("") => Ok(true),
            Some(v) => Err(LeafError::BadOption {
                key: key.to_string(),
                reason: format!("`{key}` is a flag and takes no value (got `{v}`)"),
            }),
        };
        let null = flag("null")?;
        let threaded = flag("thread")?;
        let file = match option_value(spec, ALLOWED, "file")? {
            None => None,
            Some("") => {
                return Err(LeafError::BadOption {
                    key: "file".into(),
                    reason: "needs a path: file=PATH".into(),
                });
            }
            Some(path) => Some(PathBuf::from(path)),
        };
        let number = |key: &str, max: u64| -> Result<Option<u64>, LeafError> {
            option_value(spec, ALLOWED, key)?
                .map(|v| match v.parse::<u64>() {
                    Ok(n) if n <= max => Ok(n),
                    _ => Err(LeafError::BadOption {
                        key: key.to_string(),
                        reason: format!("`{v}` is not a number in 0..={max}"),
                    }),
                })
                .transpose()
        };
        let rig = EmuNamespace::memory(size, block_size).copy;
        let copy = (
            number("msrc", 127)?.map_or(rig.0, |n| n as u8),
            number("mssrl", u64::from(u16::MAX))?.map_or(rig.1, |n| n as u16),
            number("mcl", u64::from(u32::MAX))?.map_or(rig.2, |n| n as u32),
        );
        let ns = self.env.open_emu_namespace(EmuNamespace {
            size,
            block_size,
            null,
            copy,
            file,
            threaded,
        })?;
        Ok(Arc::new(ns))
    }
}

/// Opens `nvme:DDDD:BB:DD.F/NSID` leaves in an environment.
pub(crate) struct NvmeFactory {
    env: NvmeEnvironment,
}

impl NvmeFactory {
    pub(crate) fn new(env: NvmeEnvironment) -> NvmeFactory {
        NvmeFactory { env }
    }
}

impl LeafFactory for NvmeFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        if let Some(o) = spec.options.first() {
            return Err(LeafError::BadOption {
                key: o.key.to_string(),
                reason: "nvme: takes no options".into(),
            });
        }
        let Some((addr, nsid)) = spec.body.rsplit_once('/') else {
            return Err(LeafError::BadBody(format!(
                "`{}`: expected DDDD:BB:DD.F/NSID, e.g. 0000:00:04.0/1",
                spec.body
            )));
        };
        addr.parse::<PciAddress>()
            .map_err(|e| LeafError::BadBody(e.to_string()))?;
        let nsid = match nsid.parse::<u32>() {
            Ok(n) if n > 0 && n != u32::MAX => n,
            _ => {
                return Err(LeafError::BadBody(format!(
                    "`{nsid}` is not a namespace id (1 to 0xfffffffe)"
                )));
            }
        };
        Ok(Arc::new(self.env.open_vfio_namespace(addr, nsid)?))
    }
}
