//! `ustor-perf` refuses absurd input with a message, never a panic.

use std::process::Command;

fn perf(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ustor-perf"))
        .args(args)
        .output()
        .expect("ustor-perf runs")
}

#[test]
fn absurd_durations_are_refused_with_a_message() {
    for time in ["1e30", "-1", "0", "NaN", "inf"] {
        let out = perf(&[&format!("--time={time}")]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "-t {time}: {err}");
        assert!(
            err.contains("--time") && err.contains("positive number of seconds"),
            "-t {time}: {err}"
        );
        assert!(!err.contains("panicked"), "-t {time}: {err}");
    }
}

#[test]
fn devices_of_absurd_declared_size_run_or_are_refused_never_abort() {
    // Storage is allocated as it is written: a 4000 TiB device of any
    // emulated kind runs; the run writes and reads only what it touches.
    for target in ["mem:4000t", "sgemu:4000t", "emu:4000t"] {
        let out = perf(&[
            "--target",
            target,
            "-w",
            "randwrite",
            "-t",
            "0.2",
            "-q",
            "4",
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{target}: {err}");
        assert!(text.contains("errors 0"), "{target}: {text}");
    }
    // Past what 64 bits of bytes hold: a typed error naming the size.
    for target in ["mem:20000000t", "sgemu:20000000t", "emu:20000000t"] {
        let out = perf(&["--target", target, "-t", "0.2"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{target}: {err}");
        assert!(err.contains("20000000t"), "{target}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("memory allocation"),
            "{target}: {err}"
        );
    }
}

#[test]
fn a_bad_target_is_judged_by_the_spec_parser() {
    let out = perf(&["--target", "nvme0", "-t", "0.2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nvme0") && err.contains("column"), "{err}");
}

#[test]
fn an_unopenable_controller_prints_the_whole_cause_chain() {
    let out = perf(&["--target", "nvme:0000:ff:1f.7/1", "-t", "0.2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("0000:ff:1f.7"), "names the controller: {err}");
    if !std::path::Path::new("/dev/vfio/vfio").exists() {
        // The OS error and what to do, not just the outer message.
        assert!(
            err.contains("caused by: No such file or directory"),
            "{err}"
        );
        assert!(err.contains("modprobe vfio-pci"), "{err}");
        assert!(
            err.contains("echo vfio-pci > /sys/bus/pci/devices/0000:ff:1f.7/driver_override"),
            "{err}"
        );
    }
}
