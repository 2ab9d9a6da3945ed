//! Drives the real `backflow` binary in a project in a temporary folder.
#![allow(dead_code)]

use backflow_testkit::Receiver;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

pub struct Project {
    pub dir: tempfile::TempDir,
    pub receiver: Receiver,
}

pub struct Ran {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Ran {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_backflow"));
    c.env_remove("BACKFLOW_PROJECT").env("NO_COLOR", "1");
    // Tests reach their receivers on loopback directly.
    for proxy in ["HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"] {
        c.env_remove(proxy);
    }
    c
}

pub fn finish(out: Output) -> Ran {
    Ran {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The repository root (where the example project lives).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl Project {
    /// A project with warehouse `wh` (a DuckDB file holding
    /// `items(id, name, score)`) and the sync file `syncs/s.yaml`; `{URL}`
    /// stands for the receiver.
    pub fn new(sync: &str) -> Project {
        Project::with_receiver(sync, Receiver::start())
    }

    /// Like [`Project::new`], with a given receiver.
    pub fn with_receiver(sync: &str, receiver: Receiver) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("backflow.yaml"),
            "warehouses:\n  wh:\n    type: duckdb\n    path: warehouse.duckdb\n",
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("syncs")).unwrap();
        let p = Project { dir, receiver };
        p.write("syncs/s.yaml", sync);
        p.sql("create table items (id INTEGER, name VARCHAR, score INTEGER)");
        p
    }

    pub fn write(&self, file: &str, text: &str) {
        let text = text.replace("{URL}", &self.receiver.url());
        std::fs::write(self.dir.path().join(file), text).unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs SQL against the warehouse file, waiting while a running
    /// `backflow` holds it.
    pub fn sql(&self, sql: &str) {
        let path = self.dir.path().join("warehouse.duckdb");
        for _ in 0..200 {
            match duckdb::Connection::open(&path) {
                Ok(conn) => return conn.execute_batch(sql).unwrap(),
                Err(e) if e.to_string().contains("lock") => std::thread::sleep(std::time::Duration::from_millis(25)),
                Err(e) => panic!("{e}"),
            }
        }
        panic!("the warehouse stayed locked");
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = bin();
        c.arg("--project").arg(self.dir.path()).args(args);
        c
    }

    pub fn backflow(&self, args: &[&str]) -> Ran {
        finish(self.cmd(args).output().unwrap())
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
    }
}

/// A sync of `items` keyed by `id`; `extra` goes under `destination:`.
pub fn sync(mode: &str, extra: &str) -> String {
    format!(
        "warehouse: wh\nquery: select id, name, score from items order by id\nprimary_key: id\nmode: {mode}\n\
         destination:\n  url: \"{{URL}}/hook\"\n  retry: {{attempts: 2, backoff: 5ms}}\n{extra}"
    )
}

/// A copy of the repository's example project (backflow.yaml, syncs/, data).
pub fn example_project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("backflow.yaml"), dir.path().join("backflow.yaml")).unwrap();
    for sub in ["syncs", "syncs/data"] {
        std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        for entry in std::fs::read_dir(repo().join(sub)).unwrap() {
            let p = entry.unwrap().path();
            if p.is_file() {
                std::fs::copy(&p, dir.path().join(sub).join(p.file_name().unwrap())).unwrap();
            }
        }
    }
    dir
}

/// Runs one example sync of `project` against `receiver`.
pub fn run_example(project: &Path, sync: &str, receiver: &Receiver) -> Ran {
    finish(
        bin()
            .arg("--project")
            .arg(project)
            .args(["run", sync])
            .env("BACKFLOW_DEMO_URL", receiver.url())
            .output()
            .unwrap(),
    )
}

/// A running `backflow serve`, its output collected as it comes.
pub struct Serving {
    pub child: Child,
    stdout: std::sync::Arc<std::sync::Mutex<String>>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

fn collect(stream: impl std::io::Read + Send + 'static) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::io::BufRead;
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = text.clone();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut t = sink.lock().unwrap();
            t.push_str(&line);
            t.push('\n');
        }
    });
    text
}

impl Serving {
    /// Starts `backflow serve` in `project` with `args`, its endpoint on a
    /// free port.
    pub fn start(project: &Project, args: &[&str]) -> Serving {
        Serving::start_with(project.cmd(&["serve", "--listen", "127.0.0.1:0"]), args)
    }

    pub fn start_with(mut cmd: Command, args: &[&str]) -> Serving {
        let mut child = cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Serving { child, stdout, stderr }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until the log says `text` (panics after `timeout`).
    pub fn wait_log(&self, text: &str, timeout: std::time::Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let log = self.stderr();
            if log.contains(text) {
                return log;
            }
            assert!(std::time::Instant::now() < deadline, "`{text}` not logged within {timeout:?}:\n{log}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The endpoint's address, once it listens.
    pub fn addr(&self) -> String {
        let log = self.wait_log(" on http://", std::time::Duration::from_secs(60));
        let at = log.find(" on http://").unwrap() + " on http://".len();
        log[at..].split_whitespace().next().unwrap().to_string()
    }

    /// Sends `signal` (e.g. `-TERM`).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill").args([signal, &self.child.id().to_string()]).status().unwrap();
        assert!(sent.success());
    }

    /// Waits for the exit code (panics after `timeout`).
    pub fn wait(&mut self, timeout: std::time::Duration) -> i32 {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the readers take the last lines.
                std::thread::sleep(std::time::Duration::from_millis(100));
                return status.code().unwrap_or(-1);
            }
            assert!(std::time::Instant::now() < deadline, "serve did not exit within {timeout:?}:\n{}", self.stderr());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange with a server on loopback: (status, headers, body).
pub fn http(method: &str, addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let mut parsed = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut parsed);
    let httparse::Status::Complete(head) = response.parse(&raw).unwrap() else { panic!("a partial answer") };
    let status = response.code.unwrap();
    let mut head_text = String::new();
    let mut chunked = false;
    for h in response.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        chunked |= h.name.eq_ignore_ascii_case("transfer-encoding") && value.contains("chunked");
        head_text.push_str(&format!("{}: {value}\n", h.name.to_ascii_lowercase()));
    }
    let mut body = raw[head..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            rest = &rest[line_end + 4 + size..];
        }
        body = out;
    }
    (status, head_text, String::from_utf8_lossy(&body).into_owned())
}

/// GET `path`, waiting while the server is not up yet.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let (status, _, body) = http("GET", addr, path, &[]);
    (status, body)
}
