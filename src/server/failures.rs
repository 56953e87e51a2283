//! Connections that end in a failure, across connections: each kind logged once a minute with
//! a summary line for the repeats, and a growing pause before the next frontend after a
//! misfit (a frontend that wants more queue pairs or larger rings than macvhost serves).
//!
//! A misfit repeats identically on every reconnect until the operator restarts one side (QEMU
//! with `reconnect=1` reconnects at once after such a failure: about 750 connections a
//! second, measured). The pause starts at [`FIRST_PAUSE`], doubles per misfit up to
//! [`MAX_PAUSE`], and a connection that ends well resets it; meanwhile a frontend's connect
//! waits in the listen backlog (or, with `--client`, macvhost does not connect). Other
//! failures (a refused message) are not paused: waiting cannot fix a broken frontend, and each
//! costs macvhost about a millisecond.

use std::time::{Duration, Instant};

/// The window of one log line per kind of failure.
pub(super) const WINDOW: Duration = Duration::from_secs(60);
/// The first pause after a misfit.
pub(super) const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// The longest pause.
pub(super) const MAX_PAUSE: Duration = Duration::from_secs(4);

/// How bad a failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Severity {
    /// The operator must change a flag (a misfit): an error, and a pause before the next.
    Misfit,
    /// The frontend's fault or a failed connection: a warning.
    Fault,
}

#[derive(Debug)]
struct Shown {
    line: String,
    severity: Severity,
    since: Instant,
    repeats: u64,
}

/// The failure log and pause (see the module doc).
#[derive(Debug, Default)]
pub(super) struct Failures {
    shown: Option<Shown>,
    pause: Duration,
    last_failed: bool,
}

/// What [`Failures`] wants written: lines at a level.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Line {
    pub severity: Severity,
    pub text: String,
}

impl Failures {
    /// Whether the last connection failed: the next "frontend connected" is then a debug line,
    /// so a frontend that keeps failing writes no line per attempt.
    pub(super) fn failing(&self) -> bool {
        self.last_failed
    }

    /// A connection ended well: the summary of repeats (if any) and no more pause.
    pub(super) fn good(&mut self, now: Instant) -> Option<Line> {
        self.pause = Duration::ZERO;
        self.last_failed = false;
        self.summary(now)
    }

    /// A connection failed with `line`: the lines to write now (none for a repeat within the
    /// window), and the pause before the next frontend.
    pub(super) fn failed(
        &mut self,
        line: String,
        severity: Severity,
        now: Instant,
    ) -> (Vec<Line>, Duration) {
        let mut out = Vec::new();
        self.last_failed = true;
        match &mut self.shown {
            Some(s) if s.line == line => {
                s.repeats += 1;
                if now.duration_since(s.since) >= WINDOW {
                    out.extend(self.summary(now));
                    self.shown = Some(Shown {
                        line,
                        severity,
                        since: now,
                        repeats: 0,
                    });
                }
            }
            _ => {
                out.extend(self.summary(now));
                out.push(Line {
                    severity,
                    text: line.clone(),
                });
                self.shown = Some(Shown {
                    line,
                    severity,
                    since: now,
                    repeats: 0,
                });
            }
        }
        if severity == Severity::Misfit {
            self.pause = if self.pause.is_zero() {
                FIRST_PAUSE
            } else {
                (self.pause * 2).min(MAX_PAUSE)
            };
        }
        (out, self.pause)
    }

    /// The summary of the repeats of the last failure, if there were any (and forgets it).
    pub(super) fn summary(&mut self, now: Instant) -> Option<Line> {
        let s = self.shown.take()?;
        (s.repeats > 0).then(|| Line {
            severity: s.severity,
            text: format!(
                "{} more identical failures in the last {} s: {}",
                s.repeats,
                now.duration_since(s.since).as_secs().max(1),
                s.line
            ),
        })
    }
}

impl Line {
    /// Writes the line at its level.
    pub(super) fn log(&self) {
        match self.severity {
            Severity::Misfit => tracing::error!("{}", self.text),
            Severity::Fault => tracing::warn!("{}", self.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_thousand_identical_misfits_in_a_minute_write_one_line_then_one_summary() {
        let mut f = Failures::default();
        let t0 = Instant::now();
        let mut lines = Vec::new();
        for i in 0..=10_000u32 {
            let now = t0 + Duration::from_millis(u64::from(i) * 6);
            lines.extend(f.failed("misfit".into(), Severity::Misfit, now).0);
        }
        // The 10,001st failure, 60 s after the first, is the first at the window's end: it
        // brings the summary (counting itself) and starts the next window silently.
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert_eq!(lines[0].text, "misfit");
        assert!(
            lines[1]
                .text
                .starts_with("10000 more identical failures in the last 60 s: misfit"),
            "{}",
            lines[1].text
        );
        let end = f.good(t0 + Duration::from_secs(61));
        assert!(end.is_none(), "nothing repeated since the summary");
    }

    #[test]
    fn pause_after_a_misfit_doubles_to_its_cap_and_a_good_connection_resets_it() {
        let mut f = Failures::default();
        let now = Instant::now();
        let pauses: Vec<Duration> = (0..8)
            .map(|_| f.failed("m".into(), Severity::Misfit, now).1)
            .collect();
        assert_eq!(pauses[0], FIRST_PAUSE);
        assert_eq!(pauses[1], FIRST_PAUSE * 2);
        assert_eq!(*pauses.last().unwrap(), MAX_PAUSE);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert!(f.failing());
        let summary = f.good(now).expect("repeats were summarised");
        assert!(!f.failing());
        assert!(
            summary.text.starts_with("7 more identical failures"),
            "{}",
            summary.text
        );
        assert_eq!(f.failed("m".into(), Severity::Misfit, now).1, FIRST_PAUSE);
    }

    #[test]
    fn frontend_faults_are_deduplicated_but_never_paused() {
        let mut f = Failures::default();
        let now = Instant::now();
        let (lines, pause) = f.failed("bad message".into(), Severity::Fault, now);
        assert_eq!(lines.len(), 1);
        assert_eq!(pause, Duration::ZERO);
        let (lines, pause) = f.failed("bad message".into(), Severity::Fault, now);
        assert!(lines.is_empty());
        assert_eq!(pause, Duration::ZERO);
    }

    #[test]
    fn a_different_failure_is_written_after_the_summary_of_the_last() {
        let mut f = Failures::default();
        let now = Instant::now();
        f.failed("a".into(), Severity::Fault, now);
        f.failed("a".into(), Severity::Fault, now);
        let (lines, _) = f.failed("b".into(), Severity::Misfit, now);
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts, ["1 more identical failures in the last 1 s: a", "b"]);
    }
}
