//! The answer to a batch of frames: one result per frame, in request order.
//!
//! Status of the whole request: 200 when every frame was accepted (or was a duplicate
//! of one already accepted); 207 when some were accepted and some refused; otherwise
//! the status of the first refusal (4xx for bad input, 429/503 with `Retry-After` when
//! ingest could not get them to the broker), with the usual error object beside the
//! results.

use serde::{Deserialize, Serialize};

use crate::validate::{Reason, Rejection};

/// What happened to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FrameStatus {
    /// Published to `eeg.frames`, confirmed by the broker.
    Accepted,
    /// At or below the session's highest accepted sequence number: already published,
    /// not published again.
    Duplicate,
    /// Refused; see `error`. Nothing was published for it.
    Rejected,
}

/// One frame's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameResult {
    /// Position in the request.
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub status: FrameStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Rejection>,
}

/// The answer to `POST /v1/frames`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct BatchAnswer {
    pub accepted: usize,
    pub duplicates: usize,
    pub rejected: usize,
    pub results: Vec<FrameResult>,
}

impl BatchAnswer {
    pub fn from_results(mut results: Vec<FrameResult>) -> BatchAnswer {
        results.sort_by_key(|r| r.index);
        let count = |s| results.iter().filter(|r| r.status == s).count();
        BatchAnswer {
            accepted: count(FrameStatus::Accepted),
            duplicates: count(FrameStatus::Duplicate),
            rejected: count(FrameStatus::Rejected),
            results,
        }
    }

    /// The first refusal, if any.
    pub fn first_error(&self) -> Option<&Rejection> {
        self.results.iter().find_map(|r| r.error.as_ref())
    }

    /// The HTTP status of the whole answer (see the module documentation).
    pub fn status(&self) -> u16 {
        match self.first_error() {
            None => 200,
            Some(_) if self.accepted + self.duplicates > 0 && !self.any_retryable() => 207,
            Some(e) => {
                // A retryable refusal dominates: the client must come back for those.
                let retry = self
                    .results
                    .iter()
                    .filter_map(|r| r.error.as_ref())
                    .find(|e| e.retryable());
                retry
                    .or(Some(e))
                    .and_then(Rejection::reason)
                    .map_or(400, Reason::status)
            }
        }
    }

    fn any_retryable(&self) -> bool {
        self.results
            .iter()
            .any(|r| r.error.as_ref().is_some_and(Rejection::retryable))
    }

    /// The longest wait any retryable refusal asks for, in milliseconds.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.results
            .iter()
            .filter_map(|r| r.error.as_ref()?.retry_after_ms)
            .max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(index: usize, status: FrameStatus, reason: Option<Reason>) -> FrameResult {
        FrameResult {
            index,
            session_id: None,
            seq: Some(index as u64),
            status,
            error: reason.map(|r| Rejection::new(r, "x").retry_after_ms(1000)),
        }
    }

    #[test]
    fn the_status_follows_the_results() {
        use FrameStatus::*;
        let a = |v: Vec<FrameResult>| BatchAnswer::from_results(v).status();
        assert_eq!(
            a(vec![result(0, Accepted, None), result(1, Duplicate, None)]),
            200
        );
        assert_eq!(
            a(vec![
                result(0, Accepted, None),
                result(1, Rejected, Some(Reason::NonFiniteSample))
            ]),
            207
        );
        assert_eq!(
            a(vec![result(0, Rejected, Some(Reason::NonFiniteSample))]),
            422
        );
        assert_eq!(
            a(vec![result(0, Rejected, Some(Reason::SessionForbidden))]),
            403
        );
        assert_eq!(
            a(vec![
                result(0, Accepted, None),
                result(1, Rejected, Some(Reason::NonFiniteSample)),
                result(2, Rejected, Some(Reason::BrokerUnavailable))
            ]),
            503
        );
        let answer = BatchAnswer::from_results(vec![
            result(1, Rejected, Some(Reason::Overloaded)),
            result(0, Accepted, None),
        ]);
        assert_eq!(answer.results[0].index, 0);
        assert_eq!((answer.accepted, answer.rejected), (1, 1));
        assert_eq!(answer.retry_after_ms(), Some(1000));
    }
}
