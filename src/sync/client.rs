//! The CLI's side of one agent session: handshake and manifest, batches (packed on a blocking
//! thread, streamed as data frames), restart requests, goodbye. It knows the protocol, not the
//! sync state: what to send is the session's business.

use std::path::PathBuf;
use std::time::Duration;

use devloop_agent::manifest::{Digest, Record};
use devloop_agent::protocol::{
    self, Applied, Chmod, FrameReader, FrameWriter, FromAgent, ProtocolError, RestartReport, ToAgent, DATA_CHUNK,
};
use tokio::io::BufWriter;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::pack::{self, ChunkWriter, Packed};
use super::transport::{Transport, Writer};
use super::SessionError;
use crate::report::{Event, Progress, Reporter};

/// An open session with the agent. Messages the agent sends on its own (the app's output and
/// exits) are shown as they come, whatever the client is waiting for.
/// The buffer of the frames sent: below [`DATA_CHUNK`], see [`AgentClient::connect`].
const FRAME_BUFFER: usize = 64 << 10;

pub struct AgentClient {
    out: FrameWriter<BufWriter<Writer>>,
    rx: mpsc::UnboundedReceiver<Result<FromAgent, ProtocolError>>,
    reader: JoinHandle<()>,
    child: Option<tokio::process::Child>,
    reporter: Reporter,
    /// The ping waiting for its pong, and when it was sent.
    ping: Option<(u64, tokio::time::Instant)>,
    pings: u64,
}

/// How often an idle session makes sure the agent still answers.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// How long a ping may wait for its answer before the stream counts as gone.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(5);

/// What the agent said first: its version, and the digest and size of the tree it holds (the
/// records follow only when asked for, see [`AgentClient::manifest`]).
pub struct Greeting {
    pub agent: String,
    pub digest: Digest,
    pub entries: u64,
    /// The largest file the agent takes (0: it did not say).
    pub max_file_size: u64,
    /// The agent answered from its live index, without walking its tree.
    pub from_memory: bool,
    /// The agent's app waits for a restart to start (see `FromAgent::Welcome`).
    pub app_waiting: bool,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl AgentClient {
    /// Opens the transport, shakes hands, says hello (`session` names this CLI process across
    /// reconnects; `excludes` what the agent leaves out of its manifest) and reads the digest of
    /// the agent's manifest. `limits`: how long the agent may take to welcome the client (from the
    /// start), and then to read its tree and send the digest.
    pub async fn connect(
        transport: &dyn Transport,
        session: &str,
        (excludes, docker_context): (&[String], Option<&str>),
        reporter: &Reporter,
        limits: (Duration, Duration),
    ) -> Result<(AgentClient, Greeting), SessionError> {
        let (welcome_limit, scan_limit) = limits;
        let deadline = tokio::time::Instant::now() + welcome_limit;
        let connection = tokio::time::timeout_at(deadline, transport.connect())
            .await
            .map_err(|_| SessionError::Timeout(welcome_limit))??;
        let mut reader = connection.reader;
        // Messages are gathered here; data frames (`DATA_CHUNK`) are larger than the buffer and go
        // straight to the transport, never copied into it.
        let mut writer = BufWriter::with_capacity(FRAME_BUFFER, connection.writer);
        tokio::time::timeout_at(deadline, protocol::handshake(&mut reader, &mut writer))
            .await
            .map_err(|_| SessionError::Timeout(welcome_limit))??;
        let mut frames = FrameReader::new(reader);
        let mut out = FrameWriter::new(writer);
        let hello = ToAgent::Hello {
            client: format!("devloop {}", env!("CARGO_PKG_VERSION")),
            session: session.to_string(),
            excludes: excludes.to_vec(),
            docker_context: docker_context.map(str::to_owned),
            ask: true,
        };
        out.message(&hello).await?;
        out.flush().await?;
        let mut agent = String::new();
        let (mut max_file_size, mut app_waiting) = (0, false);
        let (mut deadline, mut limit) = (deadline, welcome_limit);
        let greeting = loop {
            let message = tokio::time::timeout_at(deadline, frames.message::<FromAgent>())
                .await
                .map_err(|_| SessionError::Timeout(limit))??;
            match message {
                FromAgent::Welcome { agent: version, max_file_size: max, app_waiting: waiting, .. } => {
                    agent = version;
                    max_file_size = max;
                    app_waiting = waiting;
                    // The agent is there; now it reads its tree.
                    (deadline, limit) = (tokio::time::Instant::now() + scan_limit, scan_limit);
                }
                FromAgent::ManifestDigest { digest, entries, from_memory } => {
                    break Greeting { agent, digest, entries, max_file_size, from_memory, app_waiting }
                }
                FromAgent::Fatal { message } => return Err(SessionError::Agent(message)),
                other @ (FromAgent::Output { .. } | FromAgent::Exited { .. }) => {
                    show_app_message(reporter, other);
                }
                other => {
                    return Err(ProtocolError::Unexpected {
                        expected: "the manifest's digest",
                        got: format!("{other:?}"),
                    }
                    .into())
                }
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let message = match frames.next().await {
                    Ok(Some(frame)) => frame.decode::<FromAgent>(),
                    Ok(None) => Err(ProtocolError::Truncated),
                    Err(e) => Err(e),
                };
                let stop = message.is_err();
                if tx.send(message).is_err() || stop {
                    break;
                }
            }
        });
        let client =
            AgentClient { out, rx, reader, child: connection.child, reporter: reporter.clone(), ping: None, pings: 0 };
        Ok((client, greeting))
    }

    /// Answers the manifest's digest: the agent's records when `wanted` (the digests differ),
    /// each handed to `each` as it arrives; none when not (the trees are equal). Problems the
    /// agent met reading its tree are shown.
    pub async fn manifest(&mut self, wanted: bool, mut each: impl FnMut(Record)) -> Result<(), SessionError> {
        self.out.message(&ToAgent::Manifest { wanted }).await?;
        self.out.flush().await?;
        loop {
            match self.next().await? {
                FromAgent::Manifest { records } => records.into_iter().for_each(&mut each),
                FromAgent::ManifestEnd { problems, .. } => {
                    for p in problems {
                        self.reporter.emit(Event::Problem { path: format!("(target) {}", p.path), message: p.message });
                    }
                    return Ok(());
                }
                other => {
                    return Err(ProtocolError::Unexpected { expected: "the manifest", got: format!("{other:?}") }.into())
                }
            }
        }
    }

    /// Sends one batch: deletions and exec-bit changes in the message, the upserts packed from
    /// `root` into the tar stream. Returns the agent's answer and what was packed.
    pub async fn batch(
        &mut self,
        id: u64,
        deletes: Vec<String>,
        chmods: Vec<Chmod>,
        upserts: Vec<pack::Upsert>,
        root: PathBuf,
        progress: Progress,
    ) -> Result<(Applied, Packed), SessionError> {
        self.out.message(&ToAgent::Batch { id, deletes, chmods }).await?;
        // Pack on a blocking thread; chunks flow through a small channel into data frames.
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(4);
        let packer = tokio::task::spawn_blocking(move || {
            let sink = ChunkWriter::new(DATA_CHUNK, |chunk| {
                tx.blocking_send(chunk).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "session gone"))
            });
            pack::pack(&root, &upserts, sink, &|n| progress.inc(n))
        });
        let mut send_error = None;
        while let Some(chunk) = rx.recv().await {
            if let Err(e) = self.out.data(&chunk).await {
                send_error = Some(e);
                break;
            }
        }
        drop(rx);
        let packed = packer.await.expect("pack task panicked");
        if let Some(e) = send_error {
            return Err(e.into());
        }
        let packed = packed?;
        self.out.data_end().await?;
        self.out.flush().await?;
        loop {
            match self.next().await? {
                FromAgent::Applied(applied) if applied.id == id => return Ok((applied, packed)),
                other => debug!(?other, "message while waiting for the batch's acknowledgement"),
            }
        }
    }

    /// Asks for a restart (`ToAgent::Restart`) or for the app to be running and ready
    /// (`ToAgent::Ready`), and waits for the report.
    pub async fn restart(&mut self, request: ToAgent) -> Result<RestartReport, SessionError> {
        self.out.message(&request).await?;
        self.out.flush().await?;
        loop {
            match self.next().await? {
                FromAgent::Restart(report) => return Ok(report),
                other => debug!(?other, "message while waiting for the restart"),
            }
        }
    }

    /// The next message that is not the app's own (shown on the way); a fatal message or a
    /// broken stream is an error.
    pub async fn next(&mut self) -> Result<FromAgent, SessionError> {
        loop {
            match self.rx.recv().await {
                None => return Err(ProtocolError::Truncated.into()),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(FromAgent::Fatal { message })) => return Err(SessionError::Agent(message)),
                Some(Ok(FromAgent::Pong { id })) => {
                    if self.ping.is_some_and(|(sent, _)| sent == id) {
                        self.ping = None;
                    }
                }
                Some(Ok(message)) => {
                    if let Some(other) = show_app_message(&self.reporter, message) {
                        return Ok(other);
                    }
                }
            }
        }
    }

    /// One beat of the heartbeat of an idle session (called every [`HEARTBEAT`]): a ping when
    /// none is waiting for its answer, and an error when the one waiting has had none for
    /// [`REPLY_DEADLINE`] (the link or the cluster went silent; TCP would retransmit for
    /// minutes before saying so).
    pub async fn heartbeat(&mut self) -> Result<(), SessionError> {
        match self.ping {
            Some((_, sent)) if sent.elapsed() >= REPLY_DEADLINE => Err(SessionError::Silent(REPLY_DEADLINE)),
            Some(_) => Ok(()),
            None => {
                self.pings += 1;
                self.ping = Some((self.pings, tokio::time::Instant::now()));
                self.out.message(&ToAgent::Ping { id: self.pings }).await?;
                self.out.flush().await?;
                Ok(())
            }
        }
    }

    /// Says goodbye and lets the transport wind down.
    pub async fn close(mut self) {
        let _ = self.out.message(&ToAgent::Bye).await;
        let _ = self.out.flush().await;
        // The agent ends its side once it read the goodbye: wait for that, so that the goodbye
        // is not lost with this process (a transport may not close the agent's stdin).
        // The app's last lines on the way are still shown.
        let reporter = self.reporter.clone();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(message)) = self.rx.recv().await {
                show_app_message(&reporter, message);
            }
        })
        .await;
        if let Some(mut child) = self.child.take() {
            if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

/// Shows the app's output and exits; gives back any other message.
fn show_app_message(reporter: &Reporter, message: FromAgent) -> Option<FromAgent> {
    match message {
        FromAgent::Output { stream, line } => {
            reporter.emit(Event::Output { stream, line });
            None
        }
        FromAgent::Exited { pid, code } => {
            reporter.emit(Event::Exited { pid, code });
            None
        }
        other => Some(other),
    }
}
