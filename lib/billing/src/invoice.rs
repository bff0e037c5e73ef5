//! An invoice computed from a period's usage and the plan versions in force during it.
//!
//! - **Segments.** A period is cut where the tenant's plan changed: each segment has one
//!   plan version and a share of the period, `share = segment length / period length`.
//! - **Base fee.** Each segment bills its plan's base fee times its share (a plan change
//!   mid-period is prorated by time, stated per line).
//! - **Usage.** Each hour of usage counts in the segment its hour starts in (usage
//!   carried from a closed period counts in the first segment). Per segment and meter
//!   the plan includes `included × share`; what is beyond it is billable, at
//!   `price_minor` per `price_per` units.
//! - **Rounding.** Every prorated quantity and every amount is rounded half up to the
//!   integer (units, minor units) once, on its own line; totals are sums of lines. Tax
//!   is `subtotal × rate` (basis points), rounded half up.

use chrono::{DateTime, Utc};
use clisonix_tenancy::plans::Plan;
use serde::Serialize;

/// A stretch of the period on one plan version.
#[derive(Debug, Clone)]
pub struct Segment {
    pub plan: Plan,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// A quantity of a meter in the hour starting at `hour`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRow {
    pub meter: String,
    pub hour: DateTime<Utc>,
    pub quantity: i64,
}

/// What a line bills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    /// The plan's base fee for the segment.
    BaseFee,
    /// A meter's usage in the segment beyond what the plan includes.
    Usage,
}

impl LineKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LineKind::BaseFee => "base_fee",
            LineKind::Usage => "usage",
        }
    }

    pub fn parse(s: &str) -> Option<LineKind> {
        match s {
            "base_fee" => Some(LineKind::BaseFee),
            "usage" => Some(LineKind::Usage),
            _ => None,
        }
    }
}

/// One line of an invoice. Amounts are in the invoice currency's minor unit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Line {
    pub kind: LineKind,
    pub plan_id: String,
    pub plan_version: i32,
    /// The meter (usage lines).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meter: Option<String>,
    pub description: String,
    /// The segment of the period the line covers.
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The segment's share of the period, in millionths (1,000,000: the whole period).
    pub share_ppm: i64,
    /// Usage in the segment (1 for a base fee).
    pub quantity: i64,
    /// What the plan includes for the segment (its share of the period's allowance).
    pub included: i64,
    /// Beyond the included quantity.
    pub billable: i64,
    /// `unit_price_minor` per `price_per` units (the base fee: per period).
    pub unit_price_minor: i64,
    pub price_per: i64,
    pub amount_minor: i64,
}

/// An invoice's content before it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Draft {
    pub currency: String,
    pub lines: Vec<Line>,
    pub subtotal_minor: i64,
    /// Basis points: 1,900 is 19%.
    pub tax_rate_bp: i32,
    pub tax_minor: i64,
    pub total_minor: i64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvoiceError {
    #[error("the segments do not cover the period {0} .. {1} exactly, in order")]
    Segments(DateTime<Utc>, DateTime<Utc>),
    #[error("the plans of one period bill in different currencies ({0} and {1})")]
    MixedCurrencies(String, String),
    #[error("the tax rate must be 0 to 10000 basis points, not {0}")]
    TaxRate(i32),
    #[error("an amount does not fit 64 bits")]
    Overflow,
}

/// `value × num / den`, rounded half up (all non-negative; `den` > 0).
fn mul_div_round(value: i64, num: i64, den: i64) -> Result<i64, InvoiceError> {
    let (v, n, d) = (i128::from(value), i128::from(num), i128::from(den));
    let q = (2 * v * n + d) / (2 * d);
    i64::try_from(q).map_err(|_| InvoiceError::Overflow)
}

/// The invoice of the period `start .. end` on `segments` (in order, covering it) with
/// `usage`, taxed at `tax_rate_bp`.
pub fn compute(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    segments: &[Segment],
    usage: &[UsageRow],
    tax_rate_bp: i32,
) -> Result<Draft, InvoiceError> {
    let covered = !segments.is_empty()
        && segments[0].from == start
        && segments[segments.len() - 1].to == end
        && segments.windows(2).all(|w| w[0].to == w[1].from)
        && segments.iter().all(|s| s.to > s.from);
    if !covered || end <= start {
        return Err(InvoiceError::Segments(start, end));
    }
    if !(0..=10_000).contains(&tax_rate_bp) {
        return Err(InvoiceError::TaxRate(tax_rate_bp));
    }
    let currency = segments[0].plan.currency.clone();
    if let Some(other) = segments.iter().find(|s| s.plan.currency != currency) {
        return Err(InvoiceError::MixedCurrencies(
            currency,
            other.plan.currency.clone(),
        ));
    }
    let period_ms = (end - start).num_milliseconds();
    let mut lines = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let seg_ms = (seg.to - seg.from).num_milliseconds();
        let share_ppm = mul_div_round(1_000_000, seg_ms, period_ms)?;
        let plan = &seg.plan;
        let whole = segments.len() == 1;
        let label = |what: &str| {
            if whole {
                format!("{} ({}): {what}", plan.name, plan.plan_id)
            } else {
                format!(
                    "{} ({}): {what}, {} to {} ({:.2}% of the period)",
                    plan.name,
                    plan.plan_id,
                    seg.from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    seg.to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    share_ppm as f64 / 10_000.0
                )
            }
        };
        if plan.base_fee_minor > 0 {
            lines.push(Line {
                kind: LineKind::BaseFee,
                plan_id: plan.plan_id.clone(),
                plan_version: plan.version,
                meter: None,
                description: label("base fee"),
                from: seg.from,
                to: seg.to,
                share_ppm,
                quantity: 1,
                included: 0,
                billable: 1,
                unit_price_minor: plan.base_fee_minor,
                price_per: 1,
                amount_minor: mul_div_round(plan.base_fee_minor, seg_ms, period_ms)?,
            });
        }
        // The hours of this segment: from its start (the first also takes anything
        // before the period, carried usage) to its end (the last takes anything after).
        let in_segment = |hour: DateTime<Utc>| {
            let after_start = i == 0 || hour >= seg.from;
            let before_end = i == segments.len() - 1 || hour < seg.to;
            after_start && before_end
        };
        for pm in &plan.meters {
            let quantity = usage
                .iter()
                .filter(|u| u.meter == pm.meter && in_segment(u.hour))
                .try_fold(0i64, |sum, u| sum.checked_add(u.quantity))
                .ok_or(InvoiceError::Overflow)?;
            let included = mul_div_round(pm.included, seg_ms, period_ms)?;
            let billable = (quantity - included).max(0);
            if quantity == 0 && pm.price_minor == 0 {
                continue;
            }
            let amount = mul_div_round(billable, pm.price_minor, pm.price_per.max(1))?;
            lines.push(Line {
                kind: LineKind::Usage,
                plan_id: plan.plan_id.clone(),
                plan_version: plan.version,
                meter: Some(pm.meter.clone()),
                description: label(&format!("{} ({})", pm.meter, pm.unit)),
                from: seg.from,
                to: seg.to,
                share_ppm,
                quantity,
                included,
                billable,
                unit_price_minor: pm.price_minor,
                price_per: pm.price_per.max(1),
                amount_minor: amount,
            });
        }
    }
    let subtotal_minor = lines
        .iter()
        .try_fold(0i64, |sum, l| sum.checked_add(l.amount_minor))
        .ok_or(InvoiceError::Overflow)?;
    let tax_minor = mul_div_round(subtotal_minor, i64::from(tax_rate_bp), 10_000)?;
    Ok(Draft {
        currency,
        lines,
        subtotal_minor,
        tax_rate_bp,
        tax_minor,
        total_minor: subtotal_minor
            .checked_add(tax_minor)
            .ok_or(InvoiceError::Overflow)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use clisonix_tenancy::plans::{LimitKind, PlanMeter};

    fn plan(id: &str, base: i64, included: i64, price: i64, per: i64) -> Plan {
        Plan {
            plan_id: id.into(),
            version: 1,
            name: id.to_uppercase(),
            currency: "EUR".into(),
            base_fee_minor: base,
            max_concurrent_sessions: None,
            max_devices: None,
            requests_per_minute_member: 60,
            requests_per_minute_premium: 60,
            audio_presets: vec![],
            retention_days: 7,
            public: true,
            meters: vec![PlanMeter {
                meter: "device_ms".into(),
                unit: "ms".into(),
                included,
                price_minor: price,
                price_per: per,
                limit: LimitKind::Soft,
            }],
        }
    }

    fn at(day: u32, hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, day, hour, 0, 0).unwrap()
    }

    fn used(hour: DateTime<Utc>, quantity: i64) -> UsageRow {
        UsageRow {
            meter: "device_ms".into(),
            hour,
            quantity,
        }
    }

    /// A 30-day period.
    fn period() -> (DateTime<Utc>, DateTime<Utc>) {
        (
            at(1, 0),
            Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        )
    }

    #[test]
    fn a_whole_period_bills_the_base_fee_and_the_overage_beyond_the_included() {
        let (start, end) = period();
        // 4,900 base; 1,000,000 ms included; 50 minor per 3,600,000 ms beyond.
        let seg = Segment {
            plan: plan("pro", 4_900, 1_000_000, 50, 3_600_000),
            from: start,
            to: end,
        };
        let usage = [used(at(2, 10), 8_000_000), used(at(20, 3), 2_000_000)];
        let d = compute(start, end, &[seg], &usage, 1_900).unwrap();
        assert_eq!(d.lines.len(), 2);
        assert_eq!(d.lines[0].amount_minor, 4_900);
        let u = &d.lines[1];
        assert_eq!(
            (u.quantity, u.included, u.billable),
            (10_000_000, 1_000_000, 9_000_000)
        );
        // 9,000,000 × 50 / 3,600,000 = 125.
        assert_eq!(u.amount_minor, 125);
        assert_eq!(d.subtotal_minor, 5_025);
        // 19% of 5,025 = 954.75, half up.
        assert_eq!((d.tax_minor, d.total_minor), (955, 5_980));
    }

    #[test]
    fn a_plan_change_mid_period_prorates_fees_and_allowances_by_time() {
        let (start, end) = period();
        let change = at(11, 0); // after 10 of 30 days
        let segs = [
            Segment {
                plan: plan("free", 0, 3_000_000, 0, 1),
                from: start,
                to: change,
            },
            Segment {
                plan: plan("pro", 3_000, 3_000_000, 7, 1_000),
                from: change,
                to: end,
            },
        ];
        let usage = [
            used(at(1, 5), 500_000),
            // The change's own hour counts in the new plan.
            used(change, 2_500_000),
            used(at(29, 23), 100_001),
        ];
        let d = compute(start, end, &segs, &usage, 0).unwrap();
        let free = &d.lines[0];
        assert_eq!(free.plan_id, "free");
        assert_eq!(
            (free.share_ppm, free.quantity, free.included),
            (333_333, 500_000, 1_000_000)
        );
        assert_eq!(free.amount_minor, 0);
        let base = &d.lines[1];
        assert_eq!((base.kind, base.amount_minor), (LineKind::BaseFee, 2_000));
        assert!(
            base.description.contains("66.67% of the period"),
            "{}",
            base.description
        );
        let pro = &d.lines[2];
        assert_eq!(
            (pro.quantity, pro.included, pro.billable),
            (2_600_001, 2_000_000, 600_001)
        );
        // 600,001 × 7 / 1,000 = 4,200.007 -> 4,200.
        assert_eq!(pro.amount_minor, 4_200);
        assert_eq!(d.total_minor, 6_200);
    }

    #[test]
    fn carried_usage_counts_in_the_first_segment_and_thirds_round_half_up() {
        let (start, end) = period();
        let third = start + (end - start) / 3;
        let segs = [
            Segment {
                plan: plan("a", 100, 0, 1, 3),
                from: start,
                to: third,
            },
            Segment {
                plan: plan("b", 100, 0, 1, 3),
                from: third,
                to: end,
            },
        ];
        // An hour of the previous period, carried into this one; 5 units at 1 per 3.
        let usage = [used(start - chrono::Duration::hours(3), 5)];
        let d = compute(start, end, &segs, &usage, 0).unwrap();
        let amounts: Vec<i64> = d.lines.iter().map(|l| l.amount_minor).collect();
        // 100/3 = 33.3 -> 33; 5/3 = 1.67 -> 2; 200/3 = 66.7 -> 67; b has no usage: 0.
        assert_eq!(amounts, [33, 2, 67, 0]);
        assert_eq!(d.subtotal_minor, 102);
    }

    #[test]
    fn bad_segments_currencies_and_tax_rates_are_refused() {
        let (start, end) = period();
        let seg = |p: Plan, from, to| Segment { plan: p, from, to };
        let pro = plan("pro", 1, 0, 0, 1);
        assert!(matches!(
            compute(start, end, &[seg(pro.clone(), start, at(10, 0))], &[], 0),
            Err(InvoiceError::Segments(..))
        ));
        assert!(matches!(
            compute(
                start,
                end,
                &[
                    seg(pro.clone(), start, at(10, 0)),
                    seg(pro.clone(), at(11, 0), end)
                ],
                &[],
                0
            ),
            Err(InvoiceError::Segments(..))
        ));
        let mut usd = pro.clone();
        usd.currency = "USD".into();
        assert!(matches!(
            compute(
                start,
                end,
                &[seg(pro.clone(), start, at(10, 0)), seg(usd, at(10, 0), end)],
                &[],
                0
            ),
            Err(InvoiceError::MixedCurrencies(..))
        ));
        assert_eq!(
            compute(start, end, &[seg(pro, start, end)], &[], 10_001),
            Err(InvoiceError::TaxRate(10_001))
        );
    }
}
