//! Runs a child process under a deadline, handing each line it prints (on
//! stdout or stderr) to a callback as it comes. Both sides of the rig use
//! it: the guest runner for each test, the host for QEMU itself.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How a supervised child ended.
#[derive(Debug)]
pub enum Ended {
    /// It exited by itself.
    Exited(ExitStatus),
    /// It was still running at the deadline and was killed.
    Killed,
}

enum Line {
    Text(String),
    Eof,
}

/// Forwards `stream` line by line; bytes that are not UTF-8 (firmware
/// output, a test printing binary) are replaced, never a reason to stop
/// reading, since a reader that stops would leave the child blocked on a
/// full pipe.
fn forward(stream: impl Read + Send + 'static, tx: mpsc::Sender<Line>) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_string();
            if tx.send(Line::Text(line)).is_err() {
                return;
            }
            buf.clear();
        }
        let _ = tx.send(Line::Eof);
    });
}

/// Supervises `child` (spawned with piped stdout and stderr) until it exits
/// or `timeout` passes, calling `on_line` for every line it prints.
pub fn supervise(
    mut child: Child,
    timeout: Duration,
    mut on_line: impl FnMut(String),
) -> std::io::Result<Ended> {
    let deadline = Instant::now() + timeout;
    let (tx, rx) = mpsc::channel();
    let mut open = 0;
    if let Some(out) = child.stdout.take() {
        forward(out, tx.clone());
        open += 1;
    }
    if let Some(err) = child.stderr.take() {
        forward(err, tx.clone());
        open += 1;
    }
    drop(tx);
    loop {
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(Ended::Killed);
        }
        if open == 0 {
            match child.try_wait()? {
                Some(status) => return Ok(Ended::Exited(status)),
                None => {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            }
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(50))) {
            Ok(Line::Text(line)) => on_line(line),
            Ok(Line::Eof) => open -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => open = 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sh(script: &str) -> Child {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn lines_from_both_streams_arrive_and_the_status_is_kept() {
        let mut lines = Vec::new();
        let ended = supervise(
            sh("echo one; echo two >&2; printf 'bad \\377 byte\\n'; exit 3"),
            Duration::from_secs(30),
            |l| lines.push(l),
        )
        .unwrap();
        lines.sort();
        assert_eq!(lines, ["bad \u{fffd} byte", "one", "two"]);
        assert!(matches!(ended, Ended::Exited(s) if s.code() == Some(3)));
    }

    #[test]
    fn a_child_past_its_deadline_is_killed() {
        let started = Instant::now();
        let ended = supervise(
            sh("echo started; exec sleep 30"),
            Duration::from_millis(300),
            |_| {},
        )
        .unwrap();
        assert!(matches!(ended, Ended::Killed));
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
