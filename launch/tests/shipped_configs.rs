//! Every config in configs/ loads and validates (multi-rank ones for a world of their
//! `parallel.ep_size` ranks), and docs/config-reference.md is what `moe config-reference`
//! generates from the schema today.

mod common;

use common::{moe, repo_root};

fn ep_size_of(resolved_yaml: &str) -> i64 {
    resolved_yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("ep_size: "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no parallel.ep_size in:\n{resolved_yaml}"))
}

#[test]
fn every_shipped_config_is_valid() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let rel = format!("configs/{name}");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with('#'), "{rel} needs a header comment");
        // --debug validates for ep_size in-process ranks, whatever the config's ep_size is.
        let (code, out, err) = moe(&["check", "--config", &rel, "--debug"]);
        let missing = err.contains("does not exist") || err.contains("is not a directory");
        if code == 2 && err.contains("data.path") && missing {
            // configs/shakespeare.yaml reads shared/data/tinyshakespeare.txt beside the
            // checkout, configs/shakespeare-bpe.yaml the token files its header's commands
            // (and its tokenizer) make; where they are not there, check must say so (and
            // nothing else).
            for line in err.lines().filter(|l| l.starts_with("  - ")) {
                let key = line.contains("data.path") || line.contains("data.tokenizer");
                let gone = line.contains("does not exist") || line.contains("is not a directory");
                assert!(key && gone, "{rel}: {err}");
            }
            names.push(name);
            continue;
        }
        assert_eq!(code, 0, "{rel} (--debug): {err}");
        let p = ep_size_of(&out).to_string();
        let (code, _, err) = moe(&["check", "--config", &rel, "--world-size", &p]);
        assert_eq!(code, 0, "{rel} at world size {p}: {err}");
        names.push(name);
    }
    names.sort();
    for expected in [
        "debug.yaml",
        "ep2.yaml",
        "quickstart.yaml",
        "shakespeare.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "configs/{expected} missing: {names:?}"
        );
    }
}

#[test]
fn config_reference_is_up_to_date() {
    let (code, out, err) = moe(&["config-reference"]);
    assert_eq!(code, 0, "{err}");
    let doc = repo_root().join("docs/config-reference.md");
    let on_disk = std::fs::read_to_string(&doc).unwrap_or_default();
    assert!(
        on_disk == out,
        "docs/config-reference.md is stale; regenerate it with\n  \
         cargo run --release -p moe-launch -- config-reference > docs/config-reference.md"
    );
}

/// README embeds the same reference (headings one level down), so a user reading README sees
/// every key, its default and meaning, and it cannot drift from the schema either.
#[test]
fn readme_embeds_the_config_reference() {
    let (code, out, err) = moe(&["config-reference"]);
    assert_eq!(code, 0, "{err}");
    let body: String = out
        .lines()
        .skip_while(|l| l.starts_with("# "))
        .map(|l| {
            if l.starts_with("## ") {
                format!("#{l}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap_or_default();
    assert!(
        readme.contains(body.trim()),
        "README.md's config reference is stale: paste the output of `moe config-reference` \
         (without its title, headings demoted by one level) into README's Config reference section"
    );
}
