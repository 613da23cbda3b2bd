//! The documentation is tested, so a renamed flag, a changed output or a moved page fails here:
//!
//! - README.md stays a landing page (at most 250 lines) and shows the two commands;
//! - every `carp` / `carp-bench` command line in a ```` ```sh ```` or ```` ```console ````
//!   block of README.md and docs/*.md is parsed by the CLIs' own clap definitions (the same
//!   files the binaries compile), so a flag that no longer exists fails;
//! - the ```` ```console ```` blocks are run: each `$ ` line against the built binary, in a
//!   temporary folder (with an empty cache for the embedded data), and its output (stdout, then
//!   stderr) compared with the lines below it (trycmd's wildcards: a line `...` matches any
//!   number of lines, `[..]` any text within a line); a command must exit successfully. Examples
//!   that take long (training runs, ImageNet) are in ```` ```sh ```` blocks: parsed, not run;
//! - docs/cli.md is the reference generated from the clap definitions (regenerate it with
//!   `UPDATE_DOCS=1 cargo test --release --test docs`);
//! - `carp completions bash|zsh|fish` prints a script for each shell;
//! - every relative link of README.md and docs/*.md points to a file that exists.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{CommandFactory, Parser};

#[allow(dead_code)]
#[path = "../src/bin/carp/cli.rs"]
mod carp_cli;

#[allow(dead_code)]
#[path = "../bench/cli.rs"]
mod bench_cli;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// README.md and every docs/*.md, sorted.
fn doc_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("read docs/")
        .map(|e| e.expect("docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    files.sort();
    files.insert(0, root().join("README.md"));
    files
}

fn rel(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A fenced code block: its info string, the line of its first body line (1-based) and its body.
struct Block {
    info: String,
    line: usize,
    body: Vec<String>,
}

fn fenced_blocks(text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (i, line) in text.lines().enumerate() {
        let fence = line.trim_start().starts_with("```");
        match (&mut open, fence) {
            (None, true) => {
                open = Some(Block {
                    info: line.trim_start().trim_start_matches('`').trim().to_string(),
                    line: i + 2,
                    body: Vec::new(),
                })
            }
            (Some(_), true) => blocks.extend(open.take()),
            (Some(b), false) => b.body.push(line.to_string()),
            (None, false) => {}
        }
    }
    assert!(open.is_none(), "an unclosed code block");
    blocks
}

/// A shell line's words, with '...' and "..." quotes removed, up to a comment, a pipe, a
/// redirection or a command separator.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    cur.push(q);
                }
            }
            '#' if !in_word => break,
            '|' | '>' | '<' | ';' | '&' if !in_word => break,
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// The program a documented line runs and its argv (program name first): `carp ...`,
/// `carp-bench ...` (also after a wrapper such as `nsys profile ...`), or
/// `cargo run --release -- ...` (the carp binary).
fn cli_invocation(words: &[String]) -> Option<(&'static str, Vec<String>)> {
    if words.first().map(String::as_str) == Some("cargo")
        && words.get(1).map(String::as_str) == Some("run")
    {
        let sep = words.iter().position(|w| w == "--")?;
        let mut argv = vec!["carp".to_string()];
        argv.extend_from_slice(&words[sep + 1..]);
        return Some(("carp", argv));
    }
    let at = words
        .iter()
        .position(|w| w == "carp" || w == "carp-bench")?;
    let program = if words[at] == "carp" {
        "carp"
    } else {
        "carp-bench"
    };
    Some((program, words[at..].to_vec()))
}

/// Parses a command line with the real clap definitions; `--help` and `--version` count as
/// parsed.
fn parse(program: &str, argv: &[String]) -> Result<(), String> {
    let result = match program {
        "carp" => carp_cli::Cli::try_parse_from(argv).map(|_| ()),
        _ => bench_cli::Args::try_parse_from(argv).map(|_| ()),
    };
    match result {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// The logical lines of a shell block: `\`-continued lines joined, `$ ` prompts removed (in
/// console blocks only the prompt lines are commands).
fn command_lines(block: &Block) -> Vec<(usize, String)> {
    let console = block.info == "console";
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in block.body.iter().enumerate() {
        let line_no = block.line + i;
        let text = match pending.take() {
            Some((start, mut acc)) => {
                acc.push(' ');
                acc.push_str(line.trim());
                (start, acc)
            }
            None if console => match line.strip_prefix("$ ") {
                Some(cmd) => (line_no, cmd.trim().to_string()),
                None => continue,
            },
            None => (line_no, line.trim().to_string()),
        };
        match text.1.strip_suffix('\\') {
            Some(head) => pending = Some((text.0, head.trim_end().to_string())),
            None => out.push(text),
        }
    }
    out.extend(pending);
    out
}

#[test]
fn readme_is_a_landing_page_with_the_two_commands() {
    let readme = read(&root().join("README.md"));
    let lines = readme.lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines, more than 250: it is the landing page; move the details \
         into a page under docs/ and link it from the README's map of the docs"
    );
    for command in ["cargo run --release -- train", "cargo test --release"] {
        assert!(
            readme.contains(command),
            "README.md must show `{command}` (one of the two commands a newcomer comes for)"
        );
    }
}

#[test]
fn every_documented_command_line_parses() {
    let mut parsed = 0;
    let mut failures = Vec::new();
    for file in doc_files() {
        for block in fenced_blocks(&read(&file)) {
            if block.info != "sh" && block.info != "console" {
                continue;
            }
            for (line, text) in command_lines(&block) {
                let Some((program, argv)) = cli_invocation(&shell_words(&text)) else {
                    continue;
                };
                parsed += 1;
                if let Err(e) = parse(program, &argv) {
                    failures.push(format!("{}:{line}: `{text}`\n{e}", rel(&file)));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} documented command line(s) do not parse with the CLI's definitions (fix the docs or \
         the flag):\n\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The docs show dozens of commands: finding few means the extraction broke.
    assert!(
        parsed >= 40,
        "only {parsed} command lines found in README.md and docs/"
    );
}

/// Whether `actual` matches `expected` with trycmd's wildcards: an expected line `...` matches
/// any number of lines, `[..]` within a line any text.
fn lines_match(expected: &[String], actual: &[String]) -> bool {
    match expected.split_first() {
        None => actual.is_empty(),
        Some((e, rest)) if e == "..." => {
            (0..=actual.len()).any(|i| lines_match(rest, &actual[i..]))
        }
        Some((e, rest)) => {
            !actual.is_empty() && line_matches(e, &actual[0]) && lines_match(rest, &actual[1..])
        }
    }
}

fn line_matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("[..]").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || !line[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &line[first.len()..line.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    true
}

#[test]
fn console_examples_run_and_print_what_the_docs_show() {
    let mut ran = 0;
    let mut failures = Vec::new();
    for file in doc_files() {
        for block in fenced_blocks(&read(&file)) {
            if block.info != "console" {
                continue;
            }
            // One folder per block: its commands run in order, as a reader would type them.
            let dir = tempfile::tempdir().expect("temp dir");
            let prompts: Vec<usize> = (0..block.body.len())
                .filter(|&i| block.body[i].starts_with("$ "))
                .collect();
            for (n, &at) in prompts.iter().enumerate() {
                let end = prompts.get(n + 1).copied().unwrap_or(block.body.len());
                let text = &block.body[at][2..];
                let where_ = format!("{}:{}: `{text}`", rel(&file), block.line + at);
                let Some((program, argv)) = cli_invocation(&shell_words(text)) else {
                    failures.push(format!("{where_}: not a carp or carp-bench command"));
                    continue;
                };
                let exe = match program {
                    "carp" => env!("CARGO_BIN_EXE_carp"),
                    _ => env!("CARGO_BIN_EXE_carp-bench"),
                };
                let mut command = Command::new(exe);
                command
                    .args(&argv[1..])
                    .current_dir(dir.path())
                    .env("XDG_CACHE_HOME", dir.path().join("cache"));
                // The run options' environment fallbacks would change what a run prints.
                for (key, _) in std::env::vars_os() {
                    if key.to_string_lossy().starts_with("CARP_") {
                        command.env_remove(key);
                    }
                }
                let out = command.output().expect("run the binary");
                ran += 1;
                // What the reader sees: stdout, then stderr (where carp train logs).
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                let actual: Vec<String> = stdout.lines().map(str::to_string).collect();
                let expected = block.body[at + 1..end].to_vec();
                if !out.status.success() {
                    failures.push(format!(
                        "{where_}: exited with {}; stderr:\n{}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr)
                    ));
                } else if !lines_match(&expected, &actual) {
                    failures.push(format!(
                        "{where_}: the output differs from the docs.\nexpected:\n{}\nactual:\n{}",
                        expected.join("\n"),
                        stdout
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(ran >= 8, "only {ran} console examples ran");
}

#[test]
fn line_matching_honours_the_wildcards() {
    let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert!(lines_match(
        &v(&["a", "...", "c"]),
        &v(&["a", "b", "b", "c"])
    ));
    assert!(lines_match(&v(&["...", "c"]), &v(&["c"])));
    assert!(!lines_match(&v(&["a", "c"]), &v(&["a", "b", "c"])));
    assert!(!lines_match(&v(&["a"]), &v(&["a", "b"])));
    assert!(line_matches("k=20 top-1 [..]%", "k=20 top-1 82.80%"));
    assert!(line_matches("[..]x[..]y", "axbxy"));
    assert!(!line_matches("k=20 top-1 [..]%", "k=10 top-1 82.80%"));
    assert!(!line_matches("a[..]a", "a"));
}

/// The CLI reference: each command's and subcommand's `--help` text, as clap renders it.
fn cli_reference() -> String {
    let mut out = String::from(
        "# CLI reference\n\n<!-- Generated from the clap definitions (src/bin/carp/cli.rs, \
         bench/cli.rs) by tests/docs.rs; do not edit. Regenerate with\n\
         UPDATE_DOCS=1 cargo test --release --test docs -->\n\n\
         Every subcommand and flag of `carp` and `carp-bench`, as their `--help` prints them.\n",
    );
    for mut cmd in [carp_cli::Cli::command(), bench_cli::Args::command()] {
        cmd.build();
        let mut list = vec![cmd.clone()];
        list.extend(
            cmd.get_subcommands()
                .filter(|s| s.get_name() != "help")
                .cloned(),
        );
        for mut c in list {
            let name = c.get_bin_name().unwrap_or(c.get_name()).to_string();
            let help = c.render_long_help().to_string();
            let help: Vec<&str> = help.lines().map(str::trim_end).collect();
            out.push_str(&format!(
                "\n## `{name}`\n\n```text\n{}\n```\n",
                help.join("\n").trim()
            ));
        }
    }
    out
}

#[test]
fn cli_reference_is_current() {
    let path = root().join("docs/cli.md");
    let generated = cli_reference();
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).expect("write docs/cli.md");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/cli.md is not the reference the CLI's definitions generate: regenerate it with \
         `UPDATE_DOCS=1 cargo test --release --test docs` and commit it"
    );
    for needle in [
        "## `carp train`",
        "--resume",
        "## `carp-bench`",
        "--profile-steps",
    ] {
        assert!(generated.contains(needle), "the reference lacks {needle}");
    }
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let out = Command::new(env!("CARGO_BIN_EXE_carp"))
            .args(["completions", shell])
            .output()
            .expect("run carp completions");
        assert!(out.status.success(), "carp completions {shell} failed");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("carp") && script.contains("train") && script.contains("--resume"),
            "carp completions {shell}: the script does not complete carp's subcommands"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_carp"))
        .args(["completions", "tcsh"])
        .output()
        .expect("run carp completions");
    assert!(!out.status.success(), "an unknown shell is refused");
}

#[test]
fn relative_links_resolve() {
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in doc_files() {
        let text = read(&file);
        let dir = file.parent().expect("a folder");
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(at) = rest.find("](") {
                let after = &rest[at + 2..];
                let Some(end) = after.find(')') else { break };
                let target = &after[..end];
                rest = &after[end..];
                if target.contains("://")
                    || target.starts_with('#')
                    || target.starts_with("mailto:")
                {
                    continue;
                }
                let path = target.split('#').next().unwrap_or(target);
                checked += 1;
                if !dir.join(path).exists() {
                    broken.push(format!("{}:{}: {target}", rel(&file), n + 1));
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to missing files:\n{}",
        broken.join("\n")
    );
    assert!(checked >= 20, "only {checked} relative links found");
}
