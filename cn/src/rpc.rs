//! The CN's gRPC service `Coordinator` (cn.proto): the agent's probe, and the peer half
//! of DDL — catalog changes prepared and finished by two-phase commit, catalog copy.

use std::sync::Arc;

use ha_common::proto::cn::coordinator_server::Coordinator;
use ha_common::proto::cn::{
    CatalogReply, CnStatusReply, CnStatusRequest, FinishCatalogRequest, GetCatalogReply,
    GetCatalogRequest, PrepareCatalogRequest,
};
use tonic::{Request, Response, Status};

use crate::catalog::{self, Change};
use crate::node::Node;

pub struct CoordinatorService {
    pub node: Arc<Node>,
}

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn status(
        &self,
        _r: Request<CnStatusRequest>,
    ) -> Result<Response<CnStatusReply>, Status> {
        let c = self.node.catalog_read();
        Ok(Response::new(CnStatusReply {
            name: self.node.name.clone(),
            accepting: self.node.is_accepting(),
            catalog_version: c.version,
            detail: format!(
                "{} distributed tables, {} prepared catalog changes",
                c.tables.len(),
                c.prepared.len()
            ),
        }))
    }

    async fn prepare_catalog(
        &self,
        r: Request<PrepareCatalogRequest>,
    ) -> Result<Response<CatalogReply>, Status> {
        let r = r.into_inner();
        let change =
            Change::decode(&r.change).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(
            match self.node.prepare_catalog(&r.gid, r.base_version, change) {
                Ok(v) => CatalogReply {
                    ok: true,
                    message: String::new(),
                    catalog_version: v,
                },
                Err(e) => CatalogReply {
                    ok: false,
                    message: e.to_string(),
                    catalog_version: self.node.catalog_read().version,
                },
            },
        ))
    }

    async fn finish_catalog(
        &self,
        r: Request<FinishCatalogRequest>,
    ) -> Result<Response<CatalogReply>, Status> {
        let r = r.into_inner();
        Ok(Response::new(
            match self.node.finish_catalog(&r.gid, r.commit) {
                Ok(v) => CatalogReply {
                    ok: true,
                    message: String::new(),
                    catalog_version: v,
                },
                Err(e) => CatalogReply {
                    ok: false,
                    message: e.to_string(),
                    catalog_version: self.node.catalog_read().version,
                },
            },
        ))
    }

    async fn get_catalog(
        &self,
        _r: Request<GetCatalogRequest>,
    ) -> Result<Response<GetCatalogReply>, Status> {
        let c = self.node.catalog_read();
        let mut copy = c.clone();
        // A copier gets committed state only.
        copy.prepared.clear();
        Ok(Response::new(GetCatalogReply {
            catalog_version: copy.version,
            catalog: catalog::encode(&copy),
        }))
    }
}
