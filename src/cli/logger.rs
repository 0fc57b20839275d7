//! The command line's `log` backend: the library's warnings and notices on stderr, worded as
//! the command line always printed them (`warning: ...`, `device auto: using the CPU ...`).

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Prints `warning: `/`error: ` + the message for those levels and the bare message for
/// notices; debug and trace are dropped, as are other crates' notices.
struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        match metadata.level() {
            Level::Error | Level::Warn => true,
            Level::Info => metadata.target().starts_with("dinotrain"),
            Level::Debug | Level::Trace => false,
        }
    }

    fn log(&self, record: &Record<'_>) {
        if self.enabled(record.metadata()) {
            super::progress::eprint_line(&line(record));
        }
    }

    fn flush(&self) {}
}

/// The stderr line of a record.
fn line(record: &Record<'_>) -> String {
    match record.level() {
        Level::Error => format!("error: {}", record.args()),
        Level::Warn => format!("warning: {}", record.args()),
        _ => record.args().to_string(),
    }
}

/// Installs the logger (once; a second call changes nothing).
pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Info);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line_of(level: Level, target: &str, text: &str) -> String {
        line(
            &Record::builder()
                .level(level)
                .target(target)
                .args(format_args!("{text}"))
                .build(),
        )
    }

    #[test]
    fn lines_keep_the_command_line_wording() {
        assert_eq!(
            line_of(
                Level::Warn,
                "dinotrain::data::loader",
                "skipping a.jpg: bad"
            ),
            "warning: skipping a.jpg: bad"
        );
        assert_eq!(
            line_of(
                Level::Info,
                "dinotrain::backend",
                "device auto: using the CPU (x)"
            ),
            "device auto: using the CPU (x)"
        );
        let ours = Metadata::builder()
            .level(Level::Info)
            .target("dinotrain::backend::cuda::device")
            .build();
        assert!(LOGGER.enabled(&ours));
        let other = Metadata::builder()
            .level(Level::Info)
            .target("some_dependency")
            .build();
        assert!(!LOGGER.enabled(&other));
    }
}
