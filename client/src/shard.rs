//! A client for one shard, over its unix socket or TCP.

use std::sync::Arc;

use futures::channel::mpsc::{unbounded, UnboundedSender};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Streaming;

use crate::pb::{self, text_generation_service_client::TextGenerationServiceClient};
use crate::{ClientError, ShardAddress, TraceHeaders};

#[derive(Clone, Debug)]
pub struct ShardClient {
    inner: TextGenerationServiceClient<Channel>,
    /// The `Steps` stream steps go over, opened by the first step and after a failed one.
    steps: Arc<Mutex<Option<StepStream>>>,
}

/// An open `Steps` call: where the next step goes, and where its answer comes from.
#[derive(Debug)]
struct StepStream {
    requests: UnboundedSender<pb::StepRequest>,
    responses: Streaming<pb::StepResponse>,
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
        Ok(Self {
            inner,
            steps: Arc::default(),
        })
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

    /// Runs a step over the `Steps` stream (one call for many steps saves the shard the
    /// per-call gRPC work). Steps never overlap: the stream answers in order.
    pub async fn step(
        &self,
        request: pb::StepRequest,
        trace: &TraceHeaders,
    ) -> Result<pb::StepResponse, ClientError> {
        let request = pb::StepRequest {
            trace_context: trace.clone(),
            ..request
        };
        let mut open = self.steps.lock().await;
        // Out of `open` while the step is in flight: a step that fails, or whose caller stops
        // waiting (another rank's step failed), drops its stream rather than leave one whose
        // next answer would be this step's.
        let (stream, answer) = self.send(open.take(), request).await?;
        let response = answer.ok_or(ClientError::StepStreamEnded)?;
        *open = Some(stream);
        Ok(response)
    }

    /// Sends `request` over `stream`, or over a new stream where there is none or its call has
    /// ended (the shard stopped it between steps), and reads the answer.
    async fn send(
        &self,
        stream: Option<StepStream>,
        mut request: pb::StepRequest,
    ) -> Result<(StepStream, Option<pb::StepResponse>), tonic::Status> {
        if let Some(mut stream) = stream {
            match stream.requests.unbounded_send(request) {
                Ok(()) => {
                    let answer = stream.responses.message().await?;
                    return Ok((stream, answer));
                }
                Err(unsent) => request = unsent.into_inner(),
            }
        }
        let (requests, outgoing) = unbounded();
        // Queued before the call: the shard sends its response headers with the first answer.
        requests
            .unbounded_send(request)
            .map_err(|_| tonic::Status::internal("the step stream's queue closed"))?;
        let mut responses = self.inner.clone().steps(outgoing).await?.into_inner();
        let answer = responses.message().await?;
        Ok((
            StepStream {
                requests,
                responses,
            },
            answer,
        ))
    }

    pub async fn clear_cache(&self) -> Result<(), ClientError> {
        self.inner
            .clone()
            .clear_cache(pb::ClearCacheRequest {})
            .await?;
        Ok(())
    }
}
