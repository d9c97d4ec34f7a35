//! The `ng:` leaf's refusals on a host without NVMe: each names the node
//! and says what to do. (The leaf itself runs in the VM tests, on a QEMU
//! controller the kernel keeps.)

use bdev_stack::spec;

fn refusal(text: &str) -> String {
    match spec::build(text) {
        Ok(_) => panic!("`{text}` opened"),
        Err(e) => bdev_stack::error_chain(&e),
    }
}

#[test]
fn a_missing_node_names_itself_and_how_to_find_the_right_one() {
    let text = refusal("ng:/dev/ng-missing-node");
    assert!(text.contains("ng:/dev/ng-missing-node"), "{text}");
    assert!(
        text.contains("no such node") && text.contains("nvme list -v"),
        "{text}"
    );
    assert!(text.contains("No such file or directory"), "{text}");
}

#[test]
fn not_a_generic_character_device_is_refused() {
    let file = std::env::temp_dir().join(format!("ng-not-a-node-{}", std::process::id()));
    std::fs::write(&file, [0u8; 4096]).expect("scratch file");
    let text = refusal(&format!("ng:{}", file.display()));
    assert!(text.contains("not a character device"), "{text}");
    std::fs::remove_file(&file).expect("cleanup");
    // A character device that is not NVMe: the kernel answers ENOTTY.
    let text = refusal("ng:/dev/null");
    assert!(
        text.contains("not an NVMe generic character device"),
        "{text}"
    );
}

#[test]
fn options_are_checked() {
    let error = spec::build("ng:/dev/ng0n1,poll=maybe")
        .map(|_| ())
        .expect_err("bad poll");
    assert_eq!(error.column, 15);
    let error = spec::build("ng:/dev/ng0n1,depth=4")
        .map(|_| ())
        .expect_err("unknown");
    assert!(
        error
            .to_string()
            .contains("ng: takes poll=on|off and registered=on|off"),
        "{error}"
    );
}
