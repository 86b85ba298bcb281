//! `data.source: synthetic`: a generated multi-domain ASCII corpus, nothing downloaded.
//!
//! Documents of a few lines each, from six domains with learnable structure at different
//! ranges: arithmetic (`12+7=19`: carrying digits), templated English sentences from small
//! word lists (syntax, agreement), `key=value` config blocks (keys predict value types),
//! code-like lines (balanced brackets, repeated identifiers), repeated patterns and counting
//! (copying, successor), and word reversal (`rev(cat)=tac`, exact copying in reverse).
//! A byte-level model's loss falls well below the uniform ln(256) = 5.55 nats within a few
//! hundred steps, while the arithmetic and reversal keep it from reaching zero quickly.
//!
//! The corpus is a pure function of [`SYNTHETIC_SEED`] and the size, not of `run.seed`, so
//! every run of an experiment family sees the same data.

use super::sampler::splitmix64;

/// Seed of the generator; fixed so the corpus is the same for every run.
pub const SYNTHETIC_SEED: u64 = 0x5EED_DA7A_C0DE;

/// The SplitMix64 sequence: tiny, fast and stable across crate versions.
struct Gen(u64);

impl Gen {
    fn next_u64(&mut self) -> u64 {
        let out = splitmix64(self.0);
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const DETS: &[&str] = &["the", "a", "every", "one", "that"];
const ADJS: &[&str] = &[
    "small", "red", "quick", "lazy", "old", "bright", "quiet", "happy",
];
const NOUNS: &[&str] = &[
    "cat", "dog", "bird", "child", "river", "robot", "teacher", "garden",
];
const VERBS: &[&str] = &[
    "sees", "likes", "follows", "finds", "helps", "watches", "paints",
];
const PLACES: &[&str] = &[
    "in the park",
    "near the house",
    "at night",
    "by the sea",
    "today",
];
const NAMES: &[&str] = &["alpha", "beta", "gamma", "delta", "omega", "sigma"];
const HOSTS: &[&str] = &["localhost", "db1", "cache", "worker7", "gateway"];
const SECTIONS: &[&str] = &["server", "database", "logging", "cache", "auth"];
const IDENTS: &[&str] = &["x", "y", "total", "count", "value", "size", "idx"];
const WORDS: &[&str] = &[
    "cat", "moon", "river", "stone", "apple", "train", "light", "sugar",
];

/// The first `bytes` bytes of the corpus: printable ASCII and `\n` only.
pub fn generate(bytes: usize) -> Vec<u8> {
    let mut g = Gen(SYNTHETIC_SEED);
    let mut out = String::with_capacity(bytes + 256);
    while out.len() < bytes {
        let lines = 3 + g.below(6);
        let domain = g.below(6);
        for _ in 0..lines {
            let line = match domain {
                0 => arithmetic(&mut g),
                1 => sentence(&mut g),
                2 => config_line(&mut g),
                3 => code_line(&mut g),
                4 => pattern(&mut g),
                _ => reversal(&mut g),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out.push('\n');
    }
    let mut v = out.into_bytes();
    v.truncate(bytes);
    v
}

fn arithmetic(g: &mut Gen) -> String {
    let (a, b) = (g.below(100), g.below(100));
    match g.below(3) {
        0 => format!("{a}+{b}={}", a + b),
        1 => format!("{}-{b}={a}", a + b),
        _ => {
            let (a, b) = (a % 13, b % 13);
            format!("{a}*{b}={}", a * b)
        }
    }
}

fn sentence(g: &mut Gen) -> String {
    let subject = noun_phrase(g);
    let verb = g.pick(VERBS);
    let s = format!("{subject} {verb} {}", noun_phrase(g));
    match g.below(3) {
        0 => format!("{s} {}.", g.pick(PLACES)),
        _ => format!("{s}."),
    }
}

/// `the red cat`, with `an` before a vowel: one more rule to learn.
fn noun_phrase(g: &mut Gen) -> String {
    let (det, adj, noun) = (g.pick(DETS), g.pick(ADJS), g.pick(NOUNS));
    let det = if det == "a" && adj.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        det
    };
    format!("{det} {adj} {noun}")
}

fn config_line(g: &mut Gen) -> String {
    match g.below(6) {
        0 => format!("[{}]", g.pick(SECTIONS)),
        1 => format!("host={}", g.pick(HOSTS)),
        2 => format!("port={}", 8000 + g.below(100)),
        3 => format!("debug={}", if g.below(2) == 0 { "true" } else { "false" }),
        4 => format!("name={}", g.pick(NAMES)),
        _ => format!("retries={}", g.below(10)),
    }
}

fn code_line(g: &mut Gen) -> String {
    let (x, y) = (g.pick(IDENTS), g.pick(IDENTS));
    let n = 1 + g.below(9);
    match g.below(5) {
        0 => format!("let {x} = {n};"),
        1 => format!("fn add_{n}({x}) {{ return {x} + {n}; }}"),
        2 => format!("for i in 0..{n} {{ {x} += i; }}"),
        3 => format!("if {x} > {n} {{ {y} = {x} - {n}; }}"),
        _ => format!("print({x}, {y});"),
    }
}

fn pattern(g: &mut Gen) -> String {
    match g.below(3) {
        0 => {
            let start = g.below(90);
            (start..start + 8)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        }
        1 => {
            let start = g.below(18) as u8;
            (start..start + 9).map(|i| char::from(b'a' + i)).collect()
        }
        _ => {
            let unit = g.pick(&["ab", "xyz", "la", "tik tok", "ho"]);
            vec![unit; 2 + g.below(4)].join(" ")
        }
    }
}

fn reversal(g: &mut Gen) -> String {
    let w = g.pick(WORDS);
    format!("rev({w})={}", w.chars().rev().collect::<String>())
}
