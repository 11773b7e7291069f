//! baton-perf: the end-to-end load generator of baton.
//!
//! - [`gen`]: distinct transactions of a fixed size, with a rollup mix and encrypted share,
//! - [`recorder`]: latency histograms (from the intended send time), throughput per second,
//!   errors by type,
//! - [`driver`]: closed loop and open loop over any submit function,
//! - [`load`]: a run against a real cluster through `baton_net::Client`,
//! - [`report`]: the JSON result, machine facts and the Markdown summary,
//! - [`sweep`]: stepping the offered load up to the sustainable peak,
//! - [`plot`]: SVG charts of results and sweeps.

#![warn(missing_docs)]

pub mod driver;
pub mod gen;
pub mod load;
pub mod plot;
pub mod recorder;
pub mod report;
pub mod sweep;
