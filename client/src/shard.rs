//! A client for one shard, over its unix socket or TCP.

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb::{self, text_generation_service_client::TextGenerationServiceClient};
use crate::{ClientError, ShardAddress, TraceHeaders};

#[derive(Clone, Debug)]
pub struct ShardClient {
    inner: TextGenerationServiceClient<Channel>,
}

impl ShardClient {
    pub async fn connect(address: &ShardAddress) -> Result<Self, ClientError> {
        let connected = match address {
            ShardAddress::Unix(path) => {
                let path = path.clone();
                // The URI is required by tonic but unused: the connector always dials the socket.
                Endpoint::from_static("http://[::]:50051")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let path = path.clone();
                        async move { UnixStream::connect(path).await.map(TokioIo::new) }
                    }))
                    .await
            }
            ShardAddress::Tcp(uri) => match Endpoint::from_shared(uri.clone()) {
                Ok(endpoint) => endpoint.tcp_nodelay(true).connect().await,
                Err(err) => Err(err),
            },
        };
        let channel = connected.map_err(|source| ClientError::Connect {
            address: address.clone(),
            source,
        })?;
        let inner = TextGenerationServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        Ok(Self { inner })
    }

    pub async fn info(&self) -> Result<pb::InfoResponse, ClientError> {
        let response = self.inner.clone().info(pb::InfoRequest {}).await?;
        Ok(response.into_inner())
    }

    pub async fn health(&self) -> Result<pb::HealthResponse, ClientError> {
        Ok(self
            .inner
            .clone()
            .health(pb::HealthRequest {})
            .await?
            .into_inner())
    }

    pub async fn warmup(
        &self,
        request: pb::WarmupRequest,
    ) -> Result<pb::WarmupResponse, ClientError> {
        Ok(self.inner.clone().warmup(request).await?.into_inner())
    }

    pub async fn step(
        &self,
        request: pb::StepRequest,
        trace: &TraceHeaders,
    ) -> Result<pb::StepResponse, ClientError> {
        let mut request = tonic::Request::new(request);
        for (key, value) in trace {
            // The propagator writes valid header names and values; anything else is dropped
            // rather than failing the step.
            if let (Ok(key), Ok(value)) = (
                MetadataKey::from_bytes(key.as_bytes()),
                MetadataValue::try_from(value.as_str()),
            ) {
                request.metadata_mut().insert(key, value);
            }
        }
        Ok(self.inner.clone().step(request).await?.into_inner())
    }

    pub async fn clear_cache(&self) -> Result<(), ClientError> {
        self.inner
            .clone()
            .clear_cache(pb::ClearCacheRequest {})
            .await?;
        Ok(())
    }
}
