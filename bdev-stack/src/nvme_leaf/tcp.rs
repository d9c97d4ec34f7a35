//! The `nvme-tcp:` leaf factory: `nvme-tcp:ADDR:PORT/SUBNQN/NSID` opens a
//! namespace of a subsystem reached over NVMe/TCP. Leaves of one target
//! (address and subsystem) in one registry share its controller: one
//! association, one admin queue and Keep Alive, a connection per channel.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use nvme::tcp::{TcpController, TcpOptions, TcpTarget, discover};

use super::namespace::TcpNamespace;
use crate::device::BlockDevice;
use crate::error::BdevError;
use crate::spec::{LeafError, LeafFactory, LeafSpec};

/// Opens `nvme-tcp:ADDR:PORT/SUBNQN/NSID[,hdgst=on][,ddgst=on][,hostnqn=NQN]`
/// leaves.
#[derive(Default)]
pub(crate) struct TcpFactory {
    controllers: Mutex<HashMap<(std::net::SocketAddr, String), Weak<TcpController>>>,
}

/// The body of an `nvme-tcp:` leaf.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct TcpBody<'a> {
    pub(crate) addr: &'a str,
    pub(crate) subnqn: Option<&'a str>,
    pub(crate) nsid: Option<u32>,
}

/// Splits `ADDR:PORT[/SUBNQN/NSID]` (an IPv6 address in brackets).
pub(crate) fn parse_body(body: &str) -> Result<TcpBody<'_>, LeafError> {
    let (addr, rest) = match body.split_once('/') {
        Some((a, r)) => (a, Some(r)),
        None => (body, None),
    };
    if addr
        .rsplit_once(':')
        .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
    {
        return Err(LeafError::BadBody(format!(
            "`{addr}`: expected ADDR:PORT, e.g. 192.0.2.1:4420 or [fe80::1]:4420"
        )));
    }
    let Some(rest) = rest else {
        return Ok(TcpBody {
            addr,
            subnqn: None,
            nsid: None,
        });
    };
    let Some((subnqn, nsid)) = rest.rsplit_once('/') else {
        return Err(LeafError::BadBody(format!(
            "`{body}`: expected ADDR:PORT/SUBNQN/NSID"
        )));
    };
    let nsid = match nsid.parse::<u32>() {
        Ok(n) if n > 0 && n != u32::MAX => n,
        _ => {
            return Err(LeafError::BadBody(format!(
                "`{nsid}` is not a namespace id (1 to 0xfffffffe)"
            )));
        }
    };
    if subnqn.is_empty() {
        return Err(LeafError::BadBody("the subsystem NQN is empty".into()));
    }
    Ok(TcpBody {
        addr,
        subnqn: Some(subnqn),
        nsid: Some(nsid),
    })
}

fn on_off(key: &str, value: &str) -> Result<bool, LeafError> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        other => Err(LeafError::BadOption {
            key: key.to_string(),
            reason: format!("`{other}`: on or off"),
        }),
    }
}

impl TcpFactory {
    fn controller(&self, target: TcpTarget) -> Result<Arc<TcpController>, BdevError> {
        let key = (target.addr, target.subnqn.clone());
        let mut map = self
            .controllers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = map.get(&key).and_then(Weak::upgrade)
            && !c.is_down()
        {
            return Ok(c);
        }
        let name = target.to_string();
        let ctrl =
            TcpController::connect_to(Arc::new(target)).map_err(|source| BdevError::Nvme {
                device: name,
                action: "connect to the NVMe/TCP controller",
                source: Box::new(source),
            })?;
        let ctrl = Arc::new(ctrl);
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(key, Arc::downgrade(&ctrl));
        Ok(ctrl)
    }
}

impl LeafFactory for TcpFactory {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        let mut opts = TcpOptions::default();
        for o in spec.options {
            match o.key {
                "hdgst" => opts.header_digest = on_off(o.key, o.value)?,
                "ddgst" => opts.data_digest = on_off(o.key, o.value)?,
                "hostnqn" => opts.host_nqn = o.value.to_string(),
                key => {
                    return Err(LeafError::BadOption {
                        key: key.to_string(),
                        reason: "nvme-tcp: takes hdgst=on|off, ddgst=on|off and hostnqn=NQN".into(),
                    });
                }
            }
        }
        let body = parse_body(spec.body)?;
        let (Some(subnqn), Some(nsid)) = (body.subnqn, body.nsid) else {
            // A bare address: say what the target offers.
            let offered = match discover(body.addr, opts) {
                Ok(entries) => entries
                    .iter()
                    .filter(|e| e.subtype == 2)
                    .map(|e| format!("nvme-tcp:{}:{}/{}/NSID", e.traddr, e.trsvcid, e.subnqn))
                    .collect::<Vec<_>>()
                    .join(", "),
                Err(e) => format!("discovery failed: {}", crate::error_chain(&e)),
            };
            return Err(LeafError::BadBody(format!(
                "`{}` names no subsystem and namespace: expected ADDR:PORT/SUBNQN/NSID; the target offers: {}",
                spec.body,
                if offered.is_empty() {
                    "nothing"
                } else {
                    &offered
                }
            )));
        };
        let target = TcpTarget::new(body.addr, subnqn, opts).map_err(|e| {
            LeafError::Device(BdevError::Nvme {
                device: format!("nvme-tcp:{}", spec.body),
                action: "resolve the target",
                source: Box::new(e.into()),
            })
        })?;
        let ctrl = self.controller(target)?;
        Ok(Arc::new(TcpNamespace::new(ctrl, nsid)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_split_into_address_subsystem_and_namespace() {
        let b = parse_body("127.0.0.1:4420/nqn.2014-08.org.nvmexpress:uuid:1234/3").expect("ok");
        assert_eq!(b.addr, "127.0.0.1:4420");
        assert_eq!(b.subnqn, Some("nqn.2014-08.org.nvmexpress:uuid:1234"));
        assert_eq!(b.nsid, Some(3));
        let b = parse_body("[fe80::1]:4420").expect("ok");
        assert_eq!((b.addr, b.subnqn, b.nsid), ("[fe80::1]:4420", None, None));
        for bad in [
            "127.0.0.1",
            "host:port/x/1",
            "127.0.0.1:4420/nqn",
            "1.2.3.4:1/n/0",
            ":4420/n/1",
        ] {
            assert!(parse_body(bad).is_err(), "{bad}");
        }
    }
}
