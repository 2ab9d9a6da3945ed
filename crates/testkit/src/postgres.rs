//! Real Postgres for tests: a fresh database per test on the local server,
//! and a scripted server that refuses every login with a given error.

use sqlx::{Connection, Executor, PgConnection};
use std::io::{Read, Write};
use std::net::TcpListener;

/// The server tests use: `BACKFLOW_TEST_POSTGRES_URL`, or the local one.
pub fn server_url() -> String {
    std::env::var("BACKFLOW_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database created for one test and dropped after it.
pub struct TestDatabase {
    /// Connection URL of the database.
    pub url: String,
    name: String,
}

/// Runs `sql` (one or more statements) on a connection to `url`, on a
/// private runtime and thread, so it works from sync and async tests alike.
fn run_sql(url: String, sql: String) -> Result<(), sqlx::Error> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        runtime.block_on(async move {
            let mut conn = PgConnection::connect(&url).await?;
            let out = conn.execute(sqlx::raw_sql(sqlx::AssertSqlSafe(sql))).await;
            let _ = conn.close().await;
            out.map(|_| ())
        })
    })
    .join()
    .expect("the Postgres helper thread panicked")
}

impl TestDatabase {
    /// Creates a fresh, empty database. When the server cannot be reached
    /// this returns `None` (the caller skips) — except with `CI=true`, where
    /// it panics, so CI never passes by skipping.
    pub fn create() -> Option<TestDatabase> {
        let admin = server_url();
        let name = format!("backflow_test_{}_{}", std::process::id(), fastrand::u64(..));
        match run_sql(admin.clone(), format!("CREATE DATABASE {name}")) {
            Ok(_) => {}
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("CI=true and the test Postgres at {admin} is unreachable: {e}")
            }
            Err(e) => {
                eprintln!("skipping: no test Postgres at {admin} ({e}); set BACKFLOW_TEST_POSTGRES_URL");
                return None;
            }
        }
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("BACKFLOW_TEST_POSTGRES_URL must end with /DATABASE"),
        };
        Some(TestDatabase { url, name })
    }

    /// Runs SQL statements (several, separated by `;`) in the database.
    pub fn execute(&self, sql: &str) {
        run_sql(self.url.clone(), sql.to_string()).unwrap_or_else(|e| panic!("test SQL failed: {e}"));
    }

    /// The first column of the first row of `sql`, a `bigint`.
    pub fn query_i64(&self, sql: &str) -> i64 {
        let (url, sql) = (self.url.clone(), sql.to_string());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(async move {
                let mut conn = PgConnection::connect(&url).await?;
                let value: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&mut conn).await?;
                let _ = conn.close().await;
                Ok::<i64, sqlx::Error>(value)
            })
        })
        .join()
        .expect("the Postgres helper thread panicked")
        .unwrap_or_else(|e| panic!("test SQL failed: {e}"))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = run_sql(server_url(), format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
    }
}

/// A server on 127.0.0.1 that speaks just enough of the Postgres protocol
/// to ask for a password and then refuse the login with `code` and
/// `message`, like a server with password authentication would.
pub struct RefusingPostgres {
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl RefusingPostgres {
    /// Starts the server; it answers every connection the same way.
    pub fn start(code: &'static str, message: &'static str) -> RefusingPostgres {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local address").port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = refuse(&mut stream, code, message);
            }
        });
        RefusingPostgres { port }
    }
}

fn read_message(stream: &mut std::net::TcpStream, tagged: bool) -> std::io::Result<(u8, Vec<u8>)> {
    let mut tag = [0u8; 1];
    if tagged {
        stream.read_exact(&mut tag)?;
    }
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let mut body = vec![0u8; (u32::from_be_bytes(len) as usize).saturating_sub(4)];
    stream.read_exact(&mut body)?;
    Ok((tag[0], body))
}

fn refuse(stream: &mut std::net::TcpStream, code: &str, message: &str) -> std::io::Result<()> {
    // An SSLRequest (code 80877103) is declined; then comes the startup message.
    let (_, mut startup) = read_message(stream, false)?;
    if startup.get(..4) == Some(&80877103u32.to_be_bytes()) {
        stream.write_all(b"N")?;
        startup = read_message(stream, false)?.1;
    }
    let _ = startup;
    // AuthenticationCleartextPassword, then the password message.
    stream.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 3])?;
    read_message(stream, true)?;
    let mut fields = Vec::new();
    for (t, v) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        fields.push(t);
        fields.extend_from_slice(v.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&((fields.len() + 4) as u32).to_be_bytes());
    out.extend_from_slice(&fields);
    stream.write_all(&out)
}
