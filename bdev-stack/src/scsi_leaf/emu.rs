//! The `sgemu:` leaf factory: LUNs of in-process emulated SCSI targets,
//! made and shared per factory.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use scsi_sg::emu::{EmuConfig, EmuTarget};

use super::ScsiLeaf;
use crate::device::BlockDevice;
use crate::spec::{LeafError, LeafFactory, LeafSpec};

/// How a spec asked an emulated target to be built; later LUNs naming the
/// target must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EmuSettings {
    xcopy: bool,
    rod: bool,
}

#[derive(Default)]
struct EmuTargets {
    targets: HashMap<String, (EmuTarget, EmuSettings)>,
    anonymous: u64,
}

/// Opens `sgemu:SIZE[,bs=512][,target=NAME][,xcopy=on|off][,rod[=on|off]]`
/// leaves: LUNs of in-process emulated SCSI targets.
///
/// LUNs that name the same `target` (within one factory, so within one
/// [`LeafRegistry`](crate::spec::LeafRegistry)) are LUNs of one
/// [`EmuTarget`], so EXTENDED COPY and ROD tokens pass between them; a LUN
/// without `target` gets a target of its own. Targets of different
/// factories are different targets even when they share a name: each is
/// its own copy manager (the copy-offload domain is the target object,
/// never its name), so nothing is offloaded between them. `xcopy` (default on) and
/// `rod` (default off) set what the target's copy manager offers; every
/// LUN of a target must say the same. The copy engine prefers EXTENDED
/// COPY where a LUN offers both, so a ROD-token stack says `xcopy=off,rod=on`.
#[derive(Default)]
pub struct SgEmuFactory {
    targets: Mutex<EmuTargets>,
}

impl fmt::Debug for SgEmuFactory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SgEmuFactory").finish_non_exhaustive()
    }
}

impl SgEmuFactory {
    /// A factory with no targets yet.
    pub fn new() -> SgEmuFactory {
        SgEmuFactory::default()
    }

    /// The target named `name`, once a spec has made it (for tests: fault
    /// injection, advancing the token clock).
    pub fn target(&self, name: &str) -> Option<EmuTarget> {
        self.lock().targets.get(name).map(|(t, _)| t.clone())
    }

    fn lock(&self) -> MutexGuard<'_, EmuTargets> {
        // The map stays consistent across a panic elsewhere.
        self.targets.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn on_off(spec: &LeafSpec<'_>, key: &str, default: bool) -> Result<bool, LeafError> {
    match spec
        .options
        .iter()
        .rev()
        .find(|o| o.key == key)
        .map(|o| o.value)
    {
        None => Ok(default),
        // A bare flag (`sgemu:1m,rod`) is on.
        Some("" | "on" | "1" | "yes" | "true") => Ok(true),
        Some("off" | "0" | "no" | "false") => Ok(false),
        Some(other) => Err(LeafError::BadOption {
            key: key.to_string(),
            reason: format!("`{other}`: say on or off"),
        }),
    }
}

impl LeafFactory for SgEmuFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        const ALLOWED: &[&str] = &["bs", "target", "xcopy", "rod"];
        if let Some(option) = spec.options.iter().find(|o| !ALLOWED.contains(&o.key)) {
            return Err(LeafError::BadOption {
                key: option.key.to_string(),
                reason: format!("sgemu: takes only {}", ALLOWED.join(", ")),
            });
        }
        let size = crate::spec::parse_bytes(spec.body).map_err(LeafError::BadBody)?;
        let block_size = match spec.options.iter().rev().find(|o| o.key == "bs") {
            None => 512,
            Some(o) => crate::spec::parse_bytes(o.value)
                .ok()
                .and_then(|b| u32::try_from(b).ok())
                .filter(|b| *b >= 512 && b.is_power_of_two())
                .ok_or_else(|| LeafError::BadOption {
                    key: "bs".into(),
                    reason: format!("`{}`: a power of two of at least 512", o.value),
                })?,
        };
        let blocks = size / u64::from(block_size);
        if blocks == 0 || size % u64::from(block_size) != 0 {
            return Err(LeafError::BadBody(format!(
                "{size} bytes is not a positive multiple of the {block_size}-byte block"
            )));
        }
        let settings = EmuSettings {
            xcopy: on_off(spec, "xcopy", true)?,
            rod: on_off(spec, "rod", false)?,
        };
        let mut targets = self.lock();
        let name = match spec.options.iter().rev().find(|o| o.key == "target") {
            Some(o) => o.value.to_string(),
            None => {
                targets.anonymous += 1;
                format!("anonymous-{}", targets.anonymous)
            }
        };
        let target = match targets.targets.get(&name) {
            Some((target, existing)) if *existing == settings => target.clone(),
            Some((_, existing)) => {
                return Err(LeafError::BadOption {
                    key: "target".into(),
                    reason: format!(
                        "target `{name}` was made with xcopy={} rod={}; its LUNs must agree",
                        if existing.xcopy { "on" } else { "off" },
                        if existing.rod { "on" } else { "off" },
                    ),
                });
            }
            None => {
                let mut config = EmuConfig::default();
                if !settings.xcopy {
                    // No segment descriptors: the probe finds no usable
                    // EXTENDED COPY and the target refuses any list.
                    config.copy.max_segment_descriptors = 0;
                }
                if !settings.rod {
                    config.rod = None;
                }
                let target = EmuTarget::new(&name, config);
                targets
                    .targets
                    .insert(name.clone(), (target.clone(), settings));
                target
            }
        };
        drop(targets);
        let lun = target.add_memory_lun(blocks, block_size);
        Ok(Arc::new(ScsiLeaf::from_emu(lun)?))
    }
}
