//! The WebSocket edge: frames in, typed [`AgentMessage`]s out, and the reverse. Nothing else in
//! the server sees a raw frame.

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use shared::ErrorCode;
use shared::protocol::{AgentMessage, ServerMessage};

/// What the reader got.
#[derive(Debug)]
pub enum Incoming {
    Message(AgentMessage),
    /// A ping or pong: the agent is alive, nothing to dispatch.
    Heartbeat,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("websocket error: {0}")]
    Transport(#[from] axum::Error),
}

impl ConnError {
    pub fn code(&self) -> ErrorCode {
        match self {
            ConnError::Malformed(_) => ErrorCode::MalformedMessage,
            ConnError::Transport(_) => ErrorCode::Internal,
        }
    }
}

pub struct AgentReader {
    stream: SplitStream<WebSocket>,
}

pub struct AgentWriter {
    sink: SplitSink<WebSocket, Message>,
}

pub fn split(socket: WebSocket) -> (AgentReader, AgentWriter) {
    let (sink, stream) = socket.split();
    (AgentReader { stream }, AgentWriter { sink })
}

impl AgentReader {
    /// `Ok(None)` when the agent closed the connection.
    pub async fn recv(&mut self) -> Result<Option<Incoming>, ConnError> {
        let Some(frame) = self.stream.next().await else {
            return Ok(None);
        };
        match frame? {
            Message::Text(text) => serde_json::from_str(text.as_str())
                .map(|m| Some(Incoming::Message(m)))
                .map_err(|e| ConnError::Malformed(e.to_string())),
            Message::Binary(_) => Err(ConnError::Malformed(
                "binary frames are not part of the protocol".into(),
            )),
            Message::Ping(_) | Message::Pong(_) => Ok(Some(Incoming::Heartbeat)),
            Message::Close(_) => Ok(None),
        }
    }
}

impl AgentWriter {
    pub async fn send(&mut self, msg: &ServerMessage) -> Result<(), ConnError> {
        let json = serde_json::to_string(msg).map_err(|e| ConnError::Malformed(e.to_string()))?;
        self.sink.send(Message::Text(json.into())).await?;
        Ok(())
    }

    pub async fn ping(&mut self) -> Result<(), ConnError> {
        self.sink.send(Message::Ping(Default::default())).await?;
        Ok(())
    }

    /// Sends a close frame; errors are irrelevant at this point.
    pub async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = self.sink.send(Message::Close(Some(frame))).await;
        let _ = self.sink.close().await;
    }
}
