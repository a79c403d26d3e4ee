//! A client for one shard, over its unix socket or TCP.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};

use futures::channel::mpsc::{unbounded, UnboundedReceiver, UnboundedSender};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::pb::{self, text_generation_service_client::TextGenerationServiceClient};
use crate::{ClientError, ShardAddress, TraceHeaders};

#[derive(Clone, Debug)]
pub struct ShardClient {
    inner: TextGenerationServiceClient<Channel>,
    /// The `Steps` stream steps go over, opened by the first step and after one that failed.
    steps: Arc<Mutex<Option<StepStream>>>,
}

/// Where a step's answer goes: the caller waits on the other end.
type Waiter = oneshot::Sender<Result<pb::StepResponse, ClientError>>;

/// An open `Steps` call: where the next step goes, and where its caller waits for the answer.
/// The stream answers in the order it was sent, so each answer goes to the oldest waiter.
#[derive(Debug)]
struct StepStream {
    requests: UnboundedSender<pb::StepRequest>,
    waiters: mpsc::UnboundedSender<Waiter>,
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

    /// Queues a step on the `Steps` stream now, behind the steps sent before it, and returns
    /// its answer's future, which holds no borrow of the client: the caller can send the next
    /// step before this one is answered, and the shard runs them in order. One stream for many
    /// steps also saves the shard the per-call gRPC work.
    pub fn send_step(
        &self,
        request: pb::StepRequest,
        trace: &TraceHeaders,
    ) -> impl Future<Output = Result<pb::StepResponse, ClientError>> + Send + 'static {
        let request = pb::StepRequest {
            trace_context: trace.clone(),
            ..request
        };
        let (waiter, answer) = oneshot::channel();
        // Never held across an await; a panic elsewhere cannot leave the stream half-sent.
        let mut open = self.steps.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = match open.as_ref() {
            // A stream whose reader stopped (its call ended) takes no more steps.
            Some(stream) if !stream.waiters.is_closed() => {
                match stream.requests.unbounded_send(request) {
                    Ok(()) => {
                        // Only fails if the reader stopped just now: the answer is then an
                        // error, as it would be on that stream.
                        let _ = stream.waiters.send(waiter);
                        None
                    }
                    Err(unsent) => Some((unsent.into_inner(), waiter)),
                }
            }
            _ => Some((request, waiter)),
        };
        if let Some((request, waiter)) = sent {
            *open = Some(self.open_stream(request, waiter));
        }
        async move { answer.await.unwrap_or(Err(ClientError::StepStreamEnded)) }
    }

    /// Opens a `Steps` call with `request` queued first, and starts the task that hands its
    /// answers to their waiters.
    fn open_stream(&self, request: pb::StepRequest, waiter: Waiter) -> StepStream {
        let (requests, outgoing) = unbounded();
        let (waiters, waiting) = mpsc::unbounded_channel();
        // Neither can fail: both receivers are alive here.
        let _ = requests.unbounded_send(request);
        let _ = waiters.send(waiter);
        tokio::spawn(read_answers(self.inner.clone(), outgoing, waiting));
        StepStream { requests, waiters }
    }

    pub async fn clear_cache(&self) -> Result<(), ClientError> {
        self.inner
            .clone()
            .clear_cache(pb::ClearCacheRequest {})
            .await?;
        Ok(())
    }
}

/// Makes the `Steps` call and hands each answer to the oldest waiter. The first error (or the
/// end of the call) goes to its waiter and ends the task; the waiters behind it then get
/// `StepStreamEnded`, and the next step opens a new stream. Ends as well when the client is
/// dropped.
async fn read_answers(
    mut client: TextGenerationServiceClient<Channel>,
    outgoing: UnboundedReceiver<pb::StepRequest>,
    mut waiting: mpsc::UnboundedReceiver<Waiter>,
) {
    // Answers only once the shard sends its response headers, which come with the first answer.
    let mut responses = match client.steps(outgoing).await {
        Ok(response) => response.into_inner(),
        Err(status) => {
            if let Some(waiter) = waiting.recv().await {
                let _ = waiter.send(Err(status.into()));
            }
            return;
        }
    };
    while let Some(waiter) = waiting.recv().await {
        let answer = match responses.message().await {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(ClientError::StepStreamEnded),
            Err(status) => Err(status.into()),
        };
        let failed = answer.is_err();
        // A caller that stopped waiting (another rank's step failed) drops its answer.
        let _ = waiter.send(answer);
        if failed {
            return;
        }
    }
}
