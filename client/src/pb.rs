//! The messages and the client stub generated from proto/generate.proto.

tonic::include_proto!("sluice.v1");
