//! Token-bucket rate limiting with libvirt `<bandwidth>` semantics, plus a packets-per-second
//! limit. Pure arithmetic: no I/O, no clock, no allocation; every call is O(1). The caller passes
//! the time (nanoseconds from any fixed origin, e.g. `CLOCK_MONOTONIC`), which makes the limiter
//! deterministic and testable.
//!
//! # Semantics
//! - `average` (bytes/s): the long-term rate. A bucket of `burst` bytes fills at `average`.
//! - `burst` (bytes): how far traffic may run ahead of `average`. Without `peak`, a full bucket
//!   lets `burst` bytes through at once. Default: 10 ms of `average`, at least one full-size
//!   Ethernet frame (1514 bytes).
//! - `peak` (bytes/s): the highest rate while bursting: a second bucket of 1 ms of `peak` (at
//!   least 1514 bytes) fills at `peak`. Draining the `burst` bucket at `peak` while it refills
//!   at `average` means `burst * peak / (peak - average)` bytes go out at `peak` before the rate
//!   falls back to `average` (HTB's rate/ceil/burst, which libvirt programs, behaves the same).
//! - `pps` (frames/s): a third bucket of 10 ms of `pps` frames (at least 1) fills at `pps`
//!   (Firecracker's "ops" bucket).
//!
//! libvirt's XML counts KiB and KiB/s; [`RateSpec`] counts bytes and bytes/s.
//!
//! A frame passes when every bucket holds enough for it, **or is full**: a frame larger than a
//! bucket still passes once that bucket has filled up, and the bucket goes into debt, which later
//! frames wait out. So nothing stalls forever and the long-term rate stays exact.
//!
//! Tokens are kept as `units × 10⁹` (unit·ns/s) in 128-bit integers, so refilling
//! `rate × elapsed_ns` is exact and [`RateLimiter::wait_ns`] agrees with
//! [`RateLimiter::try_consume`] to the nanosecond.

use std::fmt;
use std::str::FromStr;

const NS_PER_SEC: u64 = 1_000_000_000;
/// Smallest byte bucket: one full-size Ethernet frame without FCS.
pub const MIN_BUCKET_BYTES: u64 = 1514;
/// Default `burst`: this much time at `average`.
pub const DEFAULT_BURST_NS: u64 = 10_000_000;
/// Size of the peak bucket: this much time at `peak`.
pub const PEAK_BUCKET_NS: u64 = 1_000_000;
/// Size of the packet bucket: this much time at `pps`.
pub const PPS_BUCKET_NS: u64 = 10_000_000;

/// A rate limit, as given on the command line: `average=BYTES/S[,peak=BYTES/S][,burst=BYTES]
/// [,pps=FRAMES/S]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateSpec {
    /// Long-term rate, bytes per second (> 0).
    pub average: u64,
    /// Highest rate while bursting, bytes per second (>= `average`).
    pub peak: Option<u64>,
    /// Bytes that may run ahead of `average` (> 0).
    pub burst: Option<u64>,
    /// Frames per second (> 0).
    pub pps: Option<u64>,
}

/// A `RateSpec` string the operator got wrong; names the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit key {key:?}: {reason}")]
pub struct RateSpecError {
    /// The key at fault (`average`, `peak`, `burst`, `pps`, or what was given).
    pub key: String,
    /// What is wrong with its value.
    pub reason: String,
}

impl RateSpec {
    /// Checks the relations between the values (what `FromStr` enforces).
    pub fn validate(&self) -> Result<(), RateSpecError> {
        let err = |key: &str, reason: String| {
            Err(RateSpecError {
                key: key.to_owned(),
                reason,
            })
        };
        if self.average == 0 {
            return err(
                "average",
                "must be > 0 bytes/s (leave the limit out for no limit)".into(),
            );
        }
        for (key, v) in [
            ("peak", self.peak),
            ("burst", self.burst),
            ("pps", self.pps),
        ] {
            if v == Some(0) {
                return err(key, "must be > 0".into());
            }
        }
        if let Some(peak) = self.peak {
            if peak < self.average {
                return err(
                    "peak",
                    format!(
                        "{peak} is below average ({}); peak must be >= average",
                        self.average
                    ),
                );
            }
        }
        Ok(())
    }
}

impl FromStr for RateSpec {
    type Err = RateSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |key: &str, reason: &str| RateSpecError {
            key: key.to_owned(),
            reason: reason.to_owned(),
        };
        let mut average = None;
        let mut spec = RateSpec {
            average: 0,
            peak: None,
            burst: None,
            pps: None,
        };
        for item in s.split(',').map(str::trim) {
            if item.is_empty() {
                return Err(err(
                    "",
                    &format!("empty item in {s:?}; expected key=value[,key=value...]"),
                ));
            }
            let Some((key, value)) = item.split_once('=') else {
                return Err(err(item, "expected key=value"));
            };
            let (key, value) = (key.trim(), value.trim());
            let slot = match key {
                "average" => &mut average,
                "peak" => &mut spec.peak,
                "burst" => &mut spec.burst,
                "pps" => &mut spec.pps,
                _ => {
                    return Err(err(
                        key,
                        "unknown key; expected average, peak, burst or pps",
                    ))
                }
            };
            if slot.is_some() {
                return Err(err(key, "given twice"));
            }
            let n: u64 = value.parse().map_err(|_| {
                err(
                    key,
                    &format!("{value:?} is not a whole number (bytes, bytes/s or frames/s)"),
                )
            })?;
            *slot = Some(n);
        }
        spec.average = average.ok_or_else(|| err("average", "is required"))?;
        spec.validate()?;
        Ok(spec)
    }
}

impl fmt::Display for RateSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "average={}", self.average)?;
        for (key, v) in [
            ("peak", self.peak),
            ("burst", self.burst),
            ("pps", self.pps),
        ] {
            if let Some(v) = v {
                write!(f, ",{key}={v}")?;
            }
        }
        Ok(())
    }
}

/// One token bucket. Tokens are `units × 10⁹`; negative means debt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket {
    /// Units per second.
    rate: u64,
    /// Capacity in units.
    cap_units: u64,
    /// Capacity, scaled.
    cap: i128,
    /// Level, scaled, as of `RateLimiter::last_ns`.
    tokens: i128,
}

impl Bucket {
    /// A full bucket of `cap_units` filling at `rate` units/s (both > 0).
    fn new(rate: u64, cap_units: u64) -> Bucket {
        let cap = i128::from(cap_units) * i128::from(NS_PER_SEC);
        Bucket {
            rate,
            cap_units,
            cap,
            tokens: cap,
        }
    }

    /// The level `dt_ns` after the last update.
    fn level_after(&self, dt_ns: u64) -> i128 {
        let room = self.cap - self.tokens;
        if room <= 0 {
            return self.tokens;
        }
        // u64 × u64 always fits u128; an `add` beyond i128 is beyond `room` too.
        let add = u128::from(self.rate) * u128::from(dt_ns);
        match i128::try_from(add) {
            Ok(add) if add < room => self.tokens + add,
            _ => self.cap,
        }
    }

    /// Scaled tokens a frame of `units` needs: all of them, or a full bucket if it is bigger.
    fn need(&self, units: u64) -> i128 {
        i128::from(units.min(self.cap_units)) * i128::from(NS_PER_SEC)
    }

    /// Nanoseconds from `level` until `units` fit.
    fn wait_from(&self, level: i128, units: u64) -> u64 {
        let short = match u128::try_from(self.need(units) - level) {
            Ok(short) if short > 0 => short,
            _ => return 0,
        };
        let rate = u128::from(self.rate);
        u64::try_from(short.div_ceil(rate)).unwrap_or(u64::MAX)
    }
}

/// The limiter for one direction of one queue (or device). See the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimiter {
    spec: RateSpec,
    bytes: Bucket,
    peak: Option<Bucket>,
    packets: Option<Bucket>,
    /// Time of the last update; earlier times passed later count as this one.
    last_ns: u64,
}

impl RateLimiter {
    /// A limiter with full buckets at time 0. `spec` should be valid ([`RateSpec::validate`]);
    /// zero values are raised to 1 rather than dividing by zero.
    pub fn new(spec: RateSpec) -> Self {
        let average = spec.average.max(1);
        let burst = spec
            .burst
            .unwrap_or_else(|| time_at_rate(average, DEFAULT_BURST_NS).max(MIN_BUCKET_BYTES))
            .max(1);
        let peak = spec.peak.map(|p| {
            let p = p.max(1);
            Bucket::new(p, time_at_rate(p, PEAK_BUCKET_NS).max(MIN_BUCKET_BYTES))
        });
        let packets = spec.pps.map(|p| {
            let p = p.max(1);
            Bucket::new(p, time_at_rate(p, PPS_BUCKET_NS).max(1))
        });
        RateLimiter {
            spec,
            bytes: Bucket::new(average, burst),
            peak,
            packets,
            last_ns: 0,
        }
    }

    /// The limits this limiter enforces, as the operator gave them.
    pub fn spec(&self) -> &RateSpec {
        &self.spec
    }

    /// Byte-bucket capacity (`burst`, or its default).
    pub fn burst_bytes(&self) -> u64 {
        self.bytes.cap_units
    }

    /// Takes one frame of `bytes` at `now_ns` if every bucket allows it; `false` means over the
    /// limit: hold the frame and retry after [`RateLimiter::wait_ns`].
    pub fn try_consume(&mut self, now_ns: u64, bytes: u64) -> bool {
        let now = now_ns.max(self.last_ns);
        let dt = now - self.last_ns;
        self.last_ns = now;
        self.bytes.tokens = self.bytes.level_after(dt);
        let mut ok = self.bytes.tokens >= self.bytes.need(bytes);
        for (b, units) in [(&mut self.peak, bytes), (&mut self.packets, 1)] {
            if let Some(b) = b {
                b.tokens = b.level_after(dt);
                ok &= b.tokens >= b.need(units);
            }
        }
        if ok {
            self.bytes.tokens -= i128::from(bytes) * i128::from(NS_PER_SEC);
            if let Some(b) = &mut self.peak {
                b.tokens -= i128::from(bytes) * i128::from(NS_PER_SEC);
            }
            if let Some(b) = &mut self.packets {
                b.tokens -= i128::from(NS_PER_SEC);
            }
        }
        ok
    }

    /// Charges a frame of `bytes` that already passed (the RX side learns a frame's size only
    /// after reading it), going into debt if need be; later frames wait the debt off.
    pub fn consume(&mut self, now_ns: u64, bytes: u64) {
        let now = now_ns.max(self.last_ns);
        let dt = now - self.last_ns;
        self.last_ns = now;
        self.bytes.tokens = self.bytes.level_after(dt) - i128::from(bytes) * i128::from(NS_PER_SEC);
        if let Some(b) = &mut self.peak {
            b.tokens = b.level_after(dt) - i128::from(bytes) * i128::from(NS_PER_SEC);
        }
        if let Some(b) = &mut self.packets {
            b.tokens = b.level_after(dt) - i128::from(NS_PER_SEC);
        }
    }

    /// Nanoseconds from `now_ns` until a frame of `bytes` passes; 0 when it would pass now.
    /// `try_consume(now_ns + wait_ns(now_ns, bytes), bytes)` succeeds (with no other
    /// `try_consume` in between), and fails at any earlier time.
    pub fn wait_ns(&self, now_ns: u64, bytes: u64) -> u64 {
        // Times before the last update count as the last update.
        let behind = self.last_ns.saturating_sub(now_ns);
        let dt = now_ns.saturating_sub(self.last_ns);
        let mut wait = self.bytes.wait_from(self.bytes.level_after(dt), bytes);
        for (b, units) in [(&self.peak, bytes), (&self.packets, 1)] {
            if let Some(b) = b {
                wait = wait.max(b.wait_from(b.level_after(dt), units));
            }
        }
        if wait == 0 {
            0
        } else {
            wait.saturating_add(behind)
        }
    }
}

/// Units that `rate` units/s gives in `ns` nanoseconds (rounded down).
fn time_at_rate(rate: u64, ns: u64) -> u64 {
    u64::try_from(u128::from(rate) * u128::from(ns) / u128::from(NS_PER_SEC)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_after_the_fact_keeps_the_long_term_rate() {
        // RX style: admit while not in debt, charge the real size afterwards.
        let spec: RateSpec = "average=1000000".parse().unwrap();
        let mut l = RateLimiter::new(spec);
        let (mut now, mut sent) = (0u64, 0u64);
        while now < 10 * NS_PER_SEC {
            if l.wait_ns(now, 1) == 0 {
                l.consume(now, 1500);
                sent += 1500;
            } else {
                now += l.wait_ns(now, 1);
            }
        }
        let rate = sent as f64 / 10.0;
        assert!((rate - 1e6).abs() / 1e6 < 0.01, "rate {rate}");
    }

    const SEC: u64 = NS_PER_SEC;

    fn spec(average: u64) -> RateSpec {
        RateSpec {
            average,
            peak: None,
            burst: None,
            pps: None,
        }
    }

    /// A sender with an endless queue of `frame`-byte frames that always sleeps exactly
    /// `wait_ns` (a perfect timer): returns (bytes, frames) sent in `[0, until_ns)`.
    fn run_greedy(rl: &mut RateLimiter, frame: u64, until_ns: u64) -> (u64, u64) {
        let (mut t, mut bytes, mut frames) = (0u64, 0u64, 0u64);
        while t < until_ns {
            if rl.try_consume(t, frame) {
                bytes += frame;
                frames += 1;
            } else {
                let w = rl.wait_ns(t, frame);
                assert!(w > 0, "refused at {t} but wait_ns is 0");
                t += w;
            }
        }
        (bytes, frames)
    }

    /// Like `run_greedy`, but the sender only looks every `tick_ns` (a coarse timer).
    fn run_ticked(rl: &mut RateLimiter, frame: u64, tick_ns: u64, until_ns: u64) -> u64 {
        let mut bytes = 0;
        let mut t = 0;
        while t < until_ns {
            while rl.try_consume(t, frame) {
                bytes += frame;
            }
            t += tick_ns;
        }
        bytes
    }

    fn assert_within(got: f64, want: f64, tolerance: f64, what: &str) {
        let err = (got - want).abs() / want;
        assert!(
            err <= tolerance,
            "{what}: got {got:.0}, want {want:.0} (off by {:.3}%)",
            err * 100.0
        );
    }

    #[test]
    fn long_term_rate_is_average_for_small_mtu_and_huge_frames() {
        for average in [1_000_000u64, 10_000_000] {
            for frame in [64u64, 1500, 65536] {
                let secs = 20;
                let mut rl = RateLimiter::new(spec(average));
                let (bytes, _) = run_greedy(&mut rl, frame, secs * SEC);
                let rate = bytes as f64 / secs as f64;
                assert_within(
                    rate,
                    average as f64,
                    0.01,
                    &format!("{average} B/s, {frame} B"),
                );

                let mut rl = RateLimiter::new(spec(average));
                let bytes = run_ticked(&mut rl, frame, 100_000, secs * SEC);
                let rate = bytes as f64 / secs as f64;
                assert_within(
                    rate,
                    average as f64,
                    0.01,
                    &format!("{average} B/s, {frame} B, 100 us ticks"),
                );
            }
        }
    }

    #[test]
    fn burst_passes_at_once_then_average() {
        let average = 1_000_000;
        let burst = 65_536;
        let mut rl = RateLimiter::new(RateSpec {
            burst: Some(burst),
            ..spec(average)
        });
        assert_eq!(rl.burst_bytes(), burst);
        // At t = 0, a full bucket: `burst` bytes go at once, to within one frame.
        let mut at_once = 0;
        while rl.try_consume(0, 1500) {
            at_once += 1500;
        }
        assert!(
            at_once <= burst && at_once > burst - 1500,
            "{at_once} at once"
        );
        // Then exactly the average: 10 s worth of 1500-byte frames.
        let mut t = 0;
        let mut later = 0u64;
        while t < 10 * SEC {
            if rl.try_consume(t, 1500) {
                later += 1500;
            } else {
                t += rl.wait_ns(t, 1500);
            }
        }
        assert_within(later as f64 / 10.0, average as f64, 0.01, "after the burst");
    }

    #[test]
    fn peak_limits_the_burst_then_rate_falls_to_average() {
        let (average, peak, burst) = (1_000_000u64, 4_000_000u64, 300_000u64);
        let mut rl = RateLimiter::new(RateSpec {
            peak: Some(peak),
            burst: Some(burst),
            ..spec(average)
        });
        let frame = 1500;
        // Record when each frame went out.
        let mut sent_at = Vec::new();
        let mut t = 0;
        while t < 3 * SEC {
            if rl.try_consume(t, frame) {
                sent_at.push(t);
            } else {
                t += rl.wait_ns(t, frame);
            }
        }
        let bytes_in = |from: u64, to: u64| {
            sent_at.iter().filter(|&&s| s >= from && s < to).count() as u64 * frame
        };
        // The burst bucket runs dry after about burst / (peak - average) = 100 ms at peak
        // (a little earlier: the peak bucket's 1 ms head start also came out of it).
        let dry = burst * SEC / (peak - average);
        assert_eq!(dry, 100_000_000);
        let head = time_at_rate(peak, PEAK_BUCKET_NS);
        // While bursting: peak, after the head start.
        assert_within(
            (bytes_in(0, 90_000_000) - head) as f64 / 0.09,
            peak as f64,
            0.01,
            "rate while bursting",
        );
        // No 10 ms window ever exceeds peak by more than the peak bucket and a frame.
        for start in (0..3 * SEC).step_by(1_000_000) {
            let b = bytes_in(start, start + 10_000_000);
            assert!(
                b <= peak / 100 + head + frame,
                "{b} bytes in 10 ms at {start}"
            );
        }
        // After it: average.
        assert_within(
            bytes_in(SEC, 3 * SEC) as f64 / 2.0,
            average as f64,
            0.01,
            "rate after the burst",
        );
        // What went out at peak: burst * peak / (peak - average) = 400 kB.
        assert_within(
            bytes_in(0, dry) as f64,
            (burst * peak / (peak - average)) as f64,
            0.01,
            "bytes at peak",
        );
    }

    #[test]
    fn pps_limits_small_frames() {
        let mut rl = RateLimiter::new(RateSpec {
            pps: Some(10_000),
            ..spec(1_000_000_000)
        });
        let (_, frames) = run_greedy(&mut rl, 64, 10 * SEC);
        assert_within(frames as f64 / 10.0, 10_000.0, 0.01, "frames/s");
        // With big frames the byte limit is the tighter one.
        let mut rl = RateLimiter::new(RateSpec {
            pps: Some(10_000),
            ..spec(1_000_000)
        });
        let (bytes, frames) = run_greedy(&mut rl, 1500, 10 * SEC);
        assert_within(bytes as f64 / 10.0, 1_000_000.0, 0.01, "bytes/s");
        assert!(frames < 10 * 10_000 / 2);
    }

    #[test]
    fn a_frame_bigger_than_every_bucket_still_passes() {
        let mut rl = RateLimiter::new(RateSpec {
            average: 1000,
            peak: Some(2000),
            burst: Some(100),
            pps: Some(1),
        });
        let huge = 1 << 20;
        assert!(rl.try_consume(0, huge), "a full bucket admits one frame");
        // The debt is 1 MiB at 1000 B/s: about 1048 s, then it passes again.
        let w = rl.wait_ns(0, huge);
        assert!(w > 1000 * SEC && w < 1100 * SEC, "{w}");
        assert!(!rl.try_consume(w - 1, huge));
        assert!(rl.try_consume(w, huge));
        // Never stalls: a long run of huge frames keeps going at the average.
        let mut rl = RateLimiter::new(spec(1_000_000));
        let (bytes, _) = run_greedy(&mut rl, 10 << 20, 1000 * SEC);
        assert_within(bytes as f64 / 1000.0, 1_000_000.0, 0.02, "huge frames");
    }

    /// Deterministic pseudo-random numbers (64-bit LCG).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, below: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % below
        }
    }

    #[test]
    fn wait_ns_agrees_with_try_consume() {
        let specs = [
            spec(1_000_000),
            RateSpec {
                burst: Some(3000),
                ..spec(777)
            },
            RateSpec {
                peak: Some(5_000_000),
                burst: Some(200_000),
                pps: Some(3000),
                ..spec(1_000_000)
            },
            RateSpec {
                pps: Some(7),
                ..spec(u64::MAX / 2)
            },
        ];
        let mut rng = Lcg(42);
        for s in specs {
            let mut rl = RateLimiter::new(s);
            let mut t = 0u64;
            for _ in 0..20_000 {
                let bytes = 1 + rng.next(70_000);
                t += rng.next(2_000_000);
                let w = rl.wait_ns(t, bytes);
                let mut probe = rl;
                if w == 0 {
                    assert!(probe.try_consume(t, bytes), "{s}: wait 0 but refused");
                } else {
                    assert!(!probe.try_consume(t, bytes), "{s}: wait {w} but admitted");
                    let mut early = rl;
                    assert!(
                        !early.try_consume(t + w - 1, bytes),
                        "{s}: admitted 1 ns early"
                    );
                    let mut on_time = rl;
                    assert!(on_time.try_consume(t + w, bytes), "{s}: refused after wait");
                }
                // Move on, sometimes sending, sometimes not.
                if rng.next(2) == 0 {
                    rl.try_consume(t, bytes);
                }
            }
        }
    }

    #[test]
    fn time_going_backwards_admits_nothing_extra() {
        let mut rl = RateLimiter::new(RateSpec {
            burst: Some(1500),
            ..spec(1500)
        });
        assert!(rl.try_consume(10 * SEC, 1500));
        assert!(
            !rl.try_consume(5 * SEC, 1500),
            "an earlier time refilled the bucket"
        );
        // Waiting from the earlier time accounts for the gap.
        let w = rl.wait_ns(5 * SEC, 1500);
        assert_eq!(w, 6 * SEC);
        assert!(!rl.try_consume(5 * SEC + w - 1, 1500));
        assert!(rl.try_consume(5 * SEC + w, 1500));
    }

    #[test]
    fn spec_parses_and_prints() {
        let s: RateSpec = "average=1000000,peak=2000000,burst=65536,pps=10000"
            .parse()
            .unwrap();
        assert_eq!(
            s,
            RateSpec {
                average: 1_000_000,
                peak: Some(2_000_000),
                burst: Some(65_536),
                pps: Some(10_000)
            }
        );
        assert_eq!(
            s.to_string(),
            "average=1000000,peak=2000000,burst=65536,pps=10000"
        );
        assert_eq!(s.to_string().parse::<RateSpec>().unwrap(), s);
        let s: RateSpec = " burst = 10 , average=5".parse().unwrap();
        assert_eq!((s.average, s.burst, s.peak), (5, Some(10), None));
    }

    #[test]
    fn spec_errors_name_the_key() {
        for (input, key, says) in [
            ("peak=10", "average", "is required"),
            ("average=0", "average", "must be > 0"),
            ("average=10,burst=0", "burst", "must be > 0"),
            ("average=10,pps=0", "pps", "must be > 0"),
            ("average=10,peak=5", "peak", "below average"),
            ("average=10,average=20", "average", "given twice"),
            ("average=1k", "average", "not a whole number"),
            ("average=-1", "average", "not a whole number"),
            ("average=10,ceil=20", "ceil", "unknown key"),
            ("average", "average", "expected key=value"),
            ("average=10,", "", "empty item"),
        ] {
            let e = input.parse::<RateSpec>().unwrap_err();
            assert_eq!(e.key, key, "{input}: {e}");
            assert!(e.reason.contains(says), "{input}: {e}");
            assert!(e.to_string().contains(&format!("{key:?}")), "{e}");
        }
    }

    #[test]
    fn limiter_is_small_and_copy() {
        // No heap: the whole state is a few words, copied by value.
        assert!(std::mem::size_of::<RateLimiter>() <= 256);
        let rl = RateLimiter::new(spec(1));
        let copy = rl;
        assert_eq!(rl, copy);
    }
}
