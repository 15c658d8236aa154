//! proto/ is a real contract: a Python host and a Python renderer (stock grpcio, stubs generated
//! from proto/ at run time by `clients/python/broker_demo.py`) talk to a real daemon over its Unix
//! socket. The host answers a v1 login delegate call, the renderer gets the host's code back, a v2
//! login through the JSON bridge is answered by the daemon, and the app backend exchanges the code.
//! A wrong host token is refused just as it is for Rust hosts, and a server of another uid on the
//! daemon's address gets no token at all.
//!
//! Without `python3` or its `grpcio`/`grpcio-tools` packages the tests FAIL with the command that
//! installs them: a test that could not run must never show as passed. The README's test command
//! installs `clients/python/requirements.txt` first, so it runs them for real.

mod support;

use std::{path::Path, process::Output};

use support::{Daemon, within};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../clients/python/broker_demo.py");

/// What makes the Python side runnable.
const INSTALL: &str = "python3 -m pip install -r clients/python/requirements.txt";

/// Fails the test, with the install command, when the Python side cannot run here.
async fn require_python() {
    if let Some(why) = python_missing().await {
        panic!("cannot run the Python client: {why}; install it with `{INSTALL}` (the README's test command does)");
    }
}

/// Why the Python side cannot run here, if it cannot.
async fn python_missing() -> Option<String> {
    let probe =
        tokio::process::Command::new("python3").args(["-c", "import grpc, grpc_tools"]).kill_on_drop(true).output();
    match within("python3 probe", probe).await {
        Err(e) => Some(format!("python3 is not available ({e})")),
        Ok(out) if !out.status.success() => Some(format!(
            "python3 lacks grpcio/grpcio-tools: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()
        )),
        Ok(_) => None,
    }
}

async fn run_script(socket: &str, token_file: &Path) -> Output {
    let child = tokio::process::Command::new("python3")
        .arg(SCRIPT)
        .args(["--socket", socket, "--token-file"])
        .arg(token_file)
        .kill_on_drop(true)
        .output();
    within("python broker_demo.py", child).await.expect("python3 runs")
}

#[tokio::test]
async fn python_host_and_renderer_run_v1_and_v2_login() {
    require_python().await;
    let daemon = Daemon::start().await;
    let out = run_script(&daemon.address(), daemon.server.token_file()).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed ({}):\n{stdout}\n{stderr}", out.status);

    let lines: Vec<&str> = stdout.lines().collect();
    let expected_prefixes = [
        "ok the server at ",
        "ok stubs generated from ",
        "ok host connected (daemon ",
        "ok launched wxpython00000001 as v1 (app.json)",
        "ok v1 login errMsg=login:ok code=host's",
        "ok v1 session stream half-closed by grpcio got 3 answers",
        "ok bogus launch token refused UNAUTHENTICATED",
        "ok v2 invoke login errMsg=login:ok",
        "ok exchange code2Session returned an openid",
        "python client: all ok",
    ];
    assert_eq!(lines.len(), expected_prefixes.len(), "output lines:\n{stdout}");
    for (line, prefix) in lines.iter().zip(expected_prefixes) {
        assert!(line.starts_with(prefix), "expected {prefix:?}, got {line:?}");
    }
    println!("{}", lines[lines.len() - 1]);

    // The daemon side agrees: both instances exist with the versions their app.json chose.
    let mut apps: Vec<(String, &'static str)> =
        daemon.server.broker().registry.list().iter().map(|i| (i.app_id.to_string(), i.version_label().0)).collect();
    apps.sort();
    assert_eq!(apps, [("wxpython00000001".to_owned(), "v1"), ("wxpython00000002".to_owned(), "v2")]);
}

#[tokio::test]
async fn python_host_with_a_wrong_token_is_refused() {
    require_python().await;
    let daemon = Daemon::start().await;
    let wrong = daemon.dir.path().join("wrong.token");
    std::fs::write(&wrong, "not-the-host-token\n").unwrap();
    let out = run_script(&daemon.address(), &wrong).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    assert!(stderr.contains("FAIL Host.Connect refused: StatusCode.UNAUTHENTICATED"), "stderr: {stderr}");
    assert!(daemon.server.broker().host.current().is_none(), "no host may be connected");
    assert_eq!(daemon.server.broker().registry.len(), 0);
}

/// A server of another uid (a Python listener run as `nobody`) where the daemon would be: the
/// script refuses it with the Rust client's words before the host token goes out, and the only
/// connection that reached it (the script's SO_PEERCRED probe) sent it nothing.
#[tokio::test]
async fn python_client_refuses_a_server_of_another_uid_before_sending_its_token() {
    use std::os::unix::fs::PermissionsExt;
    use tokio::io::AsyncBufReadExt;
    require_python().await;
    // SAFETY: geteuid has no preconditions.
    assert_eq!(unsafe { libc::geteuid() }, 0, "a server running as another uid needs root; the suite runs as root");
    const NOBODY: u32 = 65534;
    const SQUATTER: &str = r#"
import os, socket, sys
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o777)
server.listen(8)
print("ready", flush=True)
while True:
    conn, _ = server.accept()
    conn.settimeout(15)
    got = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    conn.close()
    if got == b"end":
        break
    print(f"sent {len(got)}", flush=True)
"#;
    let dir = tempfile::Builder::new().prefix("brokerd-squat").tempdir().expect("temp dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let socket = dir.path().join("brokerd.sock");
    let mut squatter = tokio::process::Command::new("python3")
        .args(["-c", SQUATTER])
        .arg(&socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the squatter runs");
    let mut lines = tokio::io::BufReader::new(squatter.stdout.take().unwrap()).lines();
    let ready = within("the squatter listens", lines.next_line()).await.expect("read");
    assert_eq!(ready.as_deref(), Some("ready"));

    let token = dir.path().join("host.token");
    std::fs::write(&token, "the-host-token\n").unwrap();
    let out = run_script(&socket.display().to_string(), &token).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let expected = format!(
        "FAIL the server at {} runs as uid {NOBODY}, not as this user (uid 0); refusing to send it anything",
        socket.display()
    );
    assert_eq!(stderr.trim(), expected);

    std::os::unix::net::UnixStream::connect(&socket)
        .and_then(|mut end| std::io::Write::write_all(&mut end, b"end"))
        .unwrap();
    let mut reported = Vec::new();
    while let Some(line) = within("the squatter reports", lines.next_line()).await.expect("read") {
        reported.push(line);
    }
    assert_eq!(reported, ["sent 0"], "only the probe reached the other uid's server, and it sent nothing");
}
