//! The spec builder: shapes it builds, errors with the column they concern,
//! reserved leaf kinds, and factories registered for them.

mod common;

use std::sync::Arc;

use bdev_stack::spec::{self, LeafError, LeafFactory, LeafRegistry, LeafSpec, SpecErrorKind};
use bdev_stack::{BlockDevice, DeviceKind, MemDevice};
use common::{SyncIo, pattern};

fn column_of(spec: &str) -> (usize, SpecErrorKind) {
    match spec::build(spec) {
        Ok(_) => panic!("`{spec}` built"),
        Err(e) => {
            // The rendered message carries a caret under that column.
            let text = e.to_string();
            assert!(text.contains(spec), "{text}");
            (e.column, e.kind)
        }
    }
}

#[test]
fn builds_the_issue_example_shape_and_it_works() {
    let path = std::env::temp_dir().join(format!("bdev-spec-{}.img", std::process::id()));
    let text = format!(
        "mirror(stripe(chunk=128k, mem:8m, mem:8m), concat(file:{},size=4m, mem:12m,bs=512))",
        path.display()
    );
    let device = spec::build(&text).expect("build");
    let info = device.info();
    assert_eq!(info.kind, DeviceKind::Mirror);
    assert_eq!(info.block_size, 512);
    assert_eq!(info.block_count, 16 * 2048);
    let members = device.members();
    assert_eq!(members[0].info().kind, DeviceKind::Stripe);
    assert_eq!(members[0].info().optimal_boundary_blocks, 256);
    assert_eq!(members[1].info().kind, DeviceKind::Concat);
    assert_eq!(members[1].members()[0].info().kind, DeviceKind::File);

    let mut io = SyncIo::open(device.as_ref());
    let data = pattern(1, 4096 * 512);
    io.write(6000, &data)
        .expect("write across the file/mem boundary");
    assert_eq!(io.read(6000, 4096).expect("read"), data);
    drop(io);
    drop(members);
    drop(device);
    std::fs::remove_file(&path).expect("remove the image");
}

#[test]
fn errors_point_at_the_column() {
    let cases: &[(&str, usize)] = &[
        ("", 1),
        ("mem", 4),
        ("mem:", 5),
        ("mem:64x", 5),
        ("concat(mem:1m mem:1m)", 15),
        ("concat(mem:1m,", 15),
        ("raid5(mem:1m, mem:1m)", 1),
        ("stripe(mem:1m, mem:1m)", 1),
        ("stripe(chunk=3x, mem:1m, mem:1m)", 8),
        ("stripe(size=4k, mem:1m, mem:1m)", 8),
        ("stripe(chunk=4096, mem:1m, mem:1m)", 8),
        ("mirror(mem:1m,bogus=1, mem:1m)", 15),
        ("mem:1m)", 7),
        ("concat(mem:1m, disk:/dev/sda)", 16),
    ];
    for &(text, column) in cases {
        let (got, kind) = column_of(text);
        assert_eq!(got, column, "`{text}`: {kind}");
    }
}

#[test]
fn block_size_mismatch_names_the_member_and_points_at_it() {
    let (column, kind) = column_of("concat(mem:1m, mem:1m,bs=4096)");
    assert_eq!(column, 16);
    let SpecErrorKind::Device(error) = kind else {
        panic!("wrong kind: {kind}");
    };
    let text = error.to_string();
    assert!(text.contains("4096") && text.contains("512"), "{text}");
}

#[test]
fn nvme_and_emu_leaf_kinds_reach_their_factories() {
    // No controller at this address on a host without VFIO: the driver's
    // typed error, at the leaf.
    let (got, error) = column_of("nvme:0000:00:04.0/1");
    assert_eq!(got, 1);
    assert!(
        matches!(
            &error,
            SpecErrorKind::Device(bdev_stack::BdevError::Nvme { .. })
        ),
        "{error}"
    );
    // The emulated leaf's body is a size: pointed at.
    let (got, error) = column_of("stripe(chunk=8, emu:nvme0/1, mem:1m)");
    assert_eq!(got, 21);
    assert!(matches!(&error, SpecErrorKind::BadValue { .. }), "{error}");
}

/// Stands in for the NVMe driver: serves `nvme:` leaves from memory, and
/// reports the body and options it was given.
struct FakeNvme;

impl LeafFactory for FakeNvme {
    fn open(&self, spec: &LeafSpec<'_>) -> Result<Arc<dyn BlockDevice>, LeafError> {
        let Some((_pci, nsid)) = spec.body.rsplit_once('/') else {
            return Err(LeafError::BadBody("expected PCI/NSID".into()));
        };
        let nsid: u32 = nsid
            .parse()
            .map_err(|_| LeafError::BadBody(format!("bad nsid `{nsid}`")))?;
        if let Some(option) = spec.options.first() {
            return Err(LeafError::BadOption {
                key: option.key.to_string(),
                reason: "no options".into(),
            });
        }
        Ok(Arc::new(MemDevice::new(
            u64::from(nsid) << 20,
            512,
            1 << 17,
        )?))
    }
}

#[test]
fn a_registered_factory_serves_a_reserved_kind_without_parser_changes() {
    let mut registry = LeafRegistry::with_defaults();
    registry.register("nvme", Arc::new(FakeNvme));
    let device = registry
        .build("stripe(chunk=64k, nvme:0000:00:04.0/1, nvme:0000:00:05.0/1)")
        .expect("build");
    assert_eq!(device.info().block_count, 2 * 2048);

    let error = registry
        .build("concat(nvme:0000:00:04.0/x)")
        .expect_err("bad body");
    assert_eq!(error.column, 13);
    let error = registry
        .build("concat(nvme:0000:00:04.0/1,queue=4)")
        .expect_err("bad option");
    assert_eq!(error.column, 28);
}

#[test]
fn deep_nesting_is_refused_not_a_stack_overflow() {
    let nested = |depth: usize| format!("{}mem:1m{}", "concat(".repeat(depth), ")".repeat(depth));
    // Real stacks nest a few levels: fine.
    let dev = spec::build(&nested(8)).expect("eight levels");
    assert_eq!(dev.info().block_count, 2048);
    assert!(spec::build(&nested(spec::MAX_SPEC_DEPTH)).is_ok());
    // A hostile or mistaken spec: a typed error at the level past the limit.
    for depth in [spec::MAX_SPEC_DEPTH + 1, 100_000] {
        let (column, kind) = column_of(&nested(depth));
        assert!(
            matches!(kind, SpecErrorKind::TooDeep(spec::MAX_SPEC_DEPTH)),
            "{depth}: {kind:?}"
        );
        assert_eq!(column, spec::MAX_SPEC_DEPTH * "concat(".len() + 1);
    }
}

#[test]
fn backing_files_are_never_created_through_a_planted_link() {
    let dir = std::env::temp_dir().join(format!("bdev-spec-links-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let victim = dir.join("victim");
    std::fs::write(&victim, b"precious").expect("victim");
    let planted = dir.join("planted");
    std::os::unix::fs::symlink(&victim, &planted).expect("link");
    for text in [
        format!("file:{},size=1m", planted.display()),
        format!("emu:1m,file={}", planted.display()),
    ] {
        let error = spec::build(&text).map(|_| ()).expect_err(&text);
        let chain = bdev_stack::error_chain(&error);
        assert!(
            chain.contains("is a symbolic link") && chain.contains("name the file itself"),
            "{text}: {chain}"
        );
    }
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious");
    // A file the leaf creates is its owner's alone.
    let fresh = dir.join("fresh");
    spec::build(&format!("file:{},size=1m", fresh.display())).expect("create");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&fresh)
        .expect("fresh")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    // An existing device is opened through a link when nothing is created.
    let link = dir.join("by-id");
    std::os::unix::fs::symlink(&fresh, &link).expect("link");
    let dev = spec::build(&format!("file:{}", link.display())).expect("through a link");
    assert_eq!(dev.info().block_count, 2048);
    std::fs::remove_dir_all(&dir).expect("cleanup");
}

#[test]
fn an_emulated_namespace_over_a_longer_file_leaves_the_rest_alone() {
    let path = std::env::temp_dir().join(format!("bdev-spec-long-{}.img", std::process::id()));
    std::fs::write(&path, vec![0x5a; 2 << 20]).expect("file");
    let dev = spec::build(&format!("emu:1m,file={}", path.display())).expect("emu over file");
    assert_eq!(
        dev.info().block_count * u64::from(dev.info().block_size),
        1 << 20
    );
    drop(dev);
    let bytes = std::fs::read(&path).expect("file");
    assert_eq!(bytes.len(), 2 << 20, "not truncated to the namespace");
    assert!(bytes.iter().all(|&b| b == 0x5a));
    std::fs::remove_file(&path).expect("cleanup");
}
