//! `ustor-guest`: the guest runner and tests (see the crate docs).

use std::process::ExitCode;
use ustor_guest::{runner, suite};

fn usage() -> ExitCode {
    eprintln!("usage: ustor-guest list | run | exec TEST");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ok = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["list"] => {
            for t in suite::all() {
                let kind = format!("{:?}", t.kind).to_lowercase();
                println!("{} {kind} {} {}", t.name, t.topology, t.timeout.as_secs());
            }
            true
        }
        ["run"] => runner::run(),
        ["exec", name] => runner::exec(name),
        _ => return usage(),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
