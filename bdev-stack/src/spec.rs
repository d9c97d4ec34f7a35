//! Building a stack from a spec string, the one syntax the library,
//! examples and benchmarks accept:
//!
//! ```text
//! device := concat(device, ...)
//!         | stripe(chunk=SIZE, device, device, ...)
//!         | mirror([region=SIZE,] device, device, ...)
//!         | assemble(device, device, ...)            a stack with metadata, from its members
//!         | KIND:BODY[,key=value...]            a leaf
//! ```
//!
//! Leaves: `mem:SIZE[,bs=512][,max=SIZE][,copy=nvme[,msrc=N][,mssrl=N][,mcl=N]]`
//! (with `copy=nvme`, an offload-capable memory leaf with NVMe Copy limits,
//! by default those of the VM rig: MSRC 15, MSSRL 128, MCL 256),
//! `file:PATH[,bs=512][,size=SIZE]`
//! (with `size`, created or extended),
//! `emu:SIZE[,bs=512|4096][,null][,msrc=N][,mssrl=N][,mcl=N]` (an in-process
//! emulated NVMe controller with one namespace; Copy limits default to the
//! rig's, `mssrl=0` turns Copy off) and `nvme:DDDD:BB:DD.F/NSID` (a namespace
//! of a controller bound to vfio-pci); see [`crate::nvme_leaf`];
//! `sg:/dev/sgN` (a SCSI LUN through the sg driver's queued interface) and
//! `sgemu:SIZE[,bs=512][,target=NAME][,xcopy=on|off][,rod]` (a LUN of an
//! in-process emulated SCSI target; LUNs naming one `target` in one
//! registry share it, and with it EXTENDED COPY and ROD tokens); see
//! [`crate::ScsiLeaf`]. A reserved kind without a factory fails with
//! [`SpecErrorKind::LeafNotAvailable`]. SIZE is bytes with an optional `k`, `m`,
//! `g` or `t` suffix; for `chunk` and `region` a bare number is in blocks.
//! A leaf's options follow its body; a virtual device's options come before
//! its members. Errors carry the 1-based column they concern.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::device::BlockDevice;
use crate::error::BdevError;
use crate::file::{FileDevice, FileEngine};
use crate::mem::{DEFAULT_MEM_MAX_TRANSFER_BYTES, MemCopyLimits, MemDevice};
use crate::mirror::{DEFAULT_REGION_BYTES, Mirror};
use crate::nvme_leaf::NvmeEnvironment;
use crate::split::{Concat, Stripe};

/// Leaf kinds reserved for drivers that register later.
pub const RESERVED_LEAF_KINDS: [&str; 3] = ["nvme", "sg", "emu"];

/// What went wrong in a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecErrorKind {
    /// The parser wanted something else here.
    #[error("expected {0}")]
    Expected(&'static str),
    /// A virtual device name the builder does not know.
    #[error("unknown device `{0}` (concat, stripe, mirror)")]
    UnknownDevice(String),
    /// A leaf kind nobody provides.
    #[error("unknown leaf kind `{0}:`")]
    UnknownLeafKind(String),
    /// A reserved leaf kind without a registered factory.
    #[error("leaf kind `{0}:` is not available yet (no factory registered)")]
    LeafNotAvailable(String),
    /// An option the device does not take.
    #[error("{device} takes no option `{option}`")]
    UnknownOption {
        /// The device kind.
        device: String,
        /// The option.
        option: String,
    },
    /// An option or body value that does not parse or is out of range.
    #[error("bad value for {what}: {reason}")]
    BadValue {
        /// What was being given.
        what: String,
        /// Why it is wrong.
        reason: String,
    },
    /// The device could not be built.
    #[error("{0}")]
    Device(#[source] BdevError),
    /// Devices nested deeper than the parser follows.
    #[error(
        "devices nested more than {0} deep: flatten the stack (a concat or stripe takes many members)"
    )]
    TooDeep(usize),
}

/// How deep virtual devices may nest in a spec: far beyond any real stack,
/// and well within the parser's stack.
pub const MAX_SPEC_DEPTH: usize = 64;

/// A spec that could not be built, with the column (1-based, in
/// characters) it went wrong at.
#[derive(Debug)]
pub struct SpecError {
    /// 1-based column.
    pub column: usize,
    /// What went wrong.
    pub kind: SpecErrorKind,
    spec: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "spec error at column {}: {}", self.column, self.kind)?;
        writeln!(f, "  {}", self.spec)?;
        write!(f, "  {:>width$}", "^", width = self.column)
    }
}

impl std::error::Error for SpecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        // The first line already shows the device's error: its causes
        // follow.
        match &self.kind {
            SpecErrorKind::Device(e) => std::error::Error::source(e),
            _ => None,
        }
    }
}

/// A `key=value` option of a leaf, with its column. A bare word (a flag,
/// like `null` in `emu:1g,null`) has an empty value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafOption<'a> {
    /// The key.
    pub key: &'a str,
    /// The value.
    pub value: &'a str,
    /// 1-based column of the key.
    pub column: usize,
}

/// A leaf as written in a spec, for a [`LeafFactory`].
#[derive(Debug, Clone, Copy)]
pub struct LeafSpec<'a> {
    /// The kind, e.g. `nvme`.
    pub kind: &'a str,
    /// What follows `kind:`, e.g. `0000:00:04.0/1`.
    pub body: &'a str,
    /// The options after the body.
    pub options: &'a [LeafOption<'a>],
}

/// Why a factory could not open a leaf.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    /// The body is malformed.
    #[error("{0}")]
    BadBody(String),
    /// An option is unknown or its value bad.
    #[error("option `{key}`: {reason}")]
    BadOption {
        /// The option's key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The device refused to open.
    #[error(transparent)]
    Device(#[from] BdevError),
}

/// Opens leaves of one kind. The NVMe and SCSI drivers register one each.
pub trait LeafFactory: Send + Sync {
    /// Opens the leaf `spec` describes.
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError>;
}

/// Which factory opens which leaf kind, and the [`NvmeEnvironment`] its
/// NVMe leaves are opened in: the stacks one registry builds share DMA
/// contexts (one buffer serves them all), those of two registries do not.
/// Clones share the factories and the environment.
#[derive(Clone)]
pub struct LeafRegistry {
    factories: HashMap<String, Arc<dyn LeafFactory>>,
    nvme: NvmeEnvironment,
}

impl Default for LeafRegistry {
    fn default() -> LeafRegistry {
        LeafRegistry::with_defaults()
    }
}

impl LeafRegistry {
    /// A registry with the `mem`, `file`, `emu`, `nvme`, `ng`, `sg` and
    /// `sgemu` leaves, in a fresh [`NvmeEnvironment`] of its own.
    pub fn with_defaults() -> LeafRegistry {
        LeafRegistry::with_environment(NvmeEnvironment::new())
    }

    /// A registry with the default leaves whose `emu:` and `nvme:` leaves
    /// are opened in `env`: its stacks share DMA contexts with every other
    /// registry over `env`.
    pub fn with_environment(env: NvmeEnvironment) -> LeafRegistry {
        let mut registry = LeafRegistry {
            factories: HashMap::new(),
            nvme: env.clone(),
        };
        registry.register("mem", Arc::new(MemFactory));
        registry.register("file", Arc::new(FileFactory));
        registry.register(
            "emu",
            Arc::new(crate::nvme_leaf::EmuFactory::new(env.clone())),
        );
        registry.register("nvme", Arc::new(crate::nvme_leaf::NvmeFactory::new(env)));
        registry.register("ng", Arc::new(crate::ng::NgFactory));
        registry.register(
            "nvme-tcp",
            Arc::new(crate::nvme_leaf::TcpFactory::default()),
        );
        registry.register("sg", Arc::new(crate::scsi_leaf::SgFactory));
        registry.register("sgemu", Arc::new(crate::scsi_leaf::SgEmuFactory::new()));
        registry
    }

    /// The environment the `emu:` and `nvme:` leaves are opened in: its
    /// allocators give buffers those leaves take.
    pub fn nvme_environment(&self) -> &NvmeEnvironment {
        &self.nvme
    }

    /// Registers (or replaces) the factory for `kind`.
    pub fn register(&mut self, kind: &str, factory: Arc<dyn LeafFactory>) {
        self.factories.insert(kind.to_string(), factory);
    }

    /// Builds the device `spec` describes.
    pub fn build(&self, spec: &str) -> Result<Arc<dyn BlockDevice>, SpecError> {
        let mut parser = Parser {
            text: spec,
            pos: 0,
            depth: 0,
            registry: self,
        };
        let device = parser.device().map_err(|(offset, kind)| SpecError {
            column: spec[..offset.min(spec.len())].chars().count() + 1,
            kind,
            spec: spec.to_string(),
        })?;
        parser.skip_space();
        if parser.pos < spec.len() {
            return Err(SpecError {
                column: spec[..parser.pos].chars().count() + 1,
                kind: SpecErrorKind::Expected("end of spec"),
                spec: spec.to_string(),
            });
        }
        Ok(device)
    }
}

/// Builds `spec` with the default leaves (`mem`, `file`, `emu`, `nvme`,
/// `sg`, `sgemu`), in a fresh registry: NVMe leaves of two such stacks are
/// in different DMA contexts. Build stacks that share buffers (a copy's
/// source and destination) with one [`LeafRegistry`].
pub fn build(spec: &str) -> Result<Arc<dyn BlockDevice>, SpecError> {
    LeafRegistry::with_defaults().build(spec)
}

/// A parse failure: byte offset and what.
type Failure = (usize, SpecErrorKind);

struct Parser<'s, 'r> {
    text: &'s str,
    pos: usize,
    /// Virtual devices open around the current position.
    depth: usize,
    registry: &'r LeafRegistry,
}

/// A size with its unit as written.
pub(crate) enum Size {
    Bytes(u64),
    Blocks(u64),
}

pub(crate) fn parse_size(value: &str) -> Result<Size, String> {
    let (digits, multiplier) = match value.chars().last() {
        Some('k' | 'K') => (&value[..value.len() - 1], Some(1u64 << 10)),
        Some('m' | 'M') => (&value[..value.len() - 1], Some(1 << 20)),
        Some('g' | 'G') => (&value[..value.len() - 1], Some(1 << 30)),
        Some('t' | 'T') => (&value[..value.len() - 1], Some(1 << 40)),
        _ => (value, None),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{value}` is not a size (e.g. 4096, 128k, 64m)"))?;
    match multiplier {
        Some(m) => n
            .checked_mul(m)
            .map(Size::Bytes)
            .ok_or_else(|| format!("`{value}` is more bytes than 64 bits count")),
        None => Ok(Size::Bytes(n)),
    }
}

/// A size where a bare number means blocks.
fn parse_blocks(value: &str) -> Result<Size, String> {
    if value.chars().all(|c| c.is_ascii_digit()) {
        return value
            .parse()
            .map(Size::Blocks)
            .map_err(|_| format!("`{value}` is not a number"));
    }
    parse_size(value)
}

/// A size as the spec grammar writes it (`4096`, `128k`, `64m`, `1g`, `2t`),
/// in bytes; the error says what was wrong. For tools that take sizes on
/// their command line, so one parser serves everything.
pub fn parse_bytes(value: &str) -> Result<u64, String> {
    parse_size(value).map(bytes_of)
}

pub(crate) fn bytes_of(size: Size) -> u64 {
    match size {
        Size::Bytes(n) | Size::Blocks(n) => n,
    }
}

impl<'s> Parser<'s, '_> {
    fn skip_space(&mut self) {
        while let Some(c) = self.text[self.pos..].chars().next() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn peek(&self) -> Option<char> {
        self.text[self.pos..].chars().next()
    }

    fn ident(&mut self) -> &'s str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            // `-` for leaf kinds like `nvme-tcp`.
            if !(c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                break;
            }
            self.pos += 1;
        }
        &self.text[start..self.pos]
    }

    fn expect(&mut self, c: char, what: &'static str) -> Result<(), Failure> {
        self.skip_space();
        if self.peek() == Some(c) {
            self.pos += 1;
            Ok(())
        } else {
            Err((self.pos, SpecErrorKind::Expected(what)))
        }
    }

    /// True if the text ahead is `ident=`.
    fn option_ahead(&self) -> bool {
        let rest = self.text[self.pos..].trim_start();
        let name_len = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len());
        name_len > 0 && rest[name_len..].trim_start().starts_with('=')
    }

    /// A bare word that is not a device (no `(`, `:` or `=` after it), e.g.
    /// `null` in `emu:1g,null`: a leaf flag, taken as an option with an
    /// empty value.
    fn flag_ahead(&mut self) -> Option<LeafOption<'s>> {
        let save = self.pos;
        self.skip_space();
        let column = self.pos;
        let key = self.ident();
        let end = self.pos;
        self.skip_space();
        let next = self.peek();
        if key.is_empty() || matches!(next, Some('(' | ':' | '=')) {
            self.pos = save;
            return None;
        }
        self.pos = end;
        Some(LeafOption {
            key,
            value: "",
            column,
        })
    }

    /// `key=value`, value up to `,` `)` or whitespace.
    fn option(&mut self) -> Result<LeafOption<'s>, Failure> {
        self.skip_space();
        let column = self.pos;
        let key = self.ident();
        self.expect('=', "`=`")?;
        self.skip_space();
        let value = self.word();
        if value.is_empty() {
            return Err((self.pos, SpecErrorKind::Expected("a value")));
        }
        Ok(LeafOption { key, value, column })
    }

    /// Characters up to `,` `)` `(` or whitespace.
    fn word(&mut self) -> &'s str {
        let start = self.pos;
        while let Some(c) = self.peek() {
            if c == ',' || c == ')' || c == '(' || c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
        &self.text[start..self.pos]
    }

    fn device(&mut self) -> Result<Arc<dyn BlockDevice>, Failure> {
        self.skip_space();
        let start = self.pos;
        let name = self.ident();
        if name.is_empty() {
            return Err((start, SpecErrorKind::Expected("a device")));
        }
        match self.peek() {
            Some('(') => {
                if self.depth >= MAX_SPEC_DEPTH {
                    return Err((start, SpecErrorKind::TooDeep(MAX_SPEC_DEPTH)));
                }
                self.pos += 1;
                self.depth += 1;
                let device = self.virtual_device(name, start);
                self.depth -= 1;
                device
            }
            Some(':') => {
                self.pos += 1;
                self.leaf(name, start)
            }
            _ => Err((
                self.pos,
                SpecErrorKind::Expected("`(` or `:` after a device name"),
            )),
        }
    }

    fn leaf(&mut self, kind: &'s str, start: usize) -> Result<Arc<dyn BlockDevice>, Failure> {
        let body_at = self.pos;
        let body = self.word();
        if body.is_empty() {
            return Err((
                body_at,
                SpecErrorKind::Expected("the leaf's body after `:`"),
            ));
        }
        let mut options = Vec::new();
        loop {
            let save = self.pos;
            self.skip_space();
            if self.peek() == Some(',') {
                self.pos += 1;
                if self.option_ahead() {
                    options.push(self.option()?);
                    continue;
                }
                if let Some(flag) = self.flag_ahead() {
                    options.push(flag);
                    continue;
                }
            }
            self.pos = save;
            break;
        }
        let Some(factory) = self.registry.factories.get(kind) else {
            let kind_error = if RESERVED_LEAF_KINDS.contains(&kind) {
                SpecErrorKind::LeafNotAvailable(kind.to_string())
            } else {
                SpecErrorKind::UnknownLeafKind(kind.to_string())
            };
            return Err((start, kind_error));
        };
        let spec = LeafSpec {
            kind,
            body,
            options: &options,
        };
        factory.open(&spec).map_err(|error| match error {
            LeafError::BadBody(reason) => (
                body_at,
                SpecErrorKind::BadValue {
                    what: format!("{kind}: leaf"),
                    reason,
                },
            ),
            LeafError::BadOption { key, reason } => {
                let at = options
                    .iter()
                    .find(|o| o.key == key)
                    .map_or(start, |o| o.column);
                (
                    at,
                    SpecErrorKind::BadValue {
                        what: format!("option `{key}`"),
                        reason,
                    },
                )
            }
            LeafError::Device(BdevError::LeafKindNotAvailable { kind }) => {
                (start, SpecErrorKind::LeafNotAvailable(kind))
            }
            LeafError::Device(e) => (start, SpecErrorKind::Device(e)),
        })
    }

    fn virtual_device(
        &mut self,
        name: &'s str,
        start: usize,
    ) -> Result<Arc<dyn BlockDevice>, Failure> {
        let allowed: &[&str] = match name {
            "concat" => &[],
            "stripe" => &["chunk"],
            "mirror" => &["region"],
            "assemble" => &[],
            _ => return Err((start, SpecErrorKind::UnknownDevice(name.to_string()))),
        };
        let mut options: Vec<LeafOption<'s>> = Vec::new();
        let mut members: Vec<(usize, Arc<dyn BlockDevice>)> = Vec::new();
        loop {
            self.skip_space();
            if members.is_empty() && self.option_ahead() {
                let option = self.option()?;
                if !allowed.contains(&option.key) {
                    return Err((
                        option.column,
                        SpecErrorKind::UnknownOption {
                            device: name.to_string(),
                            option: option.key.to_string(),
                        },
                    ));
                }
                options.push(option);
            } else {
                self.skip_space();
                let at = self.pos;
                members.push((at, self.device()?));
            }
            self.skip_space();
            match self.peek() {
                Some(',') => self.pos += 1,
                Some(')') => {
                    self.pos += 1;
                    break;
                }
                _ => return Err((self.pos, SpecErrorKind::Expected("`,` or `)`"))),
            }
        }
        let block_size = members
            .first()
            .map_or(512, |(_, m)| u64::from(m.info().block_size));
        let blocks_option =
            |key: &str, default_bytes: Option<u64>| -> Result<Option<u64>, Failure> {
                let Some(option) = options.iter().find(|o| o.key == key) else {
                    return Ok(default_bytes.map(|b| (b / block_size).max(1)));
                };
                let bad = |reason: String| {
                    (
                        option.column,
                        SpecErrorKind::BadValue {
                            what: format!("option `{key}`"),
                            reason,
                        },
                    )
                };
                match parse_blocks(option.value).map_err(bad)? {
                    Size::Blocks(n) => Ok(Some(n)),
                    Size::Bytes(n) if n % block_size == 0 => Ok(Some(n / block_size)),
                    Size::Bytes(n) => Err(bad(format!(
                        "{n} bytes is not a multiple of the {block_size}-byte block"
                    ))),
                }
            };
        let member_columns: Vec<usize> = members.iter().map(|(at, _)| *at).collect();
        let devices: Vec<Arc<dyn BlockDevice>> = members.into_iter().map(|(_, d)| d).collect();
        let built: Result<Arc<dyn BlockDevice>, BdevError> = match name {
            "concat" => Concat::new(devices.clone()).map(|d| Arc::new(d) as _),
            "stripe" => {
                let Some(chunk) = blocks_option("chunk", None)? else {
                    return Err((start, SpecErrorKind::Expected("stripe(chunk=SIZE, ...)")));
                };
                Stripe::new(devices.clone(), chunk).map(|d| Arc::new(d) as _)
            }
            "assemble" => Mirror::assemble(devices.clone(), members_allocator(&devices)).map(
                |(mirror, report)| {
                    tracing::info!(?report, "assembled from the spec");
                    Arc::new(mirror) as _
                },
            ),
            _ => {
                let region = blocks_option("region", Some(DEFAULT_REGION_BYTES))?.unwrap_or(1);
                Mirror::new(devices.clone(), region).map(|d| Arc::new(d) as _)
            }
        };
        built.map_err(|error| {
            // Point at the member a block-size mismatch is about.
            let at = match &error {
                BdevError::BlockSizeMismatch { member, .. } => devices
                    .iter()
                    .position(|d| &d.info().name == member)
                    .map_or(start, |i| member_columns[i]),
                // And at the option an invalid parameter came from.
                BdevError::InvalidParameter { parameter, .. } => options
                    .iter()
                    .find(|o| o.key == *parameter)
                    .map_or(start, |o| o.column),
                _ => start,
            };
            (at, SpecErrorKind::Device(error))
        })
    }
}

/// Memory the members' metadata can be read and written through: a
/// member's own DMA allocator where it needs device addresses, host memory
/// otherwise.
pub fn members_allocator(members: &[Arc<dyn BlockDevice>]) -> Arc<dyn crate::DmaAllocator> {
    members
        .iter()
        .find_map(|m| m.iova_allocator())
        .unwrap_or_else(|| Arc::new(crate::HostAllocator))
}

pub(crate) fn option_value<'a>(
    spec: &LeafSpec<'a>,
    allowed: &[&str],
    key: &str,
) -> Result<Option<&'a str>, LeafError> {
    for option in spec.options {
        if !allowed.contains(&option.key) {
            return Err(LeafError::BadOption {
                key: option.key.to_string(),
                reason: format!("{}: takes only {}", spec.kind, allowed.join(", ")),
            });
        }
    }
    Ok(spec
        .options
        .iter()
        .rev()
        .find(|o| o.key == key)
        .map(|o| o.value))
}

pub(crate) fn size_option(
    spec: &LeafSpec<'_>,
    allowed: &[&str],
    key: &str,
) -> Result<Option<u64>, LeafError> {
    option_value(spec, allowed, key)?
        .map(|v| {
            parse_size(v)
                .map(bytes_of)
                .map_err(|reason| LeafError::BadOption {
                    key: key.to_string(),
                    reason,
                })
        })
        .transpose()
}

fn block_size_option(spec: &LeafSpec<'_>, allowed: &[&str]) -> Result<u32, LeafError> {
    match size_option(spec, allowed, "bs")? {
        None => Ok(512),
        Some(bs) => u32::try_from(bs).map_err(|_| LeafError::BadOption {
            key: "bs".into(),
            reason: format!("{bs} is too large"),
        }),
    }
}

struct MemFactory;

impl LeafFactory for MemFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        const ALLOWED: &[&str] = &["bs", "max", "copy", "msrc", "mssrl", "mcl"];
        let size = parse_size(spec.body)
            .map(bytes_of)
            .map_err(LeafError::BadBody)?;
        let block_size = block_size_option(spec, ALLOWED)?;
        let max = size_option(spec, ALLOWED, "max")?.unwrap_or(DEFAULT_MEM_MAX_TRANSFER_BYTES);
        let device = MemDevice::new(size, block_size, max)?;
        let number = |key: &str| -> Result<Option<u64>, LeafError> {
            option_value(spec, ALLOWED, key)?
                .map(|v| {
                    v.parse::<u64>().map_err(|_| LeafError::BadOption {
                        key: key.to_string(),
                        reason: format!("`{v}` is not a number"),
                    })
                })
                .transpose()
        };
        let limit_keys = ["msrc", "mssrl", "mcl"];
        match option_value(spec, ALLOWED, "copy")? {
            None => {
                if let Some(key) = limit_keys
                    .iter()
                    .find(|k| spec.options.iter().any(|o| o.key == **k))
                {
                    return Err(LeafError::BadOption {
                        key: key.to_string(),
                        reason: "copy limits need `copy=nvme`".into(),
                    });
                }
                Ok(Arc::new(device))
            }
            Some("nvme") => {
                let defaults = MemCopyLimits::default();
                let msrc = number("msrc")?.unwrap_or(u64::from(defaults.max_ranges) - 1);
                let limits = MemCopyLimits {
                    max_ranges: u32::try_from(msrc.saturating_add(1)).map_err(|_| {
                        LeafError::BadOption {
                            key: "msrc".into(),
                            reason: format!("{msrc} is too large"),
                        }
                    })?,
                    max_range_blocks: number("mssrl")?.unwrap_or(defaults.max_range_blocks),
                    max_command_blocks: number("mcl")?.unwrap_or(defaults.max_command_blocks),
                };
                Ok(Arc::new(device.with_copy_offload(limits)?))
            }
            Some(other) => Err(LeafError::BadOption {
                key: "copy".into(),
                reason: format!("`{other}`: the memory leaf offers `copy=nvme`"),
            }),
        }
    }
}

struct FileFactory;

impl LeafFactory for FileFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        const ALLOWED: &[&str] = &["bs", "size", "engine"];
        let block_size = block_size_option(spec, ALLOWED)?;
        let size = size_option(spec, ALLOWED, "size")?;
        let engine = match spec.options.iter().rev().find(|o| o.key == "engine") {
            None => FileEngine::Auto,
            Some(o) => match o.value {
                "auto" => FileEngine::Auto,
                "uring" => FileEngine::Uring,
                "sync" => FileEngine::Sync,
                other => {
                    return Err(LeafError::BadOption {
                        key: "engine".into(),
                        reason: format!("`{other}`: auto, uring or sync"),
                    });
                }
            },
        };
        Ok(Arc::new(FileDevice::open_with(
            Path::new(spec.body),
            block_size,
            size,
            engine,
        )?))
    }
}
