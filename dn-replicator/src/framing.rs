//! Reads whole build-channel frames from a byte stream (the pure decoder does the work).

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::data_unit::{decode, CodecError, Message};

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    Codec(#[from] CodecError),
    #[error("stream ends inside a frame ({0} bytes left over)")]
    Truncated(usize),
}

/// A framed connection reader over a growing buffer.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    scratch: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::with_capacity(1 << 20),
            start: 0,
            scratch: vec![0; 256 * 1024],
        }
    }

    /// The next message; `Ok(None)` at a clean end of stream. Cancel-safe (bytes are
    /// kept only once a read completed), so it can sit in a `select!` with a timer.
    pub async fn next(&mut self) -> Result<Option<Message>, FrameError> {
        loop {
            if let Some((msg, used)) = decode(&self.buf[self.start..])? {
                self.start += used;
                return Ok(Some(msg));
            }
            // Compact before reading more (keeps the buffer bounded by one frame + a read).
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let n = self.inner.read(&mut self.scratch).await?;
            self.buf.extend_from_slice(&self.scratch[..n]);
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(FrameError::Truncated(self.buf.len()));
            }
        }
    }
}
