//! NVMe over TCP: an initiator beside the PCIe driver, with the same
//! shape (a controller, one queue pair per thread, staged submission,
//! bounded polling) over one TCP connection per queue.
//!
//! ```text
//!   TcpController  admin queue 0: ICReq/ICResp, Fabrics Connect,
//!      |           Property Get/Set (CAP, VS, CC, CSTS), Identify,
//!      |           Set Features (queues), Keep Alive from a thread
//!   TcpQueuePair   I/O queue: its own connection and Connect (same
//!                  controller id); capsules, C2HData, R2T, H2CData
//! ```
//!
//! - [`pdu`]: the PDU headers and digests (CRC32C), checked on receipt.
//! - [`fabrics`]: Connect, Property Get/Set, Keep Alive, SGL descriptors,
//!   the Discovery log page.
//! - [`discover`] lists what a discovery controller offers.
//!
//! Failures of a connection are values: every outstanding command is
//! completed once ([`crate::IoError::Disconnected`]), and the queue is
//! connected again on request ([`TcpQueuePair::reconnect`],
//! [`TcpController::reconnect`]).

mod conn;
mod controller;
pub mod fabrics;
pub mod pdu;
mod queue;
#[cfg(feature = "emu")]
pub mod serve;
mod wire;

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

pub use controller::{TcpController, discover};
pub use fabrics::DiscoveryEntry;
pub use queue::TcpQueuePair;

/// The default NVMe/TCP port of I/O controllers (4420); discovery
/// controllers listen on 8009 by convention.
pub const DEFAULT_PORT: u16 = 4420;

/// How to connect.
#[derive(Clone, Debug)]
pub struct TcpOptions {
    /// This host's NQN (`/etc/nvme/hostnqn` on Linux hosts); a subsystem
    /// that restricts hosts must list it.
    pub host_nqn: String,
    /// This host's identifier (`/etc/nvme/hostid`).
    pub host_id: [u8; 16],
    /// Ask for header digests.
    pub header_digest: bool,
    /// Ask for data digests.
    pub data_digest: bool,
    /// Keep Alive Timeout the controller is given; a Keep Alive goes out
    /// every half of it. `Duration::ZERO` turns keep-alive off.
    pub keep_alive: Duration,
    /// Dialling and ICResp.
    pub connect_timeout: Duration,
    /// Set-up and admin commands.
    pub admin_timeout: Duration,
    /// I/O queues to ask for.
    pub io_queues: u16,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            host_nqn: default_host_nqn(),
            host_id: default_host_id(),
            header_digest: false,
            data_digest: false,
            keep_alive: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            admin_timeout: Duration::from_secs(10),
            io_queues: 8,
        }
    }
}

/// The host NQN from `/etc/nvme/hostnqn` (what nvme-cli uses), else one
/// made of the host id.
pub fn default_host_nqn() -> String {
    std::fs::read_to_string("/etc/nvme/hostnqn")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.len() <= fabrics::NQN_MAX)
        .unwrap_or_else(|| {
            let id = default_host_id();
            format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid_text(&id))
        })
}

/// The host id from `/etc/nvme/hostid`, else from `/etc/machine-id`, else
/// zero.
pub fn default_host_id() -> [u8; 16] {
    let parse = |s: &str| -> Option<[u8; 16]> {
        let hex: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        if hex.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(id)
    };
    ["/etc/nvme/hostid", "/etc/machine-id"]
        .iter()
        .find_map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| parse(s.trim()))
        })
        .unwrap_or([0; 16])
}

fn uuid_text(id: &[u8; 16]) -> String {
    let h: Vec<String> = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

/// A subsystem on a port: where to dial, what to connect to, as whom.
#[derive(Clone, Debug)]
pub struct TcpTarget {
    /// The controller's address.
    pub addr: SocketAddr,
    /// The subsystem NQN.
    pub subnqn: String,
    pub(crate) host_nqn: String,
    pub(crate) host_id: [u8; 16],
    pub(crate) opts: TcpOptions,
}

impl TcpTarget {
    /// Resolves `host:port` (an IPv6 address in brackets) for `subnqn`.
    pub fn new(addr: &str, subnqn: &str, opts: TcpOptions) -> Result<TcpTarget, TcpError> {
        if subnqn.is_empty() || subnqn.len() > fabrics::NQN_MAX {
            return Err(TcpError::BadNqn {
                nqn: subnqn.chars().take(64).collect(),
            });
        }
        if opts.host_nqn.is_empty() || opts.host_nqn.len() > fabrics::NQN_MAX {
            return Err(TcpError::BadNqn {
                nqn: opts.host_nqn.chars().take(64).collect(),
            });
        }
        let resolved = addr
            .to_socket_addrs()
            .map_err(|e| TcpError::Resolve {
                addr: addr.to_owned(),
                source: Arc::new(e),
            })?
            .next()
            .ok_or_else(|| TcpError::Resolve {
                addr: addr.to_owned(),
                source: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no address",
                )),
            })?;
        Ok(TcpTarget {
            addr: resolved,
            subnqn: subnqn.to_owned(),
            host_nqn: opts.host_nqn.clone(),
            host_id: opts.host_id,
            opts,
        })
    }
}

impl fmt::Display for TcpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "nvme-tcp:{}/{}", self.addr, self.subnqn)
    }
}

/// What went wrong with a connection. Each names the target and queue.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TcpError {
    /// The address did not resolve.
    #[error("cannot resolve {addr:?}: give ADDR:PORT, e.g. 192.0.2.1:4420 or [fe80::1]:4420")]
    Resolve {
        /// What was given.
        addr: String,
        /// The resolver's error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// An NQN that is empty or too long.
    #[error("NQN {nqn:?} is empty or longer than 223 bytes")]
    BadNqn {
        /// The NQN (cut to 64 characters).
        nqn: String,
    },
    /// Dialling or the first exchange failed.
    #[error("{target}: cannot connect (is the target listening on that port, and reachable?)")]
    Dial {
        /// The target.
        target: String,
        /// The socket error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The controller granted other digests than asked for.
    #[error(
        "{target}: asked for digests {asked:#x}, the controller granted {granted:#x}; change the digest options to what the target allows"
    )]
    Digests {
        /// The target.
        target: String,
        /// Digest bits asked for.
        asked: u8,
        /// Digest bits granted.
        granted: u8,
    },
    /// Fabrics Connect failed.
    #[error("{target}: Connect of queue {qid} failed: {reason}")]
    Connect {
        /// The target.
        target: String,
        /// The queue.
        qid: u16,
        /// Why, in words.
        reason: String,
        /// The status the controller answered with, if it answered.
        status: Option<crate::NvmeStatus>,
    },
    /// The socket failed.
    #[error("{target}: queue {qid}: connection failed")]
    Io {
        /// The target.
        target: String,
        /// The queue.
        qid: u16,
        /// The socket error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The controller closed the connection.
    #[error("{target}: queue {qid}: the controller closed the connection")]
    Closed {
        /// The target.
        target: String,
        /// The queue.
        qid: u16,
    },
    /// The controller sent a termination request.
    #[error(
        "{target}: queue {qid}: the controller terminated the connection (fatal error status {fes:#x})"
    )]
    Terminated {
        /// The target.
        target: String,
        /// The queue.
        qid: u16,
        /// Its fatal error status.
        fes: u16,
    },
    /// A PDU that breaks the transport's rules.
    #[error("{target}: queue {qid}: bad PDU from the controller")]
    Pdu {
        /// The target.
        target: String,
        /// The queue.
        qid: u16,
        /// What was wrong.
        #[source]
        error: pdu::PduError,
    },
    /// The controller broke the protocol otherwise.
    #[error("{target}: queue {qid}: protocol error: {what}")]
    Protocol {
        /// The target.
        target: String,
        /// The queue (`u16::MAX` before the queue is known).
        qid: u16,
        /// What happened.
        what: String,
    },
    /// A command outlived its timeout (or Keep Alive went unanswered):
    /// the connection was closed so that nothing more arrives for it.
    #[error("{target}: queue {qid}: a command timed out; the connection was closed")]
    Timeout {
        /// The target.
        target: String,
        /// The queue.
        qid: u16,
    },
    /// The controller's association is gone (its admin queue failed).
    #[error("{target}: the controller association is down; reconnect the controller")]
    ControllerDown {
        /// The target.
        target: String,
    },
}

impl TcpError {
    /// Connect was answered Command Sequence Error: the controller still
    /// holds a queue of that id (Linux nvmet tears a closed connection's
    /// queue down in a work item), so a retry a little later may succeed.
    pub fn queue_still_held(&self) -> bool {
        matches!(self, TcpError::Connect { status: Some(s), .. }
            if s.same_code(crate::NvmeStatus::generic(0x0C)))
    }
}

impl From<TcpError> for crate::Error {
    fn from(e: TcpError) -> crate::Error {
        crate::Error::Tcp(Box::new(e))
    }
}
