//! `moe bench`: measurements, not tests. Each bench runs its variants side by side in one
//! process (interleaved iteration by iteration, so the noise of a shared 2-core machine hits
//! every variant alike), reports medians, and can append its tables to a Markdown file
//! together with the machine, the command line and the date (`--markdown BENCHMARKS.md`).

mod a2a;
mod eager;
mod generate;
mod layer;
mod report;
pub(crate) use report::date_utc;
mod train;

use crate::cli::{BenchArgs, BenchKind};

/// Runs `moe bench <what>`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = match args.what {
        BenchKind::Layer => match &args.memory_child {
            Some(variant) => return layer::memory_child(&args, variant),
            None => layer::run(&args)?,
        },
        BenchKind::A2a => match a2a::run(&args)? {
            Some(r) => r,
            // Ranks other than 0 of an MPI run report nothing.
            None => return Ok(()),
        },
        BenchKind::Train => train::run(&args)?,
        BenchKind::Generate => generate::run(&args)?,
    };
    report.emit(args.json, args.markdown.as_deref())
}

/// Median of `xs` (the mean of the two middle values for an even count); NaN when empty.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// A `kB` field of `/proc/self/status` (`VmHWM`: peak resident set, `VmRSS`: current), in MiB.
pub fn proc_status_mib(field: &str) -> Option<f64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map(|kib| kib / 1024.0)
}

/// Peak resident set of the waited-for children of this process (`getrusage`), in MiB.
pub fn children_max_rss_mib() -> Option<f64> {
    // SAFETY: getrusage only writes the struct we pass; a zeroed rusage is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN is a valid `who`, `ru` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    (rc == 0).then(|| ru.ru_maxrss as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_nan() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[f64::NAN, 5.0]), 5.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn reads_own_peak_rss() {
        // RSS first: the high-water mark read afterwards covers every earlier RSS, even while
        // other test threads allocate in between.
        let rss = proc_status_mib("VmRSS").unwrap();
        let hwm = proc_status_mib("VmHWM").unwrap();
        assert!(hwm > 0.0 && hwm >= rss * 0.999, "VmHWM {hwm} VmRSS {rss}");
    }
}
