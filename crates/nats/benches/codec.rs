//! Micro-benchmarks of the hot paths of the NATS transport: the CloudEvents
//! header mapping (encode / decode) and the envelope's JSON form (used in
//! dead letters and redrive).
//!
//! `cargo bench -p custody-nats --bench codec`
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use custody_core::{headers, Message};
use custody_nats::{decode, encode_headers};

fn message(payload_bytes: usize) -> Message {
    Message::builder("orders", "customer-042", "OrderPlaced")
        .payload("application/json", vec![b'x'; payload_bytes])
        .header(
            headers::CORRELATION_ID,
            "0190d0f7-5b1e-7c3a-9f00-0123456789ab",
        )
        .and_then(|b| {
            b.header(
                headers::TRACEPARENT,
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
        })
        .and_then(|b| b.build())
        .unwrap_or_else(|e| panic!("benchmark message is valid: {e}"))
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("nats_headers");
    for size in [256usize, 4096] {
        let msg = message(size);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("encode_headers", size), &msg, |b, m| {
            b.iter(|| encode_headers(black_box(m)))
        });
        let h = encode_headers(&msg);
        g.bench_with_input(BenchmarkId::new("decode", size), &msg, |b, m| {
            b.iter(|| {
                decode(
                    black_box("custody.orders"),
                    Some(black_box(&h)),
                    black_box(&m.payload),
                    "custody",
                )
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("envelope_json");
    for size in [256usize, 4096] {
        let msg = message(size);
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("encode", size), &msg, |b, m| {
            b.iter(|| serde_json::to_vec(black_box(m)))
        });
        let json = serde_json::to_vec(&msg).unwrap_or_default();
        g.bench_with_input(BenchmarkId::new("decode", size), &json, |b, j| {
            b.iter(|| serde_json::from_slice::<Message>(black_box(j)))
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
