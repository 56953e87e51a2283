//! Runtime observability: the control socket (`macvhost stats PATH`) and Prometheus metrics.
//!
//! Both read the per-queue-pair counters without touching the workers (the counters are
//! single-writer atomics), so asking for stats never slows the datapath.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::datapath::{QueueStats, StatsSnapshot};
use crate::worker::l2::L2Stats;

/// Errors of the control endpoints and of the `stats` client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The socket or port could not be opened (operator: path or address).
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// Path or address.
        what: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The stats client could not reach a running macvhost (operator: wrong path?).
    #[error("cannot read stats from {path}: {source}")]
    Connect {
        /// Control socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The answer was not what macvhost sends (a different program on that socket?).
    #[error("{path} did not answer with macvhost stats: {reason}")]
    BadAnswer {
        /// Control socket path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Everything `macvhost stats` shows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsReport {
    /// Host interface name.
    pub iface: String,
    /// Per-queue-pair counters, index = queue pair.
    pub queues: Vec<QueueReport>,
    /// Device-wide counters (the guest's multicast groups and MAC), name → value.
    #[serde(default)]
    pub device: std::collections::BTreeMap<String, u64>,
}

/// One queue pair's counters.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QueueReport {
    /// Queue pair index.
    pub queue_pair: usize,
    /// Counter name → value.
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// Shared view of the counters.
#[derive(Debug, Clone)]
pub struct StatsSource {
    iface: String,
    stats: Vec<Arc<QueueStats>>,
    l2: Arc<L2Stats>,
}

impl StatsSource {
    /// A view over `stats` for interface `iface`.
    pub fn new(iface: &str, stats: Vec<Arc<QueueStats>>) -> StatsSource {
        StatsSource {
            iface: iface.to_string(),
            stats,
            l2: Arc::default(),
        }
    }

    /// The same view, with the device's layer-2 counters.
    pub fn with_l2(mut self, l2: Arc<L2Stats>) -> StatsSource {
        self.l2 = l2;
        self
    }

    /// Snapshots every queue pair.
    pub fn snapshots(&self) -> Vec<StatsSnapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// The report served on the control socket.
    pub fn report(&self) -> StatsReport {
        StatsReport {
            iface: self.iface.clone(),
            queues: self
                .snapshots()
                .iter()
                .enumerate()
                .map(|(i, s)| QueueReport {
                    queue_pair: i,
                    counters: s
                        .fields()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                })
                .collect(),
            device: self
                .l2
                .snapshot()
                .fields()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }

    /// Prometheus text exposition (version 0.0.4).
    pub fn prometheus(&self) -> String {
        let snaps = self.snapshots();
        let mut out = String::new();
        let Some(first) = snaps.first() else {
            return out;
        };
        for (name, _) in first.fields() {
            out.push_str(&format!("# TYPE macvhost_{name} counter\n"));
            for (i, s) in snaps.iter().enumerate() {
                let v = s
                    .fields()
                    .into_iter()
                    .find(|(n, _)| *n == name)
                    .map_or(0, |(_, v)| v);
                out.push_str(&format!(
                    "macvhost_{name}{{iface=\"{}\",queue_pair=\"{i}\"}} {v}\n",
                    self.iface
                ));
            }
        }
        for (name, v) in self.l2.snapshot().fields() {
            let kind = if name == "mcast_groups" {
                "gauge"
            } else {
                "counter"
            };
            out.push_str(&format!("# TYPE macvhost_{name} {kind}\n"));
            out.push_str(&format!(
                "macvhost_{name}{{iface=\"{}\"}} {v}\n",
                self.iface
            ));
        }
        out
    }
}

/// Serves one JSON report per connection on a unix socket at `path` (removed on drop, unless a
/// `--take-over` process serves it now).
#[derive(Debug)]
pub struct ControlSocket {
    path: PathBuf,
    offer: Option<Arc<crate::takeover::Offer>>,
    /// Held until [`ControlSocket::start`] for a listener taken over: the thread serves
    /// nobody, and the file is not ours to remove, until the take-over is complete.
    gate: Option<std::sync::mpsc::Sender<()>>,
}

impl ControlSocket {
    /// The take-over is complete: serve the listener taken over, and own its file.
    pub fn start(&mut self) {
        if let Some(g) = self.gate.take() {
            let _ = g.send(());
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.gate.is_some() || self.offer.as_ref().is_some_and(|o| o.control_taken()) {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// How long the control thread waits for a client's request line before it answers with the
/// stats anyway (a client that sends nothing: `socat`, a `macvhost stats` of an older version).
const REQUEST_WAIT: Duration = Duration::from_millis(250);

/// The request a `macvhost stats` client sends.
const STATS_REQUEST: &str = "stats";

/// Binds the control socket at `path`, replacing what is there.
pub fn bind_control_socket(path: &Path) -> Result<UnixListener, ControlError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| ControlError::Listen {
        what: path.display().to_string(),
        source,
    })
}

/// Starts the control socket thread.
pub fn serve_control_socket(path: &Path, src: StatsSource) -> Result<ControlSocket, ControlError> {
    serve_control_on(path, bind_control_socket(path)?, src, None, false)
}

/// Starts the control socket thread on `listener` (bound at `path`). Each client sends one
/// request line: `stats` (or nothing) gets the JSON report; `take-over 1 …` is served by
/// `offer` when there is one ([`crate::takeover`]). A listener `taken_over` from a running
/// macvhost is served once [`ControlSocket::start`] is called.
pub fn serve_control_on(
    path: &Path,
    listener: UnixListener,
    src: StatsSource,
    offer: Option<Arc<crate::takeover::Offer>>,
    taken_over: bool,
) -> Result<ControlSocket, ControlError> {
    let served = offer.clone();
    let (gate, gated) = std::sync::mpsc::channel::<()>();
    let gate = taken_over.then_some(gate);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            // Dropped without a start (the take-over failed): serve nothing.
            if taken_over && gated.recv().is_err() {
                return;
            }
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(REQUEST_WAIT));
                let request = crate::takeover::read_line(&mut conn, 64).unwrap_or_default();
                match &served {
                    Some(o) if request.starts_with(crate::takeover::REQUEST) => {
                        o.serve(conn, &request);
                        continue;
                    }
                    _ => {}
                }
                let body = serde_json::to_string(&src.report()).unwrap_or_default();
                let _ = conn.write_all(body.as_bytes());
                let _ = conn.write_all(b"\n");
            }
        })
        .map_err(|source| ControlError::Listen {
            what: path.display().to_string(),
            source,
        })?;
    Ok(ControlSocket {
        path: path.to_path_buf(),
        offer,
        gate,
    })
}

/// Binds the Prometheus endpoint's listener.
pub fn bind_metrics(addr: SocketAddr) -> Result<TcpListener, ControlError> {
    TcpListener::bind(addr).map_err(|source| ControlError::Listen {
        what: addr.to_string(),
        source,
    })
}

/// Starts the Prometheus endpoint thread (plain HTTP/1.0, any path answers the metrics).
pub fn serve_metrics(addr: SocketAddr, src: StatsSource) -> Result<SocketAddr, ControlError> {
    serve_metrics_on(bind_metrics(addr)?, src)
}

/// [`serve_metrics`] on a listener already bound (or handed over by `--take-over`).
pub fn serve_metrics_on(
    listener: TcpListener,
    src: StatsSource,
) -> Result<SocketAddr, ControlError> {
    let bound = listener
        .local_addr()
        .map_err(|source| ControlError::Listen {
            what: "the metrics listener".into(),
            source,
        })?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                // Read the request head so well-behaved clients see a complete exchange.
                let mut reader = BufReader::new(&mut conn);
                let mut line = String::new();
                while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                    line.clear();
                }
                let body = src.prometheus();
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
            }
        })
        .map_err(|source| ControlError::Listen {
            what: bound.to_string(),
            source,
        })?;
    Ok(bound)
}

/// Client side of `macvhost stats PATH`.
pub fn fetch_stats(path: &Path) -> Result<StatsReport, ControlError> {
    let mut conn = UnixStream::connect(path).map_err(|source| ControlError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    // Said at once, so the answer does not wait for the request timeout.
    let _ = conn.write_all(format!("{STATS_REQUEST}\n").as_bytes());
    let mut body = String::new();
    conn.read_to_string(&mut body)
        .map_err(|source| ControlError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
    serde_json::from_str(&body).map_err(|e| ControlError::BadAnswer {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Renders a report as a table: one row per counter, one column per queue pair, plus a total.
pub fn render_table(r: &StatsReport) -> String {
    let mut out = format!("macvhost on {}\n", r.iface);
    let Some(first) = r.queues.first() else {
        return out;
    };
    out.push_str(&format!("{:<26}", "counter"));
    for q in &r.queues {
        out.push_str(&format!("{:>14}", format!("qp{}", q.queue_pair)));
    }
    out.push_str(&format!("{:>14}\n", "total"));
    for name in first.counters.keys() {
        out.push_str(&format!("{name:<26}"));
        let mut total = 0u64;
        for q in &r.queues {
            let v = q.counters.get(name).copied().unwrap_or(0);
            total += v;
            out.push_str(&format!("{v:>14}"));
        }
        out.push_str(&format!("{total:>14}\n"));
    }
    if !r.device.is_empty() {
        out.push_str("\ndevice\n");
        for (name, v) in &r.device {
            out.push_str(&format!("{name:<26}{v:>14}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> StatsSource {
        let a = Arc::new(QueueStats::default());
        let b = Arc::new(QueueStats::default());
        QueueStats::add(&a.tx_frames, 5);
        QueueStats::add(&b.tx_frames, 7);
        QueueStats::inc(&b.tx_drop_bad_chain);
        StatsSource::new("mvt0", vec![a, b])
    }

    #[test]
    fn control_socket_round_trip_and_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let _guard = serve_control_socket(&path, source()).unwrap();
        let report = fetch_stats(&path).unwrap();
        assert_eq!(report.iface, "mvt0");
        assert_eq!(report.queues.len(), 2);
        assert_eq!(report.queues[1].counters["tx_frames"], 7);
        assert_eq!(report.queues[1].counters["tx_drop_bad_chain"], 1);
        let table = render_table(&report);
        let row = table.lines().find(|l| l.starts_with("tx_frames")).unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            ["tx_frames", "5", "7", "12"]
        );
    }

    #[test]
    fn a_client_that_sends_no_request_still_gets_the_stats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let _guard = serve_control_socket(&path, source()).unwrap();
        // What `socat` or an older `macvhost stats` does: connect and read.
        let mut conn = UnixStream::connect(&path).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).unwrap();
        let report: StatsReport = serde_json::from_str(&body).unwrap();
        assert_eq!(report.iface, "mvt0");
    }

    #[test]
    fn stats_client_names_the_path_when_nothing_listens() {
        let err = fetch_stats(Path::new("/nonexistent/macvhost.sock")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/macvhost.sock"));
    }

    #[test]
    fn prometheus_exposition_has_per_queue_series() {
        let addr = serve_metrics("127.0.0.1:0".parse().unwrap(), source()).unwrap();
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        conn.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.0 200 OK"));
        assert!(body.contains("# TYPE macvhost_tx_frames counter"));
        assert!(body.contains("macvhost_tx_frames{iface=\"mvt0\",queue_pair=\"1\"} 7"));
        assert!(body.contains("# TYPE macvhost_mcast_groups gauge"));
        assert!(body.contains("macvhost_mcast_joins{iface=\"mvt0\"} 0"));
    }
}
