//! The metrics every stage exports, defined once.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// A stage's metrics, registered in their own registry.
#[derive(Debug, Clone)]
pub struct StageMetrics {
    registry: Registry,
    /// Records consumed, by stage.
    pub records_in: IntCounterVec,
    /// Records produced, by stage and output topic.
    pub records_out: IntCounterVec,
    /// Records sent to the dead-letter topic, by stage and reason.
    pub dead_letters: IntCounterVec,
    /// Records re-read after a restart or rebalance to rebuild state (outputs discarded).
    pub replayed: IntCounterVec,
    /// Processing time per record (decode and stage logic), seconds.
    pub processing: HistogramVec,
    /// Time per batch from first record to committed transaction, seconds.
    pub batch: HistogramVec,
    /// Time to commit a transaction (its records confirmed, then the commit), seconds.
    pub commit: HistogramVec,
    /// Committed and aborted transactions.
    pub transactions: IntCounterVec,
    /// Records behind the partition's end, by stage and partition.
    pub lag: IntGaugeVec,
    /// Metering: quantities counted, by meter (no tenant label: cardinality).
    pub usage: IntCounterVec,
    /// Metering: quantities of closed periods carried into the open one, by meter.
    pub usage_carried: IntCounterVec,
    /// Metering: 80% and 100% thresholds of plans' included quantities crossed, by
    /// meter and threshold.
    pub usage_alerts: IntCounterVec,
    /// Metering: records not counted again, by reason (`offset_applied`: read again
    /// after a restart, rebalance or replay; `duplicate_event`: an event id seen before).
    pub metering_skipped: IntCounterVec,
    /// Sink: rows deleted past their tenant's plan's retention, by table.
    pub results_expired: IntCounterVec,
    /// Sink: audio objects the object sweep looked at, by outcome (`kept`: a row names
    /// it; `deleted`: none does).
    pub audio_objects_swept: IntCounterVec,
}

impl StageMetrics {
    pub fn new() -> StageMetrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &["stage"])
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("registered once");
            h
        };
        let records_in = counter(
            "clisonix_stage_records_in_total",
            "Records consumed",
            &["stage"],
        );
        let records_out = counter(
            "clisonix_stage_records_out_total",
            "Records produced",
            &["stage", "topic"],
        );
        let dead_letters = counter(
            "clisonix_stage_dead_letters_total",
            "Records sent to the dead-letter topic",
            &["stage", "reason"],
        );
        let replayed = counter(
            "clisonix_stage_replayed_records_total",
            "Records re-read to rebuild state after a restart or rebalance",
            &["stage"],
        );
        let transactions = counter(
            "clisonix_stage_transactions_total",
            "Kafka transactions by outcome",
            &["stage", "outcome"],
        );
        let processing = histogram(
            "clisonix_stage_processing_seconds",
            "Processing time per record",
            prometheus::exponential_buckets(1e-6, 4.0, 12).expect("valid buckets"),
        );
        let batch = histogram(
            "clisonix_stage_batch_seconds",
            "Time from a batch's first record to its committed transaction",
            prometheus::exponential_buckets(1e-3, 2.0, 14).expect("valid buckets"),
        );
        let commit = histogram(
            "clisonix_stage_commit_seconds",
            "Time to commit a transaction: its records confirmed, then the commit",
            prometheus::exponential_buckets(5e-4, 2.0, 12).expect("valid buckets"),
        );
        let usage = counter(
            "clisonix_usage_total",
            "Usage counted by metering, in the meter's unit",
            &["meter"],
        );
        let usage_carried = counter(
            "clisonix_usage_carried_total",
            "Usage of closed billing periods carried into the open period",
            &["meter"],
        );
        let usage_alerts = counter(
            "clisonix_usage_alerts_total",
            "Thresholds (80 or 100 percent) of a plan's included quantity crossed",
            &["meter", "threshold"],
        );
        let metering_skipped = counter(
            "clisonix_metering_skipped_total",
            "Records metering did not count again",
            &["reason"],
        );
        let results_expired = counter(
            "clisonix_results_expired_total",
            "Result rows deleted past their tenant's plan's retention",
            &["table"],
        );
        let audio_objects_swept = counter(
            "clisonix_audio_objects_swept_total",
            "Audio objects the sink's sweep checked, by outcome (kept: a row names it, deleted: none does)",
            &["outcome"],
        );
        let lag = IntGaugeVec::new(
            Opts::new(
                "clisonix_stage_consumer_lag",
                "Records behind the partition's end",
            ),
            &["stage", "partition"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(lag.clone()))
            .expect("registered once");
        StageMetrics {
            registry,
            records_in,
            records_out,
            dead_letters,
            replayed,
            processing,
            batch,
            commit,
            transactions,
            lag,
            usage,
            usage_carried,
            usage_alerts,
            metering_skipped,
            results_expired,
            audio_objects_swept,
        }
    }

    /// Registers a stage's own per-record timing histogram (e.g. Jona's
    /// `jona_synthesis_duration_seconds`, a name dashboards already know).
    pub fn stage_timing(&self, name: &str, help: &str) -> Histogram {
        let h = Histogram::with_opts(
            HistogramOpts::new(name, help)
                .buckets(prometheus::exponential_buckets(1e-6, 4.0, 12).expect("valid buckets")),
        )
        .expect("valid metric");
        self.registry
            .register(Box::new(h.clone()))
            .expect("registered once");
        h
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

impl Default for StageMetrics {
    fn default() -> Self {
        Self::new()
    }
}
