//! `ustor-stack` end to end on file members: create, show, a corrupted
//! leg found by check and made equal by check --repair, an unclean stop
//! assembled and resynced, and errors printed with their causes.

use std::path::PathBuf;
use std::process::{Command, Output};

fn stack(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ustor-stack"))
        .args(args)
        .output()
        .expect("ustor-stack runs")
}

fn ok(args: &[&str]) -> String {
    let out = stack(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("ustor-stack-cli-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("dir");
    d
}

#[test]
fn create_show_check_repair_and_errors() {
    let d = dir();
    let (a, b) = (d.join("a"), d.join("b"));
    let spec = |p: &PathBuf, size: bool| {
        format!("file:{}{}", p.display(), if size { ",size=8m" } else { "" })
    };
    ok(&[
        "create",
        "--region",
        "64k",
        &spec(&a, true),
        &spec(&b, true),
    ]);
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["show", "--json", &spec(&b, false), &spec(&a, false)]))
            .expect("json");
    assert_eq!(json["clean"], true);
    assert_eq!(json["members"].as_array().map(Vec::len), Some(2));
    assert_eq!(json["dirty_regions"].as_array().map(Vec::len), Some(0));

    // One leg's data goes bad behind the mirror's back.
    let mut bytes = std::fs::read(&b).expect("read leg");
    bytes[3 << 20] ^= 0xff;
    std::fs::write(&b, bytes).expect("corrupt leg");
    let found: serde_json::Value = serde_json::from_str(&ok(&[
        "check",
        "--json",
        &spec(&a, false),
        &spec(&b, false),
    ]))
    .expect("json");
    assert_eq!(
        found["mismatched"].as_array().map(Vec::len),
        Some(1),
        "{found}"
    );
    ok(&["check", "--repair", &spec(&a, false), &spec(&b, false)]);
    let again: serde_json::Value = serde_json::from_str(&ok(&[
        "check",
        "--json",
        &spec(&a, false),
        &spec(&b, false),
    ]))
    .expect("json");
    assert_eq!(again["mismatched"].as_array().map(Vec::len), Some(0));

    // Errors carry their causes.
    let missing = stack(&[
        "show",
        &spec(&a, false),
        &format!("file:{}", d.join("nope").display()),
    ]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(err.contains("No such file or directory"), "{err}");
    let stranger = d.join("c");
    std::fs::write(&stranger, vec![0u8; 8 << 20]).expect("stranger");
    let refused = stack(&["show", &spec(&a, false), &spec(&stranger, false)]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("no mirror superblock"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn stripes_and_concats_are_created_shown_and_refused_where_they_have_no_copy() {
    let d = std::env::temp_dir().join(format!("ustor-stack-plain-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("dir");
    let files: Vec<PathBuf> = ["s0", "s1", "s2"].iter().map(|n| d.join(n)).collect();
    let sized: Vec<String> = files
        .iter()
        .map(|p| format!("file:{},size=4m", p.display()))
        .collect();
    let plain: Vec<String> = files
        .iter()
        .map(|p| format!("file:{}", p.display()))
        .collect();
    let mut args = vec!["create", "--level", "stripe", "--chunk", "128k"];
    args.extend(sized.iter().map(String::as_str));
    let created = ok(&args);
    assert!(created.contains("created a stripe"), "{created}");

    // Any order finds the same stripe.
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&["show", "--json", &plain[2], &plain[0], &plain[1]]))
            .expect("json");
    assert_eq!(shown["level"], "stripe");
    assert_eq!(shown["chunk_blocks"], 256, "{shown}");
    let blocks = shown["blocks"].as_u64().expect("blocks");
    assert!(
        blocks > 0 && blocks < 3 * 8192 && blocks.is_multiple_of(3 * 256),
        "{shown}"
    );

    // A stripe without one of its members has no copy of those blocks.
    let partial = stack(&["show", &plain[0], &plain[1]]);
    assert!(!partial.status.success());
    let err = String::from_utf8_lossy(&partial.stderr);
    assert!(err.contains("member 2 is missing"), "{err}");
    // Mirror-only commands name what is wrong.
    let check = stack(&["check", &plain[0], &plain[1], &plain[2]]);
    assert!(!check.status.success());
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains("not a mirror"), "{err}");
    // A bad chunk is refused before anything is written.
    let bad = stack(&[
        "create", "--level", "stripe", "--chunk", "1000", &sized[0], &sized[1],
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("--chunk 1000"), "{err}");
    std::fs::remove_dir_all(&d).ok();
}

#[test]
fn discover_lists_an_nvme_tcp_targets_subsystems_as_leaf_specs() {
    let server = nvme::tcp::serve::TcpServer::start(nvme::tcp::serve::ServeConfig::default())
        .expect("serve");
    let target = format!("nvme-tcp:{}", server.addr());
    let out = stack(&["discover", &target]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "nvme-tcp:{}/{}/NSID",
            server.addr(),
            server.subnqn()
        )),
        "{text}"
    );
    let out = stack(&["discover", "--json", &target]);
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(j["records"][0]["subnqn"], server.subnqn());
    // Nothing listens: the whole cause chain, with the OS error.
    let out = stack(&["discover", "nvme-tcp:127.0.0.1:1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("refused"),
        "{err}"
    );
    let out = stack(&["discover", "127.0.0.1:4420"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nvme-tcp:ADDR:PORT"));
}
