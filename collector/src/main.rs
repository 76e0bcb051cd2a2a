//! `pulsebell-collector`: thin entry point over the library.

use clap::Parser;
use pulsebell_collector::cli::{self, Cli, Command};

fn main() {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_logging(
        matches!(cli.command, Command::Serve { .. } | Command::Demo { .. }),
        matches!(cli.command, Command::Demo { .. }),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = runtime.block_on(cli::run(cli));
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    std::process::exit(code);
}

/// glibc's malloc gives threads their own arenas (up to 8 per core), and
/// memory freed in one arena is not reused by another: with tokio's workers
/// and blocking threads allocating connection state, that is RSS held for
/// nothing. Two arenas: 1.6 KiB less RSS per connected device at 10k, CPU
/// the same (BENCHMARKS.md). `MALLOC_ARENA_MAX` in the environment wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; called first thing
        // in main, before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

fn init_logging(server: bool, demo: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if demo {
        "warn"
    } else if server {
        "info"
    } else {
        "warn"
    };
    let filter = EnvFilter::try_from_env("PULSEBELL_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(colour());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

/// Colour only on a terminal, and never with `NO_COLOR` set (no-color.org)
/// or under journald.
fn colour() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var_os("JOURNAL_STREAM").is_none()
}
