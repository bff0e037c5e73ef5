//! The local development stack as a library: the `./dev` tool is built on it, and
//! tests that need a broker of their own (to stop and restart it) start a private
//! [`kafka::KafkaNode`] with it.

pub mod kafka;
pub mod postgres;
pub mod procs;
pub mod python;
pub mod run;
pub mod stack;
pub mod stripe_mock;
