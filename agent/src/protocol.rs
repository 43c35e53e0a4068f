//! The wire protocol between the devloop CLI and the agent.
//!
//! ```text
//! both ends:  MAGIC (8 bytes) + protocol version (u32 BE)        — the handshake
//! then:       frame*   frame = len (u32 BE, of what follows) + tag (u8) + payload
//!             tag 1 = message (JSON), 2 = data (raw bytes of a tar stream), 3 = end of data
//! ```
//!
//! The reader of a handshake skips bytes before the magic (transports may print banners on
//! stdout). A session ends with [`ToAgent::Bye`], never with stdin EOF: over Kubernetes exec, EOF
//! only reaches the process on one websocket subprotocol.
//!
//! A batch is one [`ToAgent::Batch`] message, then the data frames of one tar stream, then the end
//! frame. Each regular file in the tar carries its blake3 as the PAX record [`PAX_BLAKE3`]; the
//! agent verifies it before the file is renamed into place.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::manifest::Record;

pub const MAGIC: [u8; 8] = *b"\x7fDEVLOOP";
/// Bump on any incompatible change of the frames or messages below.
pub const PROTOCOL_VERSION: u32 = 3;
/// PAX extended-header key holding a regular file's blake3 (hex) inside a batch's tar stream.
pub const PAX_BLAKE3: &str = "DEVLOOP.blake3";
/// Largest frame accepted.
pub const MAX_FRAME: usize = 16 << 20;
/// Size of the data frames the CLI sends.
pub const DATA_CHUNK: usize = 256 << 10;
/// Largest data frame accepted: the agent queues a few of them for the apply task, and its memory
/// lives inside the app's limit.
pub const MAX_DATA_FRAME: usize = 1 << 20;
/// Most entries (deletions, exec-bit changes, tar entries) one batch may carry: every message,
/// and the agent's answer, stays far below [`MAX_FRAME`]. The agent ends a session whose batch
/// holds more.
pub const MAX_BATCH_ENTRIES: usize = 16 * 1024;
/// Refused entries an [`Applied`] describes in words, in all and per reason; the others are
/// counted (their places in the batch are all listed).
pub const REFUSED_EXAMPLES: usize = 64;
pub const REFUSED_EXAMPLES_PER_REASON: usize = 8;
/// Bytes of transport noise tolerated before the magic.
const MAX_PREAMBLE: usize = 64 << 10;

const TAG_MESSAGE: u8 = 1;
const TAG_DATA: u8 = 2;
const TAG_DATA_END: u8 = 3;

/// What the CLI says to the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    /// First message: who is calling and which paths the agent should leave out of its manifest
    /// (gitignore-style patterns, on top of the tree's own `.gitignore` and `.dockerignore`).
    Hello {
        client: String,
        /// Names the CLI process across its reconnects: a new connection of the same session may
        /// take the root over from a stale one of its own (see the agent's `lock`).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        session: String,
        excludes: Vec<String>,
        /// Read the tree as docker's build context for this Dockerfile (the builder's copy of a
        /// service folder): only `.dockerignore` applies, and the Dockerfile is always in.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        docker_context: Option<String>,
        /// Ask before the manifest: the agent first sends [`FromAgent::ManifestDigest`] and
        /// waits for [`ToAgent::Manifest`], so that equal trees exchange a digest, not 100,000
        /// records. Without it the manifest follows the welcome at once.
        #[serde(default, skip_serializing_if = "is_false")]
        ask: bool,
    },
    /// The answer to [`FromAgent::ManifestDigest`]: whether the records are wanted (the
    /// digests differ) or not (the trees are equal); [`FromAgent::ManifestEnd`] follows either way.
    Manifest {
        wanted: bool,
    },
    /// A batch: deletions, then the entries of the tar stream that follows in data frames.
    Batch {
        id: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        deletes: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        chmods: Vec<Chmod>,
    },
    /// Restart the app (building first, if the supervisor has a build); answered by
    /// [`FromAgent::Restart`]. Separate from the batch so that the CLI can hold it back while a
    /// burst of edits is still arriving: a burst costs one restart.
    Restart,
    /// Make sure the app runs and is ready (start it if it is not running); answered by
    /// [`FromAgent::Restart`]. Used by `--once` when nothing needed a restart.
    Ready,
    /// Are you there? Answered by [`FromAgent::Pong`] with the same `id`: the CLI's heartbeat
    /// on an idle stream, so that a link that went silent is noticed within seconds, not after
    /// TCP's retransmissions give up.
    Ping {
        id: u64,
    },
    Bye,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A change of the exec bit alone; the content is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chmod {
    pub path: String,
    pub exec: bool,
}

/// What the agent says to the CLI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    Welcome {
        agent: String,
        root: String,
        /// The largest file the agent takes (`--max-file-size`): the CLI does not send a bigger
        /// one only to have it refused.
        #[serde(default, skip_serializing_if = "is_zero")]
        max_file_size: u64,
        /// The agent supervises an app it has not started yet (`run --stdio --wait`, a local
        /// target): it starts at the session's first restart, which the CLI asks for even when
        /// there is nothing to sync.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        app_waiting: bool,
    },
    /// The digest of the agent's manifest ([`crate::manifest::digest_of`]) and its size, for a
    /// client that asked first.
    ManifestDigest {
        digest: crate::manifest::Digest,
        entries: u64,
        /// Answered from the agent's live index (kept current by inotify between sessions)
        /// rather than by walking its tree for this session.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        from_memory: bool,
    },
    /// One chunk of the agent's manifest; as many as needed, then [`FromAgent::ManifestEnd`].
    Manifest {
        records: Vec<Record>,
    },
    ManifestEnd {
        entries: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        problems: Vec<Problem>,
    },
    Applied(Applied),
    /// The answer to [`ToAgent::Restart`] and [`ToAgent::Ready`].
    Restart(RestartReport),
    /// A line the app (or its build) printed.
    Output {
        stream: Stream,
        line: String,
    },
    /// The app exited on its own (not by a restart).
    Exited {
        pid: u32,
        code: i32,
    },
    /// The answer to [`ToAgent::Ping`].
    Pong {
        id: u64,
    },
    /// The agent cannot go on; the session ends after this.
    Fatal {
        message: String,
    },
}

/// The acknowledgement of one batch. Everything the batch carried is in place except the
/// entries listed in `refused_at`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub id: u64,
    pub written: u64,
    pub bytes: u64,
    pub deleted: u64,
    /// What was refused and why, for the user: at most [`REFUSED_EXAMPLES_PER_REASON`] paths per
    /// reason and [`REFUSED_EXAMPLES`] in all, so that the answer stays small however much is
    /// refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<Problem>,
    /// Every refused entry, by its place in the batch: the deletions as sent, then the exec-bit
    /// changes, then the entries of the tar stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_at: Vec<u32>,
    pub micros: u64,
}

impl Applied {
    /// Records that the entry at `at` (see [`Applied::refused_at`]) was refused.
    pub fn refuse(&mut self, at: usize, path: &str, message: String) {
        self.refused_at.push(u32::try_from(at).unwrap_or(u32::MAX));
        if self.refused.len() >= REFUSED_EXAMPLES {
            return;
        }
        let same_reason = self.refused.iter().filter(|p| p.message == message).count();
        if same_reason < REFUSED_EXAMPLES_PER_REASON {
            self.refused.push(Problem { path: shortened(path, 1024), message: shortened(&message, 512) });
        }
    }

    /// How many entries were refused.
    pub fn refused_count(&self) -> u64 {
        self.refused_at.len() as u64
    }
}

/// At most `max` bytes of `text`, cut at a character boundary, marked when cut.
fn shortened(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &text[..cut])
}

/// How a restart went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RestartReport {
    /// The old process tree is gone and the new app runs (and passed the readiness probe, if one
    /// is set: `ready_ms` is how long that took after the start).
    Restarted {
        pid: u32,
        stop_ms: f64,
        start_ms: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ready_ms: Option<f64>,
    },
    /// The build before the restart failed; the old process keeps running.
    BuildFailed { code: i32, output: String },
    /// The app started but did not become ready (it exited, or the probe timed out).
    NotReady { pid: u32, message: String },
    /// The restart could not be done (the command cannot start, ...).
    Failed { message: String },
    /// No supervisor runs next to this agent: files sync, nothing restarts.
    Unsupervised,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdout,
    Stderr,
    Build,
}

/// Something wrong with one path; the rest of the work went on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub path: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("the stream closed before the other end spoke the devloop protocol{}", shown_output(.output))]
    NoPeer { output: String },
    #[error("the agent speaks protocol version {theirs}, this devloop speaks {ours}")]
    VersionMismatch { ours: u32, theirs: u32 },
    #[error("{MAX_PREAMBLE} bytes arrived without the devloop handshake{}", shown_output(.output))]
    NoHandshake { output: String },
    #[error("frame of {len} bytes is larger than the {max} allowed")]
    FrameTooLarge { len: usize, max: usize },
    #[error("unknown frame tag {0}")]
    UnknownTag(u8),
    #[error("the stream closed in the middle of a frame")]
    Truncated,
    #[error("malformed message: {0}")]
    BadMessage(#[from] serde_json::Error),
    #[error("unexpected {got} (expected {expected})")]
    Unexpected { expected: &'static str, got: String },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ProtocolError {
    /// A broken or closed stream (worth a reconnect) rather than a peer we cannot talk to.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, ProtocolError::Io(_) | ProtocolError::Truncated | ProtocolError::NoPeer { .. })
    }
}

fn shown_output(output: &str) -> String {
    let trimmed = output.trim();
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("; it printed: {}", trimmed.chars().take(400).collect::<String>())
    }
}

/// Writes our magic and version, then waits for the peer's. Returns the peer's version, which
/// equals ours (a different one is [`ProtocolError::VersionMismatch`]).
pub async fn handshake<R, W>(reader: &mut R, writer: &mut W) -> Result<u32, ProtocolError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = [0u8; 12];
    hello[..8].copy_from_slice(&MAGIC);
    hello[8..].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    // A peer that is not an agent may have exited already: what it printed explains more than
    // the broken pipe, so a failed write is reported only once its output has been read.
    let sent = async {
        writer.write_all(&hello).await?;
        writer.flush().await
    }
    .await;

    // Scan byte by byte for the magic: the preamble is short and this happens once per session.
    let mut seen: Vec<u8> = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        if reader.read(&mut byte).await? == 0 {
            return Err(ProtocolError::NoPeer { output: String::from_utf8_lossy(&seen).into_owned() });
        }
        seen.push(byte[0]);
        if seen.ends_with(&MAGIC) {
            break;
        }
        if seen.len() > MAX_PREAMBLE {
            return Err(ProtocolError::NoHandshake { output: String::from_utf8_lossy(&seen[..1024]).into_owned() });
        }
    }
    sent?;
    let mut version = [0u8; 4];
    reader.read_exact(&mut version).await.map_err(|_| ProtocolError::Truncated)?;
    let theirs = u32::from_be_bytes(version);
    if theirs != PROTOCOL_VERSION {
        return Err(ProtocolError::VersionMismatch { ours: PROTOCOL_VERSION, theirs });
    }
    Ok(theirs)
}

/// One frame as read.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Message(Vec<u8>),
    Data(Vec<u8>),
    DataEnd,
}

impl Frame {
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        match self {
            Frame::Message(bytes) => Ok(serde_json::from_slice(bytes)?),
            Frame::Data(_) => Err(ProtocolError::Unexpected { expected: "a message", got: "a data frame".into() }),
            Frame::DataEnd => {
                Err(ProtocolError::Unexpected { expected: "a message", got: "an end-of-data frame".into() })
            }
        }
    }
}

pub struct FrameReader<R> {
    inner: R,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// The next frame, or `None` when the stream closed cleanly between frames.
    pub async fn next(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let mut head = [0u8; 5];
        let mut filled = 0;
        while filled < head.len() {
            let n = self.inner.read(&mut head[filled..]).await?;
            if n == 0 {
                return if filled == 0 { Ok(None) } else { Err(ProtocolError::Truncated) };
            }
            filled += n;
        }
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let max = if head[4] == TAG_DATA { MAX_DATA_FRAME } else { MAX_FRAME };
        if len > max {
            return Err(ProtocolError::FrameTooLarge { len, max });
        }
        // Read into spare capacity: no zeroing of a megabyte per data frame.
        let mut payload = Vec::with_capacity(len);
        (&mut self.inner).take(len as u64).read_to_end(&mut payload).await?;
        if payload.len() < len {
            return Err(ProtocolError::Truncated);
        }
        match head[4] {
            TAG_MESSAGE => Ok(Some(Frame::Message(payload))),
            TAG_DATA => Ok(Some(Frame::Data(payload))),
            TAG_DATA_END => Ok(Some(Frame::DataEnd)),
            tag => Err(ProtocolError::UnknownTag(tag)),
        }
    }

    /// The next frame as a message of type `T`; a closed stream is [`ProtocolError::Truncated`].
    pub async fn message<T: DeserializeOwned>(&mut self) -> Result<T, ProtocolError> {
        match self.next().await? {
            Some(frame) => frame.decode(),
            None => Err(ProtocolError::Truncated),
        }
    }
}

pub struct FrameWriter<W> {
    inner: W,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        FrameWriter { inner }
    }

    pub async fn message<T: Serialize>(&mut self, message: &T) -> Result<(), ProtocolError> {
        let payload = serde_json::to_vec(message)?;
        self.frame(TAG_MESSAGE, &payload).await
    }

    pub async fn data(&mut self, bytes: &[u8]) -> Result<(), ProtocolError> {
        for chunk in bytes.chunks(MAX_DATA_FRAME) {
            self.frame(TAG_DATA, chunk).await?;
        }
        Ok(())
    }

    pub async fn data_end(&mut self) -> Result<(), ProtocolError> {
        self.frame(TAG_DATA_END, &[]).await
    }

    pub async fn flush(&mut self) -> Result<(), ProtocolError> {
        Ok(self.inner.flush().await?)
    }

    async fn frame(&mut self, tag: u8, payload: &[u8]) -> Result<(), ProtocolError> {
        let mut head = [0u8; 5];
        head[..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        head[4] = tag;
        self.inner.write_all(&head).await?;
        self.inner.write_all(payload).await?;
        Ok(())
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Encodes one frame into bytes (tests and tools that craft streams by hand).
pub fn encode_frame(frame: &Frame) -> Vec<u8> {
    let (tag, payload): (u8, &[u8]) = match frame {
        Frame::Message(p) => (TAG_MESSAGE, p),
        Frame::Data(p) => (TAG_DATA, p),
        Frame::DataEnd => (TAG_DATA_END, &[]),
    };
    let mut out = Vec::with_capacity(5 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.push(tag);
    out.extend_from_slice(payload);
    out
}
