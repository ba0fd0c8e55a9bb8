//! Whether an attempt succeeded, may be retried, or failed for good — in one place — and when
//! to try again: exponential backoff with full jitter, never earlier than `Retry-After` asks.

use std::time::{Duration, SystemTime};

use rand::Rng;

use crate::rules::RetryPolicy;

/// What one attempt came to.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The target answered.
    Answered {
        status: u16,
        retry_after: Option<Duration>,
        /// The first KiB of the answer.
        body_head: bytes::Bytes,
    },
    /// No connection could be made.
    Connect(String),
    /// No answer within the target's timeout.
    Timeout,
    /// The connection failed mid-request or mid-answer.
    Transport(String),
    /// The request could not be built (a bad URL after templating, say); retrying cannot help.
    Invalid(String),
}

impl Outcome {
    /// Short label for logs and the error kept with a delivery.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Answered { status, .. } => format!("HTTP {status}"),
            Outcome::Connect(e) => format!("connect error: {e}"),
            Outcome::Timeout => "timed out".to_string(),
            Outcome::Transport(e) => format!("transport error: {e}"),
            Outcome::Invalid(e) => format!("invalid request: {e}"),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Answered { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    Delivered,
    Retry { after: Duration },
    Failed { reason: String },
}

/// Is this outcome worth another attempt?
pub fn is_retryable(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Answered { status, .. } => {
            matches!(*status, 408 | 429) || (500..=599).contains(status)
        }
        Outcome::Connect(_) | Outcome::Timeout | Outcome::Transport(_) => true,
        Outcome::Invalid(_) => false,
    }
}

/// Decides what follows attempt number `attempt` (1 = the first).
pub fn classify(outcome: &Outcome, attempt: u32, policy: &RetryPolicy) -> Disposition {
    if let Outcome::Answered { status, .. } = outcome {
        if (200..=299).contains(status) {
            return Disposition::Delivered;
        }
    }
    if !is_retryable(outcome) {
        return Disposition::Failed {
            reason: format!("not retryable: {}", outcome.describe()),
        };
    }
    if attempt >= policy.max_attempts {
        return Disposition::Failed {
            reason: format!("gave up after {attempt} attempts: {}", outcome.describe()),
        };
    }
    let mut after = backoff(policy, attempt, &mut rand::rng());
    if let Outcome::Answered {
        retry_after: Some(wait),
        ..
    } = outcome
    {
        after = after.max((*wait).min(policy.max_backoff));
    }
    Disposition::Retry { after }
}

/// Full jitter: uniform in `[0, min(max_backoff, backoff · 2^(attempt-1))]`.
pub fn backoff(policy: &RetryPolicy, attempt: u32, rng: &mut impl Rng) -> Duration {
    let cap = ceiling(policy, attempt);
    let millis = cap.as_millis() as u64;
    if millis == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(rng.random_range(0..=millis))
}

/// The upper bound of the backoff after attempt `attempt`.
pub fn ceiling(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    policy
        .backoff
        .checked_mul(1u32 << exp.min(31))
        .unwrap_or(policy.max_backoff)
        .min(policy.max_backoff)
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 5,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(10),
        }
    }

    fn answered(status: u16) -> Outcome {
        Outcome::Answered {
            status,
            retry_after: None,
            body_head: bytes::Bytes::new(),
        }
    }

    #[test]
    fn ceilings_double_up_to_the_maximum() {
        let p = policy();
        let got: Vec<u64> = (1..=6).map(|a| ceiling(&p, a).as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 10, 10]);
        assert_eq!(ceiling(&p, 1000), Duration::from_secs(10));
    }

    #[test]
    fn full_jitter_stays_within_the_ceiling_and_spreads() {
        let p = policy();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let samples: Vec<Duration> = (0..1000).map(|_| backoff(&p, 3, &mut rng)).collect();
        assert!(samples.iter().all(|d| *d <= Duration::from_secs(4)));
        assert!(samples.iter().any(|d| *d < Duration::from_secs(1)));
        assert!(samples.iter().any(|d| *d > Duration::from_secs(3)));
    }

    #[test]
    fn classification() {
        let p = policy();
        assert_eq!(classify(&answered(200), 1, &p), Disposition::Delivered);
        assert_eq!(classify(&answered(204), 5, &p), Disposition::Delivered);
        for status in [408, 429, 500, 502, 503, 599] {
            assert!(
                matches!(
                    classify(&answered(status), 1, &p),
                    Disposition::Retry { .. }
                ),
                "{status}"
            );
        }
        for status in [301, 400, 401, 404, 409, 422] {
            assert!(
                matches!(
                    classify(&answered(status), 1, &p),
                    Disposition::Failed { .. }
                ),
                "{status}"
            );
        }
        assert!(matches!(
            classify(&Outcome::Timeout, 1, &p),
            Disposition::Retry { .. }
        ));
        assert!(matches!(
            classify(&Outcome::Connect("refused".into()), 4, &p),
            Disposition::Retry { .. }
        ));
        let Disposition::Failed { reason } = classify(&Outcome::Connect("refused".into()), 5, &p)
        else {
            panic!("should give up")
        };
        assert!(reason.contains("after 5 attempts"), "{reason}");
        assert!(matches!(
            classify(&Outcome::Invalid("x".into()), 1, &p),
            Disposition::Failed { .. }
        ));
    }

    #[test]
    fn retry_after_is_honoured_up_to_max_backoff() {
        let p = policy();
        let o = Outcome::Answered {
            status: 429,
            retry_after: Some(Duration::from_secs(7)),
            body_head: bytes::Bytes::new(),
        };
        let Disposition::Retry { after } = classify(&o, 1, &p) else {
            panic!()
        };
        assert!(after >= Duration::from_secs(7));
        let o = Outcome::Answered {
            status: 503,
            retry_after: Some(Duration::from_secs(3600)),
            body_head: bytes::Bytes::new(),
        };
        let Disposition::Retry { after } = classify(&o, 1, &p) else {
            panic!()
        };
        assert_eq!(after, Duration::from_secs(10));
    }

    #[test]
    fn parses_retry_after() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
