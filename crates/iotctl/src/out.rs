//! Output that behaves like a Unix tool: when the reader goes away (`iotctl ... |
//! head`), iotctl stops quietly instead of panicking on "Broken pipe".

use std::io::Write;

/// Writes `text` as is to stdout.
pub fn text(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        gone(&e);
    }
}

/// Writes one line to stdout.
pub fn line(line: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = writeln!(stdout, "{line}") {
        gone(&e);
    }
}

/// Writes one line to stderr (a failure to do so is not worth another error).
pub fn warn(line: &str) {
    if writeln!(std::io::stderr().lock(), "{line}").is_err() {
        // Nowhere left to say it.
    }
}

fn gone(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        // The reader has what it wanted; stop like a tool killed by SIGPIPE would,
        // without the noise.
        std::process::exit(0);
    }
    warn(&format!("iotctl: writing output: {e}"));
    std::process::exit(1);
}
