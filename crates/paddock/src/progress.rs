//! Progress bars for long operations (convert, hash, compress, push, pull).
//!
//! Contract: bars draw on standard error, only when it is a terminal and the user did not ask for
//! `--json` or `--quiet`, so scripts and CI logs get clean output; every bar shows bytes done, total,
//! rate and ETA.

use std::time::Duration;

use clap::Args;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `--json` and `--quiet`, shared by every command with long operations.
#[derive(Debug, Clone, Copy, Args)]
pub struct OutputFlags {
    /// Print the result as JSON on standard output (no progress bars).
    #[arg(long)]
    pub json: bool,

    /// No progress bars.
    #[arg(short, long)]
    pub quiet: bool,
}

impl OutputFlags {
    /// The bars these flags allow.
    pub fn bars(self) -> Bars {
        Bars::new(!(self.json || self.quiet))
    }
}

/// The set of bars of one command.
pub struct Bars {
    multi: MultiProgress,
}

impl Bars {
    /// Bars that draw when `visible` (and standard error is a terminal).
    pub fn new(visible: bool) -> Bars {
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Bars {
            multi: MultiProgress::with_draw_target(target),
        }
    }

    /// A byte-counting bar labelled `label` for `total` bytes.
    pub fn bytes(&self, label: &str, total: u64) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(total));
        let style = ProgressStyle::with_template(
            "{prefix:>10.bold} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(label.to_owned());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }

    /// Prints a line above the bars (or plainly when they are hidden).
    pub fn println(&self, line: &str) {
        if self.multi.is_hidden() {
            eprintln!("{line}");
        } else {
            let _ = self.multi.println(line);
        }
    }
}
