//! Under `Type=notify`: the binary tells systemd it is ready only once it serves, pings
//! the watchdog while healthy, and says when it stops. systemd's side is played by a
//! Unix datagram socket named in `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use crate::binary::{Server, serve_cmd};

fn messages_until(socket: &UnixDatagram, wanted: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = text.lines().any(|l| l == wanted);
            seen.push(text);
            if done {
                break;
            }
        }
    }
    seen
}

#[test]
fn ready_watchdog_and_stopping_reach_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let inner = serve_cmd(&dir.path().join("gatehouse.redb"));
    // systemd names the watched process in WATCHDOG_PID: a shell that sets it to its own
    // pid, then becomes gatehouse, does the same.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "WATCHDOG_PID=$$ exec \"$@\"", "sh"])
        .arg(inner.get_program())
        .args(inner.get_args())
        .stdin(std::process::Stdio::null());
    for (name, value) in inner.get_envs() {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    cmd.env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000");
    let server = Server::start_ok(cmd);
    let ready = messages_until(&socket, "READY=1", Duration::from_secs(5));
    let first = ready
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1: {ready:?}"));
    assert!(
        first.contains(&format!("STATUS=serving on {}", server.addr)),
        "{first}"
    );
    let pings = messages_until(&socket, "WATCHDOG=1", Duration::from_secs(2));
    assert!(
        pings
            .iter()
            .any(|m| m == "WATCHDOG=1\n" || m == "WATCHDOG=1"),
        "watchdog pings: {pings:?}"
    );
    let pid = server.pid();
    let stopping = std::thread::spawn(move || server.stop_ok());
    let seen = messages_until(&socket, "STOPPING=1", Duration::from_secs(10));
    assert!(
        seen.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 from {pid}: {seen:?}"
    );
    stopping.join().unwrap();
}
