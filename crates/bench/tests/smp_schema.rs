//! The SMP result documents checked by a real protobuf JSON parser against the SMP message
//! definitions (`PerformanceTestResult` with its nested `Latency`, as SPEC §8 names them):
//! every field known to the schema, of the right type, timestamps valid, and a round trip
//! through the parser gives the same document back.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use hdrhistogram::Histogram;
use plexus_bench::env::Environment;
use plexus_bench::smp::{self, PerformanceTestResult};
use plexus_bench::{ErrorKind, Load, Protocol, RunResult};
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};

/// The SMP messages a result uses, in proto3 (field names and numbers as the SMP
/// specification defines them; JSON names follow from proto3's rules: `actual_QPS` →
/// `actualQPS`, `details_uri` → `detailsUri`).
const SCHEMA: &str = r#"
syntax = "proto3";
package smp;
import "google/protobuf/timestamp.proto";

message PerformanceTestResult {
  message Latency {
    double min = 1;
    double average = 2;
    double p50 = 3;
    double p90 = 4;
    double p99 = 5;
    double max = 6;
  }
  string smp_version = 1;
  string id = 2;
  map<string, string> labels = 3;
  google.protobuf.Timestamp start_time = 4;
  google.protobuf.Timestamp end_time = 5;
  Latency latencies_ms = 6;
  double actual_QPS = 7;
  string details_uri = 8;
  string testId = 9;
  string meshConfigId = 10;
  string envId = 11;
}
"#;

fn descriptor() -> MessageDescriptor {
    let dir = std::env::temp_dir().join(format!("smp-schema-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("schema dir");
    std::fs::write(dir.join("smp_result.proto"), SCHEMA).expect("write schema");
    let pool: DescriptorPool = protox::Compiler::new([&dir])
        .expect("compiler")
        .open_file("smp_result.proto")
        .expect("schema compiles")
        .descriptor_pool();
    let _ = std::fs::remove_dir_all(&dir);
    pool.get_message_by_name("smp.PerformanceTestResult").expect("message")
}

fn sample_result() -> RunResult {
    let mut latency = Histogram::<u64>::new(3).expect("histogram");
    for v in [20_100u64, 20_250, 20_400, 21_000, 35_000, 1_000_000] {
        latency.record(v).expect("record");
    }
    let start = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123);
    RunResult {
        url: "http://127.0.0.1:9080/productpage".into(),
        protocol: Protocol::Http1,
        load: Load::ConstantRate(200.0),
        keepalive: true,
        connections: 10,
        streams: 1,
        threads: 1,
        duration: Duration::from_secs(10),
        warmup: Duration::from_secs(1),
        start_time: start,
        end_time: start + Duration::from_secs(10),
        drained_after: Duration::from_millis(20),
        planned: Some(2000),
        unsent: 0,
        sent: 2000,
        completed: 1998,
        errors: BTreeMap::from([(ErrorKind::Status(503), 3), (ErrorKind::Timeout, 2)]),
        service: latency.clone(),
        lag: latency.clone(),
        latency,
        generator_cpu: Some(Duration::from_millis(150)),
    }
}

/// Parses `json` as the schema's message (unknown fields are errors) and writes it back as
/// proto3 JSON with every field.
fn through_protobuf(json: &str) -> String {
    let mut de = serde_json::Deserializer::from_str(json);
    let msg = DynamicMessage::deserialize_with_options(descriptor(), &mut de, &DeserializeOptions::new())
        .unwrap_or_else(|e| panic!("not a valid SMP PerformanceTestResult: {e}\n{json}"));
    de.end().expect("one document");
    let mut out = serde_json::Serializer::new(Vec::new());
    msg.serialize_with_options(&mut out, &SerializeOptions::new()).expect("serialize");
    String::from_utf8(out.into_inner()).expect("utf-8")
}

#[test]
fn json_result_is_a_valid_smp_message_and_round_trips() {
    let (doc, _details) = smp::documents(&sample_result(), &Environment::detect(), BTreeMap::new(), "r.details.json");
    let json = serde_json::to_string_pretty(&doc).expect("json");
    let back = through_protobuf(&json);
    let reparsed: PerformanceTestResult = serde_json::from_str(&back).expect("our reader takes the parser's output");
    assert_eq!(reparsed, doc);
    let v: serde_json::Value = serde_json::from_str(&back).expect("json");
    assert_eq!(v["startTime"], "2026-11-18T11:06:40.123Z");
    assert_eq!(v["actualQPS"], 199.8);
    assert_eq!(v["latenciesMs"]["p50"], doc.latencies_ms.p50);
}

#[test]
fn yaml_result_is_the_same_message() {
    let (doc, _details) = smp::documents(&sample_result(), &Environment::detect(), BTreeMap::new(), "r.details.yaml");
    let yaml = serde_saphyr::to_string(&doc).expect("yaml");
    let value: serde_json::Value = serde_saphyr::from_str(&yaml).expect("yaml parses");
    let back = through_protobuf(&value.to_string());
    let reparsed: PerformanceTestResult = serde_json::from_str(&back).expect("reparse");
    assert_eq!(reparsed, doc);
    let from_yaml: PerformanceTestResult = serde_saphyr::from_str(&yaml).expect("our reader takes YAML");
    assert_eq!(from_yaml, doc);
}

#[test]
fn the_parser_rejects_what_the_schema_does_not_have() {
    let (doc, _) = smp::documents(&sample_result(), &Environment::detect(), BTreeMap::new(), "x");
    let mut v = serde_json::to_value(&doc).expect("value");
    v["latenciesMs"]["p999"] = serde_json::json!(1.0);
    let text = v.to_string();
    let mut de = serde_json::Deserializer::from_str(&text);
    assert!(DynamicMessage::deserialize(descriptor(), &mut de).is_err(), "unknown field accepted");
    let mut v = serde_json::to_value(&doc).expect("value");
    v["actualQPS"] = serde_json::json!("fast");
    let text = v.to_string();
    let mut de = serde_json::Deserializer::from_str(&text);
    assert!(DynamicMessage::deserialize(descriptor(), &mut de).is_err(), "wrong type accepted");
}

#[test]
fn details_round_trip_in_both_formats() {
    let dir = std::env::temp_dir().join(format!("smp-details-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for name in ["r.json", "r.yaml"] {
        let out = dir.join(name);
        let env = Environment::detect();
        let doc = smp::write_result(&out, &sample_result(), &env, BTreeMap::new()).expect("write");
        let loaded = smp::read_result(&out).expect("read");
        assert_eq!(loaded.result, doc);
        let details = loaded.details.expect("details found through detailsUri");
        assert_eq!(details.result_id, doc.id);
        assert_eq!(details.errors["http_503"], 3);
        assert_eq!(details.error_kinds()[&ErrorKind::Timeout], 2);
        assert_eq!(details.latency_histogram().len(), 6);
        assert_eq!(details.environment, env);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
