//! tunnel-svc: runs on the host, follows one or more monitors and keeps one
//! tunnel per open container port, over gRPC, OpenSSH or a direct relay.
//! Its own gRPC admin API (`porthole.v1.TunnelAdmin`) lists and closes them.
#![deny(unsafe_code)]

pub mod admin;
pub mod announce;
pub mod backend;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod demo;
pub mod devcontainer;
pub mod docker;
pub mod gate;
pub mod hostheld;
pub mod hostports;
pub mod json;
pub mod mcp;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod rules;
pub mod service;
pub mod sockets;
mod sys;
pub mod tunnel;
pub mod udp;
pub mod watch;
