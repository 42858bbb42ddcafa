//! The admin socket: how management commands reach a running server.
//!
//! redb lets one process hold the data file, so while `gatehouse serve` runs the CLI
//! sends its `Command` here instead. The socket lives at `admin.socket`, by default
//! `<data file>.sock` beside the data file, with mode 0600; a connecting process must
//! also run as the same user as the server, or as root (checked with `SO_PEERCRED`).
//! Protocol: one JSON `Command` line in, one JSON `Reply` line out, then close.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::manage::{self, Command, CommandError, Outcome, Services};

/// Longest accepted request line.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;
/// Longest reply a client accepts (a long token list is still far below this).
const MAX_REPLY_BYTES: u64 = 16 * 1024 * 1024;
/// A client that has not sent its line by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the CLI waits for a command to finish in the server.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// The answer to one command.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    Ok(Outcome),
    Error(CommandError),
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("admin socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} exists and is not a socket; refusing to replace it (set admin.socket to \
         another path)"
    )]
    NotASocket { path: PathBuf },
    #[error("the server at {path} sent a reply that could not be read: {reason}")]
    BadReply { path: PathBuf, reason: String },
    #[error("the server at {path} did not answer within {0:?}", REPLY_TIMEOUT)]
    Timeout { path: PathBuf },
}

/// A bound admin socket, removed from the file system when dropped.
#[derive(Debug)]
pub(crate) struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The server's own uid: the owner of the socket file it just created.
    uid: u32,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

impl AdminSocket {
    /// Binds the socket with mode 0600. The caller holds the data file's lock, so a
    /// socket already at `path` belongs to a server that is gone and is replaced.
    pub(crate) fn bind(path: &Path) -> Result<Self, SocketError> {
        let io_err = |source| SocketError::Io {
            path: path.to_path_buf(),
            source,
        };
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path).map_err(io_err)?,
            Ok(_) => {
                return Err(SocketError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_err(err)),
        }
        // Bind under a temporary name, restrict it, then rename: the socket is never
        // reachable at its real path with looser permissions.
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!(".{}.tmp", std::process::id()));
        let staging = PathBuf::from(staging);
        let _ = fs::remove_file(&staging);
        let listener = UnixListener::bind(&staging).map_err(io_err)?;
        let finish = || -> io::Result<u32> {
            fs::set_permissions(&staging, fs::Permissions::from_mode(0o600))?;
            let uid = fs::metadata(&staging)?.uid();
            fs::rename(&staging, path)?;
            Ok(uid)
        };
        match finish() {
            Ok(uid) => Ok(Self {
                listener,
                path: path.to_path_buf(),
                uid,
            }),
            Err(err) => {
                let _ = fs::remove_file(&staging);
                Err(io_err(err))
            }
        }
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Answers commands until `shutdown` resolves. Each connection runs on its own task.
    pub(crate) async fn serve(
        self,
        services: Services,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                biased;
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) => {
                        tracing::warn!(error = %err, "admin socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let allowed = match stream.peer_cred() {
                Ok(cred) => cred.uid() == self.uid || cred.uid() == 0,
                Err(_) => false,
            };
            if !allowed {
                tracing::warn!("admin socket: refused a client running as another user");
                continue;
            }
            let services = services.clone();
            tokio::spawn(async move {
                if let Err(err) = answer(stream, &services).await {
                    tracing::debug!(error = %err, "admin socket client");
                }
            });
        }
    }
}

async fn answer(stream: UnixStream, services: &Services) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST_BYTES));
    let read = tokio::time::timeout(REQUEST_TIMEOUT, reader.read_line(&mut line)).await;
    let reply = match read {
        Err(_) => return Ok(()),
        Ok(Err(err)) => return Err(err),
        Ok(Ok(_)) if !line.ends_with('\n') => Reply::Error(CommandError::new(
            crate::error_kind::ErrorKind::Invalid,
            "the request is not one line of at most 64 KiB",
        )),
        Ok(Ok(_)) => match serde_json::from_str::<Command>(&line) {
            Ok(command) => match manage::execute(command, services).await {
                Ok(outcome) => Reply::Ok(outcome),
                Err(err) => Reply::Error(err),
            },
            Err(err) => Reply::Error(CommandError::new(
                crate::error_kind::ErrorKind::Invalid,
                format!("the request is not a known command: {err}"),
            )),
        },
    };
    let mut bytes = serde_json::to_vec(&reply).map_err(io::Error::other)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await?;
    write.shutdown().await
}

/// Sends `command` to the server listening at `path`. `Ok(None)` means no server is
/// listening there (no socket, or a stale one), so the caller may open the file itself.
pub(crate) async fn request(path: &Path, command: &Command) -> Result<Option<Reply>, SocketError> {
    let io_err = |source| SocketError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = match UnixStream::connect(path).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(err) => return Err(io_err(err)),
    };
    let mut bytes = serde_json::to_vec(command).map_err(|e| io_err(io::Error::other(e)))?;
    bytes.push(b'\n');
    stream.write_all(&bytes).await.map_err(io_err)?;
    let mut reply = Vec::new();
    let mut limited = stream.take(MAX_REPLY_BYTES);
    let read = limited.read_to_end(&mut reply);
    match tokio::time::timeout(REPLY_TIMEOUT, read).await {
        Err(_) => {
            return Err(SocketError::Timeout {
                path: path.to_path_buf(),
            });
        }
        Ok(result) => {
            result.map_err(io_err)?;
        }
    }
    serde_json::from_slice(&reply)
        .map(Some)
        .map_err(|e| SocketError::BadReply {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}
