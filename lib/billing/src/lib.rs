//! Billing: invoices from the metered usage of a tenant's billing period.
//!
//! [`invoice`] computes an invoice (pure: plans, usage and the period in, lines and
//! totals out, exact to the minor unit); [`store`] keeps them in Postgres, one per
//! tenant and period, drafted when the period ends and finalized when it closes;
//! [`settle`] marks finalized invoices paid or void and issues credit notes;
//! [`signatures`] checks and makes webhook signatures; [`stripe`] calls Stripe's API;
//! [`webhooks`] delivers the tenants' webhooks.

pub mod invoice;
pub mod settle;
pub mod signatures;
pub mod store;
pub mod stripe;
pub mod webhooks;

pub use invoice::{compute, Draft, InvoiceError, Line, LineKind, Segment, UsageRow};
pub use settle::{Actor, CreditNote, SettleError};
pub use store::{BillingError, Invoice, InvoiceStatus, Invoiced, Invoicing};
