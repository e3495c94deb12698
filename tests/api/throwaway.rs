//! Throwaway servers that tests start, break and restart on their own: a Redis on a
//! free port (killed on drop). Shared by the end-to-end and scenario suites.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A redis-server child process on its own port, killed on drop.
pub struct ThrowawayRedis {
    pub port: u16,
    child: Option<Child>,
}

impl ThrowawayRedis {
    pub fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be installed for this test");
        // Polled often: the fault tests restart Redis and time how long it was away.
        let deadline = Instant::now() + Duration::from_secs(10);
        let url = format!("redis://127.0.0.1:{port}");
        while redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "throwaway redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Self {
            port,
            child: Some(child),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Sends a signal (`-STOP` freezes it, `-CONT` thaws it).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A free local port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
