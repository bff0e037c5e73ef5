//! What the gateway and ingest share about tenants, so that neither service depends on
//! the other: API keys and their verification ([`keys`]), the meters usage is counted
//! in ([`meter`]), the plan catalog and tenants' subscriptions as the database holds
//! them ([`plans`]), and the quota state ingest checks frames against ([`quota`]).

pub mod keys;
pub mod meter;
pub mod plans;
pub mod quota;

pub use meter::Meter;
pub use plans::{LimitKind, Plan, PlanMeter, Subscription, SubscriptionStatus};
