//! Output for people, on stderr. Two rules that `eprintln!` breaks:
//! - A write to a dead pipe is not a reason to die. After `up.sh 2>&1 | tee log` and
//!   Ctrl-C, `tee` is gone before the teardown has finished printing; a panic there
//!   (inside `Drop`) would abort and leave namespaces, containers and servers behind.
//! - Colour only on a terminal, never in a log file.

use std::io::{IsTerminal, Write};
use std::sync::OnceLock;

/// Writes one line to stderr. Errors are dropped on purpose: this output is
/// informational, and the teardown that follows matters more.
pub fn print_line(line: &str) {
    let mut err = std::io::stderr().lock();
    if writeln!(err, "{line}").is_err() {
        // Nowhere left to report it.
    }
}

fn colour_on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
}

/// `text` in the ANSI style `code` (such as "1;32"), or plain when not on a terminal.
pub fn paint(code: &str, text: &str) -> String {
    if colour_on() {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

pub fn bold(text: &str) -> String {
    paint("1", text)
}

pub fn ok(text: &str) -> String {
    paint("32", text)
}

pub fn good(text: &str) -> String {
    paint("1;32", text)
}

pub fn bad(text: &str) -> String {
    paint("1;31", text)
}

pub fn fail(text: &str) -> String {
    paint("31", text)
}

pub fn step(text: &str) -> String {
    paint("1;34", text)
}
