//! Test driver of `moe launch`'s mpirun wrapper (launch/src/launch_cmd.rs, compiled in here
//! so it can be tested before and independently of the `moe` CLI). It is both the launcher
//! and the program of every rank, as `moe` is:
//!
//!   launch_probe launch --np N [--hostfile H] -- <rank args>   run_launch, exit with its code
//!   launch_probe rank-exit <fail rank> <code>    print to stdout/stderr, exit <code> on one rank
//!   launch_probe rank-sleep                      print pid, sleep 120 s (signal forwarding)
//!   launch_probe exec <program> [args]           exec another program on every rank

#[path = "../../../launch/src/launch_cmd.rs"]
mod launch_cmd;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::ExitCode;

fn rank() -> i64 {
    std::env::var("OMPI_COMM_WORLD_RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(-1)
}

fn code(c: i32) -> ExitCode {
    ExitCode::from(u8::try_from(c).unwrap_or(255))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("usage: launch_probe launch|rank-exit|rank-sleep|exec ...");
        return ExitCode::from(2);
    };
    match cmd.as_str() {
        "launch" => launch(rest),
        "rank-exit" => {
            let fail: i64 = rest.first().and_then(|s| s.parse().ok()).unwrap_or(-1);
            let c: i32 = rest.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
            let r = rank();
            println!("hello from stdout");
            eprintln!("hello from stderr");
            if r == fail {
                code(c)
            } else {
                ExitCode::SUCCESS
            }
        }
        "rank-sleep" => {
            println!("sleeping pid={}", std::process::id());
            std::thread::sleep(std::time::Duration::from_secs(120));
            println!("woke up");
            ExitCode::SUCCESS
        }
        "exec" => match rest.split_first() {
            Some((prog, a)) => {
                let err = std::process::Command::new(prog).args(a).exec();
                eprintln!("launch_probe: exec {prog}: {err}");
                ExitCode::from(127)
            }
            None => ExitCode::from(2),
        },
        other => {
            eprintln!("launch_probe: unknown command {other}");
            ExitCode::from(2)
        }
    }
}

fn launch(args: &[String]) -> ExitCode {
    let (mut np, mut hostfile, mut i) = (1usize, None::<PathBuf>, 0);
    while i < args.len() {
        match args[i].as_str() {
            "--np" => np = args.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(0),
            "--hostfile" => hostfile = args.get(i + 1).map(PathBuf::from),
            "--" => break,
            other => {
                eprintln!("launch_probe launch: unknown flag {other}");
                return ExitCode::from(2);
            }
        }
        i += 2;
    }
    let rank_args = args.get(i + 1..).unwrap_or_default();
    match launch_cmd::run_launch(np, hostfile.as_deref(), rank_args) {
        Ok(c) => code(c),
        Err(e) => {
            eprintln!("launch_probe: error: {e:#}");
            ExitCode::from(3)
        }
    }
}
