//! Bench output: Markdown tables with the machine, the command line and the date, printed
//! to stdout and optionally appended to a file; or one JSON object.

use anyhow::Context;
use std::io::Write;
use std::path::Path;

/// One table: a title, a header row and rows of cells (already formatted).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn markdown(&self) -> String {
        let mut s = format!("**{}**\n\n| {} |\n|", self.title, self.header.join(" | "));
        for _ in &self.header {
            s.push_str("---|");
        }
        s.push('\n');
        for r in &self.rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        s
    }
}

/// The results of one bench invocation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub title: String,
    pub command: String,
    pub date_utc: String,
    pub machine: String,
    pub tables: Vec<Table>,
    /// Target checks and caveats, one line each.
    pub notes: Vec<String>,
}

impl Report {
    /// A report for the current process's command line, machine and time.
    pub fn new(title: &str) -> Self {
        Self {
            title: title.into(),
            command: command_line(),
            date_utc: date_utc(),
            machine: machine(),
            tables: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "### {}\n\n- command: `{}`\n- date: {} (UTC)\n- machine: {}\n\n",
            self.title, self.command, self.date_utc, self.machine
        );
        for t in &self.tables {
            s.push_str(&t.markdown());
            s.push('\n');
        }
        for n in &self.notes {
            s.push_str(&format!("- {n}\n"));
        }
        s
    }

    /// Prints the report (Markdown or JSON) and appends the Markdown to `file` if given.
    pub fn emit(&self, json: bool, file: Option<&Path>) -> anyhow::Result<()> {
        if json {
            println!("{}", serde_json::to_string_pretty(self)?);
        } else {
            println!("{}", self.markdown());
        }
        if let Some(path) = file {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening {}", path.display()))?;
            writeln!(f, "{}", self.markdown())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

fn command_line() -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.first_mut() {
        // The binary as a user runs it from the repository root.
        if first.ends_with("/moe") {
            *first = "target/release/moe".into();
        }
    }
    if let Ok(np) = std::env::var("OMPI_COMM_WORLD_SIZE") {
        format!(
            "mpirun --allow-run-as-root --oversubscribe -np {np} {}",
            args.join(" ")
        )
    } else {
        args.join(" ")
    }
}

/// CPU model, core count, memory, load average and torch's version/thread count.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kib| kib / (1024.0 * 1024.0))
        .unwrap_or(0.0);
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB RAM, libtorch CPU (float32); load average at start: {}",
        load_average()
    )
}

/// The 1/5/15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Now, `YYYY-MM-DD HH:MM`, from the Unix clock (civil-from-days, Howard Hinnant's algorithm).
pub(crate) fn date_utc() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        (rem % 3600) / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_table_has_header_separator_and_rows() {
        let mut t = Table::new("T", &["a", "b"]);
        t.row(vec!["1".into(), "2".into()]);
        assert_eq!(t.markdown(), "**T**\n\n| a | b |\n|---|---|\n| 1 | 2 |\n");
    }

    #[test]
    fn date_is_well_formed() {
        let d = date_utc();
        assert_eq!(d.len(), 16, "{d}");
        assert!(d.starts_with("20"), "{d}");
    }
}
