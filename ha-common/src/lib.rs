//! Shared parts of mpp-ha: the cluster config, terms, durable state files, logging,
//! and the gRPC protocol every role speaks.

pub mod clock;
pub mod config;
pub mod dn_auth;
pub mod durable;
pub mod logging;
pub mod lsn;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod process;
pub mod shutdown;
pub mod term;
pub mod tls;

pub use config::{ClusterConfig, ConfigError, Role};
pub use term::Term;

/// Generated gRPC code (tonic/prost), compiled from `proto/*.proto` at build time.
pub mod proto {
    /// GTM: GXIDs, 2PC decisions, the GTM pair's sync.
    pub mod gtm {
        tonic::include_proto!("mpp_ha.gtm");
    }
    /// Cluster manager: agent reports, CMServer orders, cluster status.
    pub mod cm {
        tonic::include_proto!("mpp_ha.cm");
    }
    /// Coordinator: the agent's probe and CN-to-CN catalog 2PC and copy.
    pub mod cn {
        tonic::include_proto!("mpp_ha.cn");
    }
    /// DN secondary (dn_replicator): orders, status, WAL served for catch-up.
    pub mod replicator {
        tonic::include_proto!("mpp_ha.replicator");
    }
}
