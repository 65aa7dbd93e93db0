//! Wire types and shared plumbing of porthole.
//!
//! The generated gRPC API lives in [`pb`]; [`key`] writes the legacy port key
//! strings; [`server`] runs gRPC and plain HTTP on one port with health,
//! reflection and an optional bearer token; [`shutdown`] and [`telemetry`]
//! are the start-up and stop plumbing both services share.
#![deny(unsafe_code)]

pub mod auth;
pub mod fanout;
pub mod key;
pub mod memory;
pub mod net;
pub mod netns;
pub mod pb;
pub mod prometheus;
pub mod rawrelay;
pub mod relay;
pub mod server;
pub mod shutdown;
pub mod splice;
pub mod telemetry;
pub mod text;
pub mod time;
