//! `nvme-tcp:` leaves in stacks and under the copy engine, against the
//! emulated controller served over NVMe/TCP on loopback: NVMe Copy is
//! offloaded within one connected namespace, everything else bounces, and
//! the bytes always equal the reference model.

mod common;

use std::sync::Arc;

use bdev_stack::spec::LeafRegistry;
use bdev_stack::{BlockDevice, HostAllocator};
use common::{fill, model_copy, r, read_all};
use copy_engine::{CopyEngine, CopyOptions, Method};
use nvme::emu::{EmuConfig, NamespaceConfig};
use nvme::tcp::serve::{ServeConfig, TcpServer};

const BS: usize = 512;

fn server(nqn: &str) -> TcpServer {
    TcpServer::start(ServeConfig {
        subnqn: nqn.into(),
        emu: EmuConfig {
            namespaces: vec![NamespaceConfig {
                msrc: 15,
                mssrl: 128,
                mcl: 256,
                ..NamespaceConfig::memory(512, 2048)
            }],
            ..EmuConfig::default()
        },
        ..ServeConfig::default()
    })
    .expect("serve")
}

fn leaf(s: &TcpServer) -> String {
    format!("nvme-tcp:{}/{}/1", s.addr(), s.subnqn())
}

fn engine() -> CopyEngine {
    CopyEngine::new(CopyOptions {
        allocator: Arc::new(HostAllocator),
        ..CopyOptions::default()
    })
    .expect("engine")
}

#[test]
fn a_tcp_namespace_offloads_copies_within_itself_and_bounces_across_targets() {
    let (a, b) = (
        server("nqn.2026-01.io.ustor:a"),
        server("nqn.2026-01.io.ustor:b"),
    );
    let registry = LeafRegistry::with_defaults();
    let one: Arc<dyn BlockDevice> = registry.build(&leaf(&a)).expect("leaf");
    assert!(!one.info().needs_iova, "host memory serves NVMe/TCP");
    assert_eq!(one.info().block_count, 2048);
    assert!(!one.info().copy_offloads.is_empty(), "Copy advertised");
    let mut reference = fill(&one, 1);
    let report = engine()
        .copy(&one, &[r(0, 300)], &one, &[r(1000, 300)])
        .expect("copy");
    assert!(report.is_complete(), "{report}");
    assert_eq!(
        report.method(Method::NvmeCopy).bytes,
        300 * BS as u64,
        "{report}"
    );
    assert_eq!(report.method(Method::Bounce).bytes, 0, "{report}");
    model_copy(&mut reference, BS, &[r(0, 300)], &[r(1000, 300)]);
    assert!(read_all(&one) == reference, "bytes differ from the model");

    // A stripe over both targets: pieces that stay on one target are
    // offloaded there, the others bounce.
    let stripe = registry
        .build(&format!("stripe(chunk=64, {}, {})", leaf(&a), leaf(&b)))
        .expect("stripe");
    let mut reference = fill(&stripe, 2);
    let (src, dst) = ([r(0, 256)], [r(1024, 256)]);
    let report = engine().copy(&stripe, &src, &stripe, &dst).expect("copy");
    assert!(report.is_complete(), "{report}");
    assert!(report.method(Method::NvmeCopy).bytes > 0, "{report}");
    model_copy(&mut reference, BS, &src, &dst);
    assert!(read_all(&stripe) == reference, "stripe bytes differ");
    let (src, dst) = ([r(0, 64)], [r(64, 64)]);
    let report = engine().copy(&stripe, &src, &stripe, &dst).expect("copy");
    assert_eq!(report.method(Method::NvmeCopy).bytes, 0, "{report}");
    assert_eq!(
        report.method(Method::Bounce).bytes,
        64 * BS as u64,
        "{report}"
    );
    model_copy(&mut reference, BS, &src, &dst);
    assert!(read_all(&stripe) == reference, "stripe bytes differ");
}

#[test]
fn leaves_of_one_target_share_its_controller_and_bad_specs_say_why() {
    let a = server("nqn.2026-01.io.ustor:a");
    let registry = LeafRegistry::with_defaults();
    let x = registry.build(&leaf(&a)).expect("leaf");
    let y = registry.build(&leaf(&a)).expect("leaf");
    // One association: both leaves see one backing namespace.
    assert_eq!(x.backing(), y.backing());
    let e = match registry.build(&format!("nvme-tcp:{}", a.addr())) {
        Ok(_) => panic!("a bare address is no leaf"),
        Err(e) => bdev_stack::error_chain(&e),
    };
    assert!(
        e.contains(&format!(
            "nvme-tcp:127.0.0.1:{}/nqn.2026-01.io.ustor:a/NSID",
            a.addr().port()
        )),
        "{e}"
    );
    let e = match registry.build(&format!("nvme-tcp:{}/nqn.2026-01.io.ustor:a/2", a.addr())) {
        Ok(_) => panic!("no namespace 2"),
        Err(e) => bdev_stack::error_chain(&e),
    };
    assert!(e.contains("no active namespace 2"), "{e}");
    let e = match registry.build("nvme-tcp:127.0.0.1:1/nqn.x/1") {
        Ok(_) => panic!("nothing listens"),
        Err(e) => bdev_stack::error_chain(&e),
    };
    assert!(e.contains("cannot connect") && e.contains("refused"), "{e}");
    let e = match registry.build(&format!("{},bogus=1", leaf(&a))) {
        Ok(_) => panic!("bad option"),
        Err(e) => bdev_stack::error_chain(&e),
    };
    assert!(e.contains("hdgst=on|off"), "{e}");
}
