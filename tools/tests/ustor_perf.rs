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
