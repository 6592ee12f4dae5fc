//! systemd notifications (`READY=1`, `WATCHDOG=1`, `STOPPING=1`) over `NOTIFY_SOCKET`, and the watchdog rule: ping only when the main loop made progress.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call does nothing. `WatchdogSec` in the
//! unit sets `WATCHDOG_USEC`; a daemon pings from its main loop after a cycle that
//! finished, so a hung loop stops the pings and systemd restarts the daemon.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go; `None`: not run by systemd.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<PathBuf>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET` and `WATCHDOG_USEC` (honoured only when `WATCHDOG_PID`,
    /// if set, is this process).
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET").map(PathBuf::from);
        let pid_ok = std::env::var("WATCHDOG_PID")
            .ok()
            .map(|p| p.trim().parse::<u32>().ok() == Some(std::process::id()))
            .unwrap_or(true);
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && pid_ok)
            .map(Duration::from_micros);
        Notifier { socket, watchdog }
    }

    /// Notifications to `socket` (tests), with a watchdog timeout.
    pub fn to_socket(socket: PathBuf, watchdog: Option<Duration>) -> Notifier {
        Notifier {
            socket: Some(socket),
            watchdog,
        }
    }

    /// The unit's `WatchdogSec`, if the watchdog is on.
    pub fn watchdog_timeout(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1`: startup is done.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// `WATCHDOG=1`: the main loop finished a cycle. Call only after real progress.
    pub fn alive(&self) {
        if self.watchdog.is_some() {
            self.send("WATCHDOG=1");
        }
    }

    /// `STOPPING=1`.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    fn send(&self, msg: &str) {
        let Some(path) = &self.socket else { return };
        if let Err(e) = send_to(path, msg) {
            tracing::warn!(socket = %path.display(), "systemd notify {msg:?} failed: {e}");
        }
    }
}

fn send_to(path: &std::path::Path, msg: &str) -> std::io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_os_str().as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket (systemd uses them in containers).
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(msg.as_bytes(), &addr)?;
    } else {
        sock.send_to(msg.as_bytes(), path)?;
    }
    Ok(())
}

/// Pings the watchdog at half its timeout while `progress` says the main loop moved
/// since the last ping. `progress` is a counter the main loop bumps once per cycle.
pub fn spawn_watchdog(
    notifier: Notifier,
    progress: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Option<tokio::task::JoinHandle<()>> {
    let timeout = notifier.watchdog_timeout()?;
    Some(tokio::spawn(async move {
        let mut seen = progress.load(std::sync::atomic::Ordering::Relaxed);
        let mut tick = tokio::time::interval(timeout / 2);
        loop {
            tick.tick().await;
            let now = progress.load(std::sync::atomic::Ordering::Relaxed);
            if now != seen {
                seen = now;
                notifier.alive();
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    fn recv_all(sock: &UnixDatagram) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = sock.recv(&mut buf) {
            out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        out
    }

    #[test]
    fn ready_and_watchdog_reach_the_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_nonblocking(true).expect("nonblocking");
        let n = Notifier::to_socket(path, Some(Duration::from_secs(10)));
        n.ready();
        n.alive();
        n.stopping();
        assert_eq!(recv_all(&sock), ["READY=1", "WATCHDOG=1", "STOPPING=1"]);
    }

    #[test]
    fn no_watchdog_no_pings_and_no_socket_no_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_nonblocking(true).expect("nonblocking");
        Notifier::to_socket(path, None).alive();
        assert!(recv_all(&sock).is_empty());
        Notifier::default().ready(); // outside systemd: nothing, no panic
    }

    #[tokio::test]
    async fn pings_only_while_the_loop_makes_progress() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind");
        sock.set_nonblocking(true).expect("nonblocking");
        let progress = Arc::new(AtomicU64::new(0));
        let n = Notifier::to_socket(path, Some(Duration::from_millis(400)));
        let task = spawn_watchdog(n, progress.clone()).expect("watchdog on");
        // The loop moves: one ping per watchdog half-period.
        for _ in 0..3 {
            progress.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::task::yield_now().await;
        let moving = recv_all(&sock).len();
        assert!(moving >= 1, "pings while progressing: {moving}");
        // The loop hangs: no more pings, so systemd would restart the daemon.
        tokio::time::sleep(Duration::from_millis(300)).await;
        recv_all(&sock); // a ping for the last step may land just after the check above
        tokio::time::sleep(Duration::from_millis(1000)).await;
        tokio::task::yield_now().await;
        assert_eq!(recv_all(&sock).len(), 0);
        task.abort();
    }
}
