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
