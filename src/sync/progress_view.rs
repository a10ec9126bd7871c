//! Progress people can watch while `sync` runs, drawn from the engine's
//! [`ProgressBoard`]: a live bar per resource type (counts and ETA) when
//! stderr is a terminal, otherwise a plain line per type every few seconds.
//! Either way it says when requests wait for the hourly budget, and until
//! when. Colour only on a terminal, and never with `NO_COLOR` set.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::sync::watch;

use super::ProgressBoard;
use crate::bitbucket::Client;
use crate::model::SyncKind;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewMode {
    /// Live bars (stderr is a terminal).
    Bars { colour: bool },
    /// A line per type every `every`.
    Lines { every: Duration },
}

impl ViewMode {
    /// Bars on a terminal, plain lines every `every` otherwise.
    pub fn detect(every: Duration) -> ViewMode {
        if std::io::stderr().is_terminal() {
            ViewMode::Bars {
                colour: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            }
        } else {
            ViewMode::Lines { every }
        }
    }
}

/// The running display; [`ProgressView::stop`] ends it.
pub struct ProgressView {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ProgressView {
    pub fn start(board: ProgressBoard, client: Client, mode: ViewMode) -> ProgressView {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut view = Drawing::new(mode);
            let tick = match mode {
                ViewMode::Bars { .. } => Duration::from_millis(200),
                ViewMode::Lines { every } => every,
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(tick) => {}
                    _ = stopped.changed() => break,
                }
                view.draw(&board, client.budget_wait());
            }
            view.clear();
        });
        ProgressView { stop, task }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

struct Drawing {
    mode: ViewMode,
    multi: MultiProgress,
    bars: BTreeMap<SyncKind, ProgressBar>,
    budget: Option<ProgressBar>,
}

impl Drawing {
    fn new(mode: ViewMode) -> Self {
        Drawing {
            mode,
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: BTreeMap::new(),
            budget: None,
        }
    }

    fn draw(&mut self, board: &ProgressBoard, budget_wait: Option<Duration>) {
        let waiting = budget_wait.filter(|w| *w >= Duration::from_secs(1)).map(budget_line);
        match self.mode {
            ViewMode::Lines { .. } => {
                for p in board.snapshot().into_iter().filter(|p| !p.finished) {
                    let eta = p
                        .eta
                        .map_or_else(|| "ETA unknown".to_owned(), |e| format!("ETA {}", human(e)));
                    eprintln!(
                        "{:<13} {}/{} ({} resumed), {} elapsed, {eta}",
                        p.kind.as_str(),
                        p.done,
                        p.total,
                        p.resumed,
                        human(p.elapsed)
                    );
                }
                if let Some(line) = waiting {
                    eprintln!("{line}");
                }
            }
            ViewMode::Bars { colour } => {
                for p in board.snapshot() {
                    let bar = self.bars.entry(p.kind).or_insert_with(|| {
                        let bar = self.multi.add(ProgressBar::new(0));
                        bar.set_style(bar_style(colour));
                        bar.set_prefix(p.kind.as_str());
                        bar
                    });
                    bar.set_length(p.total);
                    bar.set_position(p.done);
                    bar.set_message(match (p.finished, p.eta) {
                        (true, _) => "done".to_owned(),
                        (false, Some(eta)) => format!("ETA {}", human(eta)),
                        (false, None) => String::new(),
                    });
                }
                match (waiting, &self.budget) {
                    (Some(line), Some(bar)) => bar.set_message(line),
                    (Some(line), None) => {
                        let bar = self.multi.add(ProgressBar::new_spinner());
                        bar.set_style(ProgressStyle::with_template("{msg}").expect("constant template"));
                        bar.set_message(line);
                        self.budget = Some(bar);
                    }
                    (None, Some(_)) => {
                        if let Some(bar) = self.budget.take() {
                            bar.finish_and_clear();
                        }
                    }
                    (None, None) => {}
                }
            }
        }
    }

    fn clear(&mut self) {
        for bar in self.bars.values().chain(&self.budget) {
            bar.finish_and_clear();
        }
    }
}

fn bar_style(colour: bool) -> ProgressStyle {
    let template = if colour {
        "{prefix:<13} [{bar:30.cyan/blue}] {pos}/{len} {msg}"
    } else {
        "{prefix:<13} [{bar:30}] {pos}/{len} {msg}"
    };
    ProgressStyle::with_template(template)
        .expect("constant template")
        .progress_chars("=> ")
}

fn budget_line(wait: Duration) -> String {
    let until = jiff::Timestamp::now() + jiff::SignedDuration::try_from(wait).unwrap_or_default();
    format!(
        "waiting for the hourly request budget until {} ({} from now)",
        until.round(jiff::Unit::Second).unwrap_or(until),
        human(wait)
    )
}

/// `1h02m`, `3m05s`, `12s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(human(Duration::from_secs(12)), "12s");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
        assert_eq!(human(Duration::from_secs(3720)), "1h02m");
        assert!(budget_line(Duration::from_secs(90)).contains("until 20"));
    }
}
