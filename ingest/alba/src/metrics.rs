//! Ingest's metrics, defined once. `alba_frames_processed_total` keeps the seed's name.

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

/// How frames arrive; the `transport` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Http,
    WebSocket,
    Recording,
    Legacy,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Http => "http",
            Transport::WebSocket => "websocket",
            Transport::Recording => "recording",
            Transport::Legacy => "legacy",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Frames published and confirmed, by transport.
    pub frames: IntCounterVec,
    /// Frames refused, by reason code.
    pub rejected: IntCounterVec,
    /// Frames not published again because their session already had them.
    pub duplicates: IntCounter,
    /// Request and message bytes received, by transport.
    pub bytes_in: IntCounterVec,
    /// From handing a group of frames to the producer to the broker's confirmation.
    pub publish_latency: Histogram,
    /// Frame bytes handed to the producer and not yet confirmed.
    pub in_flight_bytes: IntGauge,
    /// 1 while the broker answers metadata requests.
    pub broker_up: IntGauge,
    pub ws_connections: IntGauge,
    pub requests: IntCounterVec,
    pub request_latency: HistogramVec,
    /// Usage events emitted, and emission failures (retried at the next interval).
    pub usage_events: IntCounter,
    pub usage_failures: IntCounter,
    /// Sessions this instance serves (see `sessions`), claims made, and failed writes
    /// of their state (kept and retried).
    pub owned_sessions: IntGauge,
    pub session_claims: IntCounter,
    pub session_write_failures: IntCounter,
    /// The producer's requests, from librdkafka's statistics.
    pub producer: ProducerMetrics,
}

/// A producer's requests as librdkafka's statistics report them: how many, how big,
/// how long the broker took to answer, and how long records waited to be sent. The
/// averages are quotients of rates: `rate(..._round_trip_seconds_total) /
/// rate(..._round_trips_total)` is the mean round trip.
#[derive(Debug, Clone)]
pub struct ProducerMetrics {
    pub produce_requests: IntCounter,
    /// Bytes sent to the brokers (every request, compressed as sent).
    pub sent_bytes: IntCounter,
    /// Requests answered, and the summed time from sending each to its answer.
    pub round_trips: IntCounter,
    pub round_trip_seconds: Counter,
    /// Records put into requests, and the summed time each waited in librdkafka's
    /// queue before that.
    pub queued_records: IntCounter,
    pub queue_wait_seconds: Counter,
}

impl ProducerMetrics {
    /// The counters, not registered anywhere.
    pub fn new() -> ProducerMetrics {
        let int = |name: &str, help: &str| IntCounter::new(name, help).expect("valid metric");
        let float = |name: &str, help: &str| Counter::new(name, help).expect("valid metric");
        ProducerMetrics {
            produce_requests: int(
                "alba_producer_produce_requests_total",
                "Produce requests sent to the brokers",
            ),
            sent_bytes: int(
                "alba_producer_sent_bytes_total",
                "Bytes of requests sent to the brokers, as sent (compressed)",
            ),
            round_trips: int(
                "alba_producer_round_trips_total",
                "Requests the brokers answered",
            ),
            round_trip_seconds: float(
                "alba_producer_round_trip_seconds_total",
                "Summed time from sending a request to its answer",
            ),
            queued_records: int(
                "alba_producer_queued_records_total",
                "Records put into requests",
            ),
            queue_wait_seconds: float(
                "alba_producer_queue_wait_seconds_total",
                "Summed time records waited in the producer's queue before their request was made",
            ),
        }
    }

    fn collectors(&self) -> [Box<dyn prometheus::core::Collector>; 6] {
        [
            Box::new(self.produce_requests.clone()),
            Box::new(self.sent_bytes.clone()),
            Box::new(self.round_trips.clone()),
            Box::new(self.round_trip_seconds.clone()),
            Box::new(self.queued_records.clone()),
            Box::new(self.queue_wait_seconds.clone()),
        ]
    }
}

impl Default for ProducerMetrics {
    fn default() -> ProducerMetrics {
        ProducerMetrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let frames = IntCounterVec::new(
            Opts::new(
                "alba_frames_processed_total",
                "Frames published to eeg.frames and confirmed by the broker",
            ),
            &["transport"],
        )
        .expect("valid metric");
        let rejected = IntCounterVec::new(
            Opts::new("alba_frames_rejected_total", "Frames refused, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        let duplicates = IntCounter::new(
            "alba_frames_duplicate_total",
            "Frames a session already had; acknowledged, not published again",
        )
        .expect("valid metric");
        let bytes_in = IntCounterVec::new(
            Opts::new(
                "alba_bytes_received_total",
                "Body and message bytes received",
            ),
            &["transport"],
        )
        .expect("valid metric");
        let publish_latency = Histogram::with_opts(
            HistogramOpts::new(
                "alba_publish_latency_seconds",
                "From producing a group of frames to the broker's confirmation of all of them",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")),
        )
        .expect("valid metric");
        let in_flight_bytes = IntGauge::new(
            "alba_in_flight_bytes",
            "Frame bytes produced and not yet confirmed by the broker",
        )
        .expect("valid metric");
        let broker_up =
            IntGauge::new("alba_broker_up", "1 while the broker answers").expect("valid metric");
        let ws_connections = IntGauge::new("alba_websocket_connections", "Open WebSocket streams")
            .expect("valid metric");
        let labels = ["route", "method", "status"];
        let requests = IntCounterVec::new(
            Opts::new("alba_http_requests_total", "HTTP requests"),
            &labels,
        )
        .expect("valid metric");
        let request_latency = HistogramVec::new(
            HistogramOpts::new("alba_http_request_seconds", "HTTP request latency")
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets")),
            &labels,
        )
        .expect("valid metric");
        let usage_events = IntCounter::new("alba_usage_events_total", "Usage events emitted")
            .expect("valid metric");
        let usage_failures = IntCounter::new(
            "alba_usage_emit_failures_total",
            "Usage emissions that failed (kept and retried)",
        )
        .expect("valid metric");
        let owned_sessions = IntGauge::new(
            "alba_sessions_owned",
            "Sessions this instance serves (claimed, lease running)",
        )
        .expect("valid metric");
        let session_claims = IntCounter::new(
            "alba_session_claims_total",
            "Sessions claimed in the database (new, taken over, or after a lease ran out)",
        )
        .expect("valid metric");
        let session_write_failures = IntCounter::new(
            "alba_session_write_failures_total",
            "Writes of the sessions' state that failed (kept, retried next tick)",
        )
        .expect("valid metric");
        let producer = ProducerMetrics::new();
        for c in [
            Box::new(frames.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(rejected.clone()),
            Box::new(duplicates.clone()),
            Box::new(bytes_in.clone()),
            Box::new(publish_latency.clone()),
            Box::new(in_flight_bytes.clone()),
            Box::new(broker_up.clone()),
            Box::new(ws_connections.clone()),
            Box::new(requests.clone()),
            Box::new(request_latency.clone()),
            Box::new(usage_events.clone()),
            Box::new(usage_failures.clone()),
            Box::new(owned_sessions.clone()),
            Box::new(session_claims.clone()),
            Box::new(session_write_failures.clone()),
        ]
        .into_iter()
        .chain(producer.collectors())
        {
            registry.register(c).expect("registered once");
        }
        Metrics {
            registry,
            frames,
            rejected,
            duplicates,
            bytes_in,
            publish_latency,
            in_flight_bytes,
            broker_up,
            ws_connections,
            requests,
            request_latency,
            usage_events,
            usage_failures,
            owned_sessions,
            session_claims,
            session_write_failures,
            producer,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        buf
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}
