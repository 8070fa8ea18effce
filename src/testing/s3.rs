//! A real S3-protocol server (`moto_server`) on a free 127.0.0.1 port, for one test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::storage::CheckpointStorage;

/// A running moto_server with one bucket; stopped when dropped.
pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The bucket created at start.
    pub bucket: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn http(port: u16, request: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

impl S3Server {
    /// Starts moto_server and creates `bucket`. Panics with a hint when moto is missing.
    pub fn start(bucket: &str) -> Self {
        let port = free_port();
        let port_arg = port.to_string();
        let spawn = |program: &str, prefix: &[&str]| {
            Command::new(program)
                .args(prefix)
                .args(["-H", "127.0.0.1", "-p", &port_arg])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        };
        let child = spawn("moto_server", &[])
            .or_else(|_| spawn("python3", &["-m", "moto.server"]))
            .expect("moto_server not found: run scripts/bootstrap.sh (make test does)");
        let mut server = Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: bucket.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let req = format!(
                "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            match http(port, &req) {
                Ok(resp)
                    if resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200") =>
                {
                    break
                }
                Ok(resp) if Instant::now() > deadline => panic!("cannot create bucket: {resp}"),
                Err(e) if Instant::now() > deadline => panic!("moto_server did not start: {e}"),
                _ => {
                    if let Ok(Some(status)) = server.child.try_wait() {
                        panic!("moto_server exited: {status}");
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        server.bucket = bucket.to_string();
        server
    }

    /// Storage at `s3://bucket/prefix` on this server.
    pub fn storage(&self, prefix: &str) -> CheckpointStorage {
        CheckpointStorage::open_with(
            &format!("s3://{}/{prefix}", self.bucket),
            [
                ("aws_endpoint", self.endpoint.as_str()),
                ("aws_allow_http", "true"),
                ("aws_access_key_id", "test"),
                ("aws_secret_access_key", "test"),
                ("aws_region", "us-east-1"),
            ],
        )
        .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
