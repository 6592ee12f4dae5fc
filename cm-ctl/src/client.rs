//! Talking to the cluster's primary CMServer: try every configured endpoint with
//! short timeouts and keep the one that answers as primary.

use std::time::Duration;

use ha_common::proto::cm::cm_server_client::CmServerClient;
use ha_common::proto::cm::{ClusterStatus, ClusterStatusRequest, SetDesiredStateRequest};
use ha_common::ClusterConfig;
use tonic::transport::Channel;

use crate::error::CtlError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to the primary CMServer.
pub struct Primary {
    pub name: String,
    pub endpoint: String,
    client: CmServerClient<Channel>,
}

impl Primary {
    /// Finds the primary: the first CMServer that answers a status request.
    /// A standby answers "not primary"; a dead one does not answer at all.
    pub async fn find(cfg: &ClusterConfig) -> Result<Primary, CtlError> {
        let mut tried = Vec::new();
        for s in &cfg.cm_servers {
            let endpoint = cfg.endpoint(s);
            match try_one(&endpoint).await {
                Ok(client) => {
                    return Ok(Primary {
                        name: s.name.clone(),
                        endpoint,
                        client,
                    })
                }
                Err(why) => tried.push(format!("{} at {endpoint}: {why}", s.name)),
            }
        }
        Err(CtlError::NoCmServer {
            tried: tried.join("; "),
        })
    }

    pub async fn status(&mut self) -> Result<ClusterStatus, CtlError> {
        self.client
            .get_cluster_status(ClusterStatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| self.rpc_error("status", s))
    }

    /// Sets the desired run state of `instance` (None: all); returns the names affected.
    pub async fn set_desired(
        &mut self,
        instance: Option<&str>,
        run: bool,
    ) -> Result<Vec<String>, CtlError> {
        self.client
            .set_desired_state(SetDesiredStateRequest {
                instance: instance.unwrap_or_default().to_owned(),
                run,
            })
            .await
            .map(|r| r.into_inner().instances)
            .map_err(|s| self.rpc_error(if run { "start" } else { "stop" }, s))
    }

    /// A connection to the same primary for an operation that may take `timeout`
    /// (switchover, failover, build answer when done).
    pub async fn long_client(
        &self,
        timeout: Duration,
    ) -> Result<CmServerClient<Channel>, CtlError> {
        let ep = ha_common::tls::endpoint(
            &self.endpoint,
            ha_common::tls::CertRole::CmServer,
            CONNECT_TIMEOUT,
        )
        .map_err(|e| CtlError::Other(e.to_string()))?
        .timeout(timeout);
        let channel = ep.connect().await.map_err(|e| CtlError::Rpc {
            what: "connect",
            endpoint: format!("{} ({})", self.endpoint, self.name),
            message: describe(&e),
        })?;
        Ok(CmServerClient::new(channel))
    }

    /// An operation's refusal or failure, on one line.
    pub fn operation_error(&self, what: &'static str, s: tonic::Status) -> CtlError {
        self.rpc_error(what, s)
    }

    fn rpc_error(&self, what: &'static str, s: tonic::Status) -> CtlError {
        CtlError::Rpc {
            what,
            endpoint: format!("{} ({})", self.endpoint, self.name),
            message: one_line(s.message()),
        }
    }
}

async fn try_one(endpoint: &str) -> Result<CmServerClient<Channel>, String> {
    let ep = ha_common::tls::endpoint(
        endpoint,
        ha_common::tls::CertRole::CmServer,
        CONNECT_TIMEOUT,
    )
    .map_err(|e| e.to_string())?
    .timeout(RPC_TIMEOUT);
    let channel = ep
        .connect()
        .await
        .map_err(|e| plaintext_hint(describe(&e)))?;
    let mut client = CmServerClient::new(channel);
    client
        .get_cluster_status(ClusterStatusRequest {})
        .await
        .map_err(|s| plaintext_hint(one_line(s.message())))?;
    Ok(client)
}

/// A plaintext client on a TLS port sees only an HTTP/2 protocol error (the server
/// drops it at the handshake): say so, and what to do.
fn plaintext_hint(message: String) -> String {
    // The server closes the connection at the handshake: the client sees an HTTP/2
    // error, or a bare "transport error" when that happens while connecting.
    let dropped = message.contains("h2 protocol error")
        || message.contains("http2 error")
        || message == "transport error";
    if ha_common::tls::enabled() || !dropped {
        return message;
    }
    format!(
        "{message} (refused at the TLS handshake: this cm_ctl speaks plaintext, [tls] \
         enabled = false in its config, and the CMServer requires mutual TLS with an \
         operator certificate of the cluster CA)"
    )
}

/// A transport error with its causes, on one line ("transport error: connection refused").
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = c.source();
    }
    one_line(&parts.join(": "))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
