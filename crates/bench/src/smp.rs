//! Service Mesh Performance (SMP) documents.
//!
//! * [`PerformanceTestResult`]: what `--out FILE` writes, with exactly the proto3-JSON field
//!   names SPEC §8 lists (`smpVersion`, `id`, `labels`, `startTime`, `endTime`, `latenciesMs`,
//!   `actualQPS`, `detailsUri`); JSON when the file ends in `.json`, YAML otherwise.
//! * [`Details`]: Plexus's extras (full histograms, errors by kind, settings, environment) in
//!   the sibling file `detailsUri` names.
//! * [`PerformanceTestConfig`]: an SMP test profile (`plexus bench --profile FILE`).
//!
//! Reading accepts the proto field names too (`smp_version`, `actual_QPS`, ...), as proto3
//! JSON parsers do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::env::Environment;
use crate::error::{BenchError, ErrorKind};
use crate::recorder::histogram;
use crate::result::{RunResult, ms};

/// The SMP version these documents follow.
pub const SMP_VERSION: &str = "v0.0.1";

/// SMP `PerformanceTestResult` (proto3 JSON field names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerformanceTestResult {
    #[serde(alias = "smp_version")]
    pub smp_version: String,
    pub id: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 UTC.
    #[serde(alias = "start_time")]
    pub start_time: String,
    /// RFC 3339 UTC.
    #[serde(alias = "end_time")]
    pub end_time: String,
    #[serde(alias = "latencies_ms")]
    pub latencies_ms: LatenciesMs,
    /// Completed requests ÷ measured seconds (warm-up excluded).
    #[serde(rename = "actualQPS", alias = "actual_QPS")]
    pub actual_qps: f64,
    /// The sibling file with [`Details`] (relative to this file's directory).
    #[serde(alias = "details_uri")]
    pub details_uri: String,
}

/// SMP `PerformanceTestResult.Latency`, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatenciesMs {
    pub min: f64,
    pub average: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Percentiles of one histogram, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub min: f64,
    pub mean: f64,
    pub stdev: f64,
    pub p50: f64,
    pub p75: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(rename = "p99.9")]
    pub p999: f64,
    #[serde(rename = "p99.99")]
    pub p9999: f64,
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of a µs histogram.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let q = |q: f64| ms(h.value_at_quantile(q));
        Percentiles {
            min: ms(h.min()),
            mean: h.mean() / 1000.0,
            stdev: h.stdev() / 1000.0,
            p50: q(0.5),
            p75: q(0.75),
            p90: q(0.9),
            p99: q(0.99),
            p999: q(0.999),
            p9999: q(0.9999),
            max: ms(h.max()),
        }
    }
}

/// A histogram written out in full: every non-empty bucket as `[value_us, count]`, `value_us`
/// being the bucket's highest equivalent value (recording it again lands in the same bucket).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistogramDump {
    /// Always `us` (microseconds).
    pub unit: String,
    pub significant_digits: u8,
    pub total_count: u64,
    pub buckets: Vec<[u64; 2]>,
}

impl HistogramDump {
    /// Dumps `h`.
    pub fn of(h: &Histogram<u64>) -> HistogramDump {
        HistogramDump {
            unit: "us".into(),
            significant_digits: h.sigfig(),
            total_count: h.len(),
            buckets: h.iter_recorded().map(|v| [v.value_iterated_to(), v.count_at_value()]).collect(),
        }
    }

    /// Rebuilds the histogram.
    pub fn histogram(&self) -> Histogram<u64> {
        let mut h = histogram();
        for [value, count] in &self.buckets {
            let _ = h.record_n((*value).max(1), *count);
        }
        h
    }
}

/// Plexus's extras of one result (`detailsUri`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Details {
    /// The `id` of the result this belongs to.
    pub result_id: String,
    /// `constant-rate` (open model, corrected) or `closed-loop` (max throughput, uncorrected).
    pub mode: String,
    /// Whether `latencyMs`/`histogram` are corrected for coordinated omission.
    pub corrected: bool,
    pub url: String,
    pub protocol: String,
    pub keepalive: bool,
    pub connections: usize,
    pub streams_per_connection: usize,
    pub threads: usize,
    /// `null` in closed-loop mode.
    pub requested_qps: Option<f64>,
    pub actual_qps: f64,
    pub duration_seconds: f64,
    pub warmup_seconds: f64,
    /// Requests the schedule intended in the measured window (open model).
    pub planned: Option<u64>,
    pub sent: u64,
    pub completed: u64,
    /// Planned but never sent: the target or the generator fell behind.
    pub unsent: u64,
    /// Failed requests by kind (`connect`, `timeout`, `reset`, `protocol`, `http_503`, `grpc_14`).
    pub errors: BTreeMap<String, u64>,
    /// From the intended send time (corrected) in constant-rate mode.
    pub latency_ms: Percentiles,
    /// From the actual send time: what a closed-loop tool would report.
    pub service_time_ms: Percentiles,
    /// How late requests were sent relative to their intended time.
    pub send_lag_ms: Percentiles,
    pub histogram: HistogramDump,
    pub service_time_histogram: HistogramDump,
    /// CPU seconds the generator used during the run.
    pub generator_cpu_seconds: Option<f64>,
    pub environment: Environment,
}

/// A new random result id (UUID version 4 text).
pub fn new_id() -> String {
    let a = fastrand::u64(..);
    let b = fastrand::u64(..);
    let b = (b & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    let a = (a & 0xffff_ffff_ffff_0fff) | 0x0000_0000_0000_4000;
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// Builds both documents for `result`; `details_uri` is where the details file will be.
pub fn documents(
    result: &RunResult,
    env: &Environment,
    mut labels: BTreeMap<String, String>,
    details_uri: &str,
) -> (PerformanceTestResult, Details) {
    let id = new_id();
    labels.insert("plexus.io/mode".into(), result.load.mode().into());
    labels.insert("plexus.io/protocol".into(), result.protocol.as_str().into());
    labels.insert("plexus.io/connections".into(), result.connections.to_string());
    if let Some(rate) = result.load.rate() {
        labels.insert("plexus.io/requested-qps".into(), format_number(rate));
    }
    for (k, v) in env.labels() {
        labels.entry(k).or_insert(v);
    }
    let smp = PerformanceTestResult {
        smp_version: SMP_VERSION.into(),
        id: id.clone(),
        labels,
        start_time: plexus_core::time::rfc3339(result.start_time),
        end_time: plexus_core::time::rfc3339(result.end_time),
        latencies_ms: LatenciesMs {
            min: result.min_ms(),
            average: result.mean_ms(),
            p50: result.quantile_ms(0.5),
            p90: result.quantile_ms(0.9),
            p99: result.quantile_ms(0.99),
            max: result.max_ms(),
        },
        actual_qps: result.actual_qps(),
        details_uri: details_uri.into(),
    };
    let details = Details {
        result_id: id,
        mode: result.load.mode().into(),
        corrected: result.corrected(),
        url: result.url.clone(),
        protocol: result.protocol.as_str().into(),
        keepalive: result.keepalive,
        connections: result.connections,
        streams_per_connection: result.streams,
        threads: result.threads,
        requested_qps: result.load.rate(),
        actual_qps: result.actual_qps(),
        duration_seconds: result.duration.as_secs_f64(),
        warmup_seconds: result.warmup.as_secs_f64(),
        planned: result.planned,
        sent: result.sent,
        completed: result.completed,
        unsent: result.unsent,
        errors: result.errors.iter().map(|(k, n)| (k.key(), *n)).collect(),
        latency_ms: Percentiles::of(&result.latency),
        service_time_ms: Percentiles::of(&result.service),
        send_lag_ms: Percentiles::of(&result.lag),
        histogram: HistogramDump::of(&result.latency),
        service_time_histogram: HistogramDump::of(&result.service),
        generator_cpu_seconds: result.generator_cpu.map(|d| d.as_secs_f64()),
        environment: env.clone(),
    };
    (smp, details)
}

/// `200`, `12.5`: a number without a useless `.0`.
fn format_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 { format!("{}", x as i64) } else { format!("{x}") }
}

/// Whether `path` is written as JSON (`.json`) rather than YAML.
pub fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// The details file beside `out`: `run.yaml` → `run.details.yaml`, `run.json` → `run.details.json`.
pub fn details_path(out: &Path) -> PathBuf {
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "bench".into());
    let ext = if is_json(out) { "json" } else { "yaml" };
    out.with_file_name(format!("{stem}.details.{ext}"))
}

fn file_error(path: &Path, why: impl ToString) -> BenchError {
    BenchError::File { path: path.display().to_string(), why: why.to_string() }
}

/// Serializes `value` as JSON or YAML (by `path`'s extension) and writes it.
pub fn write_document<T: Serialize>(path: &Path, value: &T) -> Result<(), BenchError> {
    let text = if is_json(path) {
        serde_json::to_string_pretty(value).map(|s| s + "\n").map_err(|e| file_error(path, e))?
    } else {
        serde_saphyr::to_string(value).map_err(|e| file_error(path, e))?
    };
    std::fs::write(path, text).map_err(|e| file_error(path, e))
}

/// Reads a JSON or YAML document (JSON is tried first when the text starts with `{`).
pub fn read_document<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    if text.trim_start().starts_with('{') {
        serde_json::from_str(&text).map_err(|e| file_error(path, e))
    } else {
        serde_saphyr::from_str(&text).map_err(|e| file_error(path, e))
    }
}

/// Writes `result` to `out` and its details beside it; returns the SMP document.
pub fn write_result(
    out: &Path,
    result: &RunResult,
    env: &Environment,
    labels: BTreeMap<String, String>,
) -> Result<PerformanceTestResult, BenchError> {
    let details_file = details_path(out);
    let uri = details_file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (smp, details) = documents(result, env, labels, &uri);
    write_document(&details_file, &details)?;
    write_document(out, &smp)?;
    Ok(smp)
}

/// A result read back, with its details when the `detailsUri` file is there.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub result: PerformanceTestResult,
    pub details: Option<Details>,
}

/// Reads a result file and the details file its `detailsUri` names (relative to the result's
/// directory, or a `file://` URI). Missing details are not an error (another tool's SMP
/// result has none); unreadable ones are.
pub fn read_result(path: &Path) -> Result<Loaded, BenchError> {
    let result: PerformanceTestResult = read_document(path)?;
    let uri = result.details_uri.trim();
    let details = if uri.is_empty() || uri.contains("://") && !uri.starts_with("file://") {
        None
    } else {
        let p = Path::new(uri.strip_prefix("file://").unwrap_or(uri));
        let p = if p.is_absolute() { p.to_path_buf() } else { path.with_file_name(p) };
        if p.exists() { Some(read_document::<Details>(&p)?) } else { None }
    };
    Ok(Loaded { result, details })
}

/// SMP `PerformanceTestConfig`: a test profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PerformanceTestConfig {
    #[serde(default, alias = "smp_version", alias = "smpsVersion", alias = "smps_version")]
    pub smp_version: String,
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Load generators, run at the same time.
    #[serde(default)]
    pub clients: Vec<Client>,
    /// How long the endpoints are under load (`30s`, `1m`).
    #[serde(default)]
    pub duration: String,
}

/// SMP `PerformanceTestConfig.Client`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Client {
    pub internal: bool,
    #[serde(alias = "load_generator")]
    pub load_generator: String,
    pub protocol: ClientProtocol,
    pub connections: i32,
    /// Requests per second for this client (all its endpoints together); 0: max throughput.
    #[serde(deserialize_with = "int64")]
    pub rps: i64,
    pub headers: BTreeMap<String, String>,
    pub cookies: BTreeMap<String, String>,
    pub body: String,
    #[serde(alias = "content_type")]
    pub content_type: String,
    #[serde(alias = "endpoint_url", alias = "endpointUrls")]
    pub endpoint_url: Vec<String>,
}

/// SMP `PerformanceTestConfig.Client.Protocol` (by name or number, as proto3 JSON allows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientProtocol {
    #[default]
    Http,
    Tcp,
    Udp,
    Grpc,
}

impl Serialize for ClientProtocol {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(match self {
            ClientProtocol::Http => "http",
            ClientProtocol::Tcp => "tcp",
            ClientProtocol::Udp => "udp",
            ClientProtocol::Grpc => "grpc",
        })
    }
}

impl<'de> Deserialize<'de> for ClientProtocol {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Repr {
            Name(String),
            Number(i64),
        }
        let p = match Repr::deserialize(d)? {
            Repr::Name(n) => match n.to_ascii_lowercase().as_str() {
                "http" => ClientProtocol::Http,
                "tcp" => ClientProtocol::Tcp,
                "udp" => ClientProtocol::Udp,
                "grpc" => ClientProtocol::Grpc,
                other => return Err(serde::de::Error::custom(format!("unknown protocol {other:?}"))),
            },
            Repr::Number(0) => ClientProtocol::Http,
            Repr::Number(1) => ClientProtocol::Tcp,
            Repr::Number(2) => ClientProtocol::Udp,
            Repr::Number(3) => ClientProtocol::Grpc,
            Repr::Number(n) => return Err(serde::de::Error::custom(format!("unknown protocol number {n}"))),
        };
        Ok(p)
    }
}

/// proto3 JSON writes int64 as a string; accept both.
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(i64),
        Text(String),
    }
    match Repr::deserialize(d)? {
        Repr::Number(n) => Ok(n),
        Repr::Text(t) => t.trim().parse().map_err(|_| serde::de::Error::custom(format!("invalid int64 {t:?}"))),
    }
}

impl Details {
    /// The corrected latency histogram.
    pub fn latency_histogram(&self) -> Histogram<u64> {
        self.histogram.histogram()
    }

    /// Errors with their kinds parsed (unknown keys are kept out).
    pub fn error_kinds(&self) -> BTreeMap<ErrorKind, u64> {
        self.errors.iter().filter_map(|(k, n)| Some((ErrorKind::from_key(k)?, *n))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_look_like_uuids() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert_ne!(new_id(), id);
    }

    #[test]
    fn details_path_is_a_sibling() {
        assert_eq!(details_path(Path::new("/tmp/a/run.json")), PathBuf::from("/tmp/a/run.details.json"));
        assert_eq!(details_path(Path::new("run.yaml")), PathBuf::from("run.details.yaml"));
        assert_eq!(details_path(Path::new("out")), PathBuf::from("out.details.yaml"));
    }

    #[test]
    fn histogram_dump_round_trips() {
        let mut h = histogram();
        for v in [1u64, 20_000, 20_013, 20_500, 1_000_000, 1_000_001] {
            h.record(v).expect("record");
        }
        let dump = HistogramDump::of(&h);
        let back = dump.histogram();
        assert_eq!(back.len(), h.len());
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q));
        }
        assert_eq!(HistogramDump::of(&back), dump);
    }

    #[test]
    fn profile_accepts_proto_and_json_names() {
        let yaml = "smpVersion: v0.0.1\nname: t\nduration: 5s\nclients:\n  - protocol: grpc\n    rps: \"200\"\n    connections: 4\n    endpoint_url: [\"http://127.0.0.1:1/a.B/C\"]\n";
        let p: PerformanceTestConfig = serde_saphyr::from_str(yaml).expect("profile");
        assert_eq!(p.clients[0].rps, 200);
        assert_eq!(p.clients[0].protocol, ClientProtocol::Grpc);
        assert_eq!(p.clients[0].endpoint_url.len(), 1);
        let json = r#"{"smp_version":"v0.0.1","clients":[{"protocol":0,"rps":50,"endpointUrl":["http://x/"]}],"duration":"1m"}"#;
        let p: PerformanceTestConfig = serde_json::from_str(json).expect("profile");
        assert_eq!(p.clients[0].protocol, ClientProtocol::Http);
        assert!(serde_json::from_str::<PerformanceTestConfig>(r#"{"clientz":[]}"#).is_err(), "typos are errors");
    }
}
