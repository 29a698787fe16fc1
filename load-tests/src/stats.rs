//! Latency histograms, their summaries, and the text tables the scenarios print.

use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest value a histogram accepts: one hour, in nanoseconds.
const MAX_NS: u64 = 3_600 * 1_000_000_000;

/// Latencies in nanoseconds, three significant digits.
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            hist: Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds"),
        }
    }
}

impl Latencies {
    pub fn record(&mut self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(MAX_NS);
        self.record_ns(ns);
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.hist.saturating_record(ns.clamp(1, MAX_NS));
    }

    pub fn summary(&self) -> Summary {
        let h = &self.hist;
        let us = |ns: u64| ns as f64 / 1_000.0;
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            min_us: us(h.min()),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1_000.0,
        }
    }
}

/// How many round trips a closed loop makes: `warmup` first, left out of the figures, then
/// measured ones until `calls` were made or, with a `duration`, until that elapsed instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub warmup: u64,
    pub calls: u64,
    pub duration: Option<Duration>,
}

impl Budget {
    /// Whether the loop stops, after `measured` round trips made since `since`.
    pub fn spent(&self, measured: u64, since: Instant) -> bool {
        match self.duration {
            Some(duration) => since.elapsed() >= duration,
            None => measured >= self.calls,
        }
    }
}

/// Percentiles of a histogram, in microseconds. Also what the load-tests agent reports in its
/// `done` line, so it is serialisable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// A duration given in microseconds, in the unit that suits it (`812 µs`, `3.47 ms`).
pub fn fmt_us(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1_000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// A plain text table: the first column left-aligned, the others right-aligned.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate().take(columns) {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i > 0 {
                out.push_str("  ");
            }
            if i == 0 {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    out.push('\n');
    let total: usize = widths.iter().sum::<usize>() + 2 * (columns.saturating_sub(1));
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

/// `count, p50, p90, p99, max, mean` cells of a summary.
pub fn summary_cells(s: &Summary) -> Vec<String> {
    vec![
        s.count.to_string(),
        fmt_us(s.p50_us),
        fmt_us(s.p90_us),
        fmt_us(s.p99_us),
        fmt_us(s.max_us),
        fmt_us(s.mean_us),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut lat = Latencies::default();
        for us in 1..=1000u64 {
            lat.record(Duration::from_micros(us));
        }
        let s = lat.summary();
        assert_eq!(s.count, 1000);
        // Three significant digits: within 0.1 %.
        assert!((s.p50_us - 500.0).abs() <= 0.5, "{s:?}");
        assert!((s.p99_us - 990.0).abs() <= 1.0, "{s:?}");
        assert!((s.max_us - 1000.0).abs() <= 1.0, "{s:?}");
        assert!((s.mean_us - 500.5).abs() <= 0.5, "{s:?}");
    }

    #[test]
    fn a_budget_counts_calls_or_time() {
        let start = Instant::now();
        let calls = Budget {
            warmup: 0,
            calls: 3,
            duration: None,
        };
        assert!(!calls.spent(2, start));
        assert!(calls.spent(3, start));
        let timed = Budget {
            duration: Some(Duration::from_secs(3600)),
            ..calls
        };
        assert!(!timed.spent(1_000_000, start));
        let over = Budget {
            duration: Some(Duration::ZERO),
            ..calls
        };
        assert!(over.spent(0, start));
    }

    #[test]
    fn an_empty_histogram_summarises_to_zeros() {
        assert_eq!(Latencies::default().summary(), Summary::default());
    }

    #[test]
    fn durations_pick_their_unit() {
        assert_eq!(fmt_us(812.4), "812 µs");
        assert_eq!(fmt_us(3_470.0), "3.47 ms");
        assert_eq!(fmt_us(2_500_000.0), "2.50 s");
    }

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["what", "p50"],
            &[
                vec!["echo".into(), "35 µs".into()],
                vec!["full path".into(), "1.20 ms".into()],
            ],
        );
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "what           p50");
        assert_eq!(lines[1], "------------------");
        assert_eq!(lines[2], "echo         35 µs");
        assert_eq!(lines[3], "full path  1.20 ms");
    }
}
