//! Rust types generated at build time (`build.rs`) from `proto/`: the
//! ConductorOne messages and the `BatonService` gRPC client and server.
//! Module paths mirror the protobuf packages so the generated cross-package
//! references resolve.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod c1 {
    pub mod connector {
        pub mod v2 {
            tonic::include_proto!("c1.connector.v2");
        }
    }
    pub mod connectorapi {
        pub mod baton {
            pub mod v1 {
                tonic::include_proto!("c1.connectorapi.baton.v1");
            }
        }
    }
}

pub use c1::connector::v2 as connector;
pub use c1::connectorapi::baton::v1 as baton;

/// The `type_url` of an `Any` holding a message of the named full type.
pub fn type_url(full_name: &str) -> String {
    format!("type.googleapis.com/{full_name}")
}

/// Packs a message into an `Any` under its protobuf full name.
pub fn to_any<M: prost::Message>(full_name: &str, message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url(full_name),
        value: message.encode_to_vec(),
    }
}
