//! A throwaway Redis Cluster of three masters for tests, killed and removed on drop.
//!
//! Three `redis-server --cluster-enabled yes` children on free ports in a temporary
//! folder (each with its own cluster bus port, `--cluster-port`, so no port needs to be
//! below 55535), joined by `redis-cli --cluster create … --cluster-replicas 0`, then
//! awaited until `CLUSTER INFO` says `cluster_state:ok` on every node.
//!
//! Self-contained (std, `redis`, `tempfile`): the counters' unit tests and the API tests
//! (`tests/api/cluster.rs`, through `#[path]`) both use it. Missing `redis-server` or
//! `redis-cli` fails the test that asked for a cluster; it never skips.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the cluster may take to form.
const FORM_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on every command the helper sends, so a broken node fails the test, not hangs it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// One master: its client port and process.
struct Node {
    port: u16,
    child: Child,
}

/// The hash slots `start..=end`, served by the master on `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub port: u16,
}

/// A running three-master Redis Cluster on 127.0.0.1.
pub struct ThrowawayCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
    /// The shared cluster's watchdog (see `shared`).
    watchdog: Option<Child>,
}

/// `n` distinct free local ports (all bound at once, so they differ).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

fn connection(port: u16) -> redis::RedisResult<redis::Connection> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
    let conn = client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
    conn.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    conn.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    Ok(conn)
}

impl ThrowawayCluster {
    /// Starts and forms the cluster; panics (fails the test) when it cannot. A start that
    /// fails because another process took a chosen port is retried on new ports.
    pub fn start() -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            match Self::try_start() {
                Ok(cluster) => return cluster,
                Err(why) => last = why,
            }
        }
        panic!("could not start a throwaway Redis Cluster: {last}")
    }

    fn try_start() -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temporary folder: {e}"))?;
        let mut cluster = Self {
            nodes: Vec::new(),
            dir,
            watchdog: None,
        };
        let ports = free_ports(6);
        for pair in ports.chunks(2) {
            let (port, bus) = (pair[0], pair[1]);
            let path = cluster.dir.path();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-port", &bus.to_string()])
                .arg("--cluster-config-file")
                .arg(path.join(format!("nodes-{port}.conf")))
                .arg("--dir")
                .arg(path)
                .arg("--logfile")
                .arg(path.join(format!("redis-{port}.log")))
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("redis-server must be installed to run the Redis Cluster tests: {e}")
                });
            cluster.nodes.push(Node { port, child });
        }
        for i in 0..cluster.nodes.len() {
            cluster.wait_ping(i)?;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let output = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("redis-cli must be installed to run the Redis Cluster tests: {e}")
            });
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        cluster.wait_state_ok()?;
        Ok(cluster)
    }

    /// Waits until node `i` answers PING; an exited node (port taken) is an error.
    fn wait_ping(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            let port = self.nodes[i].port;
            if let Ok(Some(status)) = self.nodes[i].child.try_wait() {
                return Err(format!(
                    "redis-server on port {port} exited ({status}): {}",
                    self.log_tail(port)
                ));
            }
            let ping =
                connection(port).and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("redis-server on port {port} never answered PING"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every node says `cluster_state:ok` (all slots covered, as it sees it).
    fn wait_state_ok(&self) -> Result<(), String> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        for node in &self.nodes {
            loop {
                let info = connection(node.port)
                    .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query::<String>(&mut c))
                    .unwrap_or_default();
                if info.lines().any(|l| l.trim() == "cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "node {} did not reach cluster_state:ok: {info}",
                        node.port
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    fn log_tail(&self, port: u16) -> String {
        let log = std::fs::read_to_string(self.dir.path().join(format!("redis-{port}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// The masters' client ports.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every master.
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The comma-separated URL list the service takes as a cluster address.
    pub fn url_list(&self) -> String {
        self.urls().join(",")
    }

    /// A plain (non-cluster) connection to the node on `port`, for node-local commands.
    pub fn node(&self, port: u16) -> redis::Connection {
        connection(port).unwrap_or_else(|e| panic!("cluster node {port}: {e}"))
    }

    /// `CLUSTER KEYSLOT key`, as the cluster computes it.
    pub fn keyslot(&self, key: &str) -> u16 {
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.node(self.nodes[0].port))
            .expect("CLUSTER KEYSLOT")
    }

    /// The slot ranges of every master, from `CLUSTER NODES` as node `port` sees them.
    pub fn slot_ranges_seen_by(&self, port: u16) -> Vec<SlotRange> {
        let text: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query(&mut self.node(port))
            .expect("CLUSTER NODES");
        let mut ranges = Vec::new();
        // <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || !fields[2].contains("master") {
                continue;
            }
            let addr = fields[1].split('@').next().unwrap_or_default();
            let node_port: u16 = addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("bad CLUSTER NODES line {line}"));
            for slots in &fields[8..] {
                if slots.starts_with('[') {
                    continue; // a slot being migrated or imported
                }
                let (start, end) = slots.split_once('-').unwrap_or((slots, slots));
                ranges.push(SlotRange {
                    start: start.parse().expect("slot"),
                    end: end.parse().expect("slot"),
                    port: node_port,
                });
            }
        }
        ranges.sort_by_key(|r| r.start);
        ranges
    }

    /// The slot ranges of every master, as the first node sees them.
    pub fn slot_ranges(&self) -> Vec<SlotRange> {
        self.slot_ranges_seen_by(self.nodes[0].port)
    }

    /// The port of the master serving `slot`.
    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        self.slot_ranges()
            .iter()
            .find(|r| (r.start..=r.end).contains(&slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
            .port
    }

    /// The port of the master serving `key`, from CLUSTER KEYSLOT and the slot ranges.
    pub fn owner_of(&self, key: &str) -> u16 {
        self.owner_of_slot(self.keyslot(key))
    }

    /// `KEYS pattern` on the node on `port` only (the keys that node holds).
    pub fn keys_on(&self, port: u16, pattern: &str) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut self.node(port))
            .expect("KEYS")
    }

    /// The node id of the master on `port`.
    /// Sends SIGKILL to the node on `port` (its pid from `INFO server`) and waits until
    /// the port refuses connections (the process is reaped when the cluster drops).
    pub fn kill_node(&self, port: u16) {
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query(&mut self.node(port))
            .expect("INFO server");
        let pid = info
            .lines()
            .find_map(|line| line.strip_prefix("process_id:"))
            .expect("INFO server gives the process id")
            .trim()
            .to_owned();
        let status = Command::new("kill").args(["-KILL", &pid]).status();
        assert!(status.expect("run kill").success(), "kill -KILL {pid}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(Instant::now() < deadline, "node {port} still answers");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn node_id(&self, port: u16) -> String {
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut self.node(port))
            .expect("CLUSTER MYID")
    }

    /// Moves `slot` and the keys in it from its master to the master on `to`, the way
    /// `redis-cli --cluster reshard` does (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE on
    /// every master). Clients that cached the old owner get MOVED afterwards.
    pub fn move_slot(&self, slot: u16, to: u16) {
        let from = self.owner_of_slot(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let setslot = |port: u16, args: &[&str]| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(args);
            cmd.query::<()>(&mut self.node(port))
                .unwrap_or_else(|e| panic!("CLUSTER SETSLOT {slot} {args:?} on {port}: {e}"));
        };
        setslot(to, &["IMPORTING", &from_id]);
        setslot(from, &["MIGRATING", &to_id]);
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut self.node(from))
                .expect("CLUSTER GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to)
                .arg("")
                .arg(0)
                .arg(5_000)
                .arg("KEYS")
                .arg(&keys)
                .query::<()>(&mut self.node(from))
                .expect("MIGRATE");
        }
        for port in self.ports() {
            setslot(port, &["NODE", &to_id]);
        }
        let deadline = Instant::now() + FORM_TIMEOUT;
        for port in self.ports() {
            while !self
                .slot_ranges_seen_by(port)
                .iter()
                .any(|r| r.port == to && (r.start..=r.end).contains(&slot))
            {
                assert!(
                    Instant::now() < deadline,
                    "node {port} never learnt that slot {slot} moved to {to}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl ThrowawayCluster {
    /// One cluster for every test of this process that only reads and writes keys
    /// under its own prefix (tests that move slots or flush scripts start their own).
    /// Started on first use; a static is never dropped, so a watchdog process kills
    /// the nodes and removes their folder once this test process has exited.
    pub fn shared() -> &'static ThrowawayCluster {
        static SHARED: std::sync::OnceLock<ThrowawayCluster> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let mut cluster = Self::start();
            cluster.watchdog = Some(cluster.watch_for_exit());
            cluster
        })
    }

    /// Starts `sh` polling this process every 0.5 s; when it is gone, the nodes are
    /// killed and their folder removed.
    fn watch_for_exit(&self) -> Child {
        let pids: Vec<String> = self
            .nodes
            .iter()
            .map(|n| n.child.id().to_string())
            .collect();
        let script = format!(
            "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; kill {pids}; sleep 1; \
             kill -9 {pids} 2>/dev/null; rm -rf '{dir}'",
            parent = std::process::id(),
            pids = pids.join(" "),
            dir = self.dir.path().display(),
        );
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the shared cluster's watchdog (sh)")
    }
}

impl Drop for ThrowawayCluster {
    fn drop(&mut self) {
        for child in self.watchdog.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        // `dir` (nodes-*.conf, logs) is removed when it drops, after the processes.
    }
}
