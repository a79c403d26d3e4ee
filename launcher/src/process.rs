//! Child processes the launcher owns: spawned in their own process group (so a terminal's
//! Ctrl-C reaches only the launcher, which stops them in order), their output forwarded to
//! the launcher's log, their last stderr lines kept for error reports.

use std::collections::VecDeque;
use std::fmt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use crate::child_log::ChildLine;
use crate::error::LauncherError;

/// How many stderr lines an error report shows.
const STDERR_TAIL_LINES: usize = 20;

/// How long to wait for a dead child's last output to reach the log; a grandchild that
/// inherited the pipes could otherwise keep them open forever.
const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// A bounded buffer of the most recent lines.
#[derive(Debug)]
pub struct LastLines {
    capacity: usize,
    lines: VecDeque<String>,
}

impl LastLines {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            lines: VecDeque::with_capacity(capacity),
        }
    }

    pub fn push(&mut self, line: String) {
        if self.capacity == 0 {
            return;
        }
        if self.lines.len() == self.capacity {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    pub fn snapshot(&self) -> StderrTail {
        StderrTail(self.lines.iter().cloned().collect())
    }

    pub fn last(&self) -> Option<&str> {
        self.lines.back().map(String::as_str)
    }
}

/// The last stderr lines of a child, shown after the message of the error they explain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StderrTail(Vec<String>);

impl StderrTail {
    /// Keeps the last lines of a child's complete stderr, for children run to completion.
    pub fn from_output(stderr: &[u8]) -> Self {
        let mut last = LastLines::new(STDERR_TAIL_LINES);
        for line in String::from_utf8_lossy(stderr).lines() {
            last.push(line.to_owned());
        }
        last.snapshot()
    }

    pub fn last(&self) -> Option<&str> {
        self.0.last().map(String::as_str)
    }
}

impl fmt::Display for StderrTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        f.write_str("; last stderr lines:")?;
        for line in &self.0 {
            write!(f, "\n    {line}")?;
        }
        Ok(())
    }
}

/// A running child process that logs its output and can be stopped gracefully.
pub struct ManagedChild {
    name: String,
    child: Child,
    /// The child leads its own process group, whose id is its pid: signalling the group also
    /// reaches anything it spawned.
    process_group: Option<Pid>,
    stderr_tail: Arc<Mutex<LastLines>>,
    /// Some children answer with their last line of stdout (a path, say).
    last_stdout_line: Arc<Mutex<LastLines>>,
    forwarders: Vec<JoinHandle<()>>,
}

impl ManagedChild {
    pub fn spawn(name: &str, mut command: Command) -> Result<Self, LauncherError> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        die_with_launcher(&mut command);
        let mut child = command.spawn().map_err(|source| LauncherError::Spawn {
            name: name.to_owned(),
            source,
        })?;

        let stderr_tail = Arc::new(Mutex::new(LastLines::new(STDERR_TAIL_LINES)));
        let last_stdout_line = Arc::new(Mutex::new(LastLines::new(1)));
        let mut forwarders = Vec::with_capacity(2);
        if let Some(stdout) = child.stdout.take() {
            forwarders.push(forward_lines(
                name.to_owned(),
                stdout,
                Some(Arc::clone(&last_stdout_line)),
            ));
        }
        if let Some(stderr) = child.stderr.take() {
            forwarders.push(forward_lines(
                name.to_owned(),
                stderr,
                Some(Arc::clone(&stderr_tail)),
            ));
        }
        let process_group = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .map(Pid::from_raw);
        tracing::info!(child = name, pid = child.id(), "started {name}");
        Ok(Self {
            name: name.to_owned(),
            child,
            process_group,
            stderr_tail,
            last_stdout_line,
            forwarders,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Waits for the child to exit by itself.
    pub async fn wait(&mut self) -> Result<ExitStatus, LauncherError> {
        self.child
            .wait()
            .await
            .map_err(LauncherError::io(format!("cannot wait for {}", self.name)))
    }

    /// The exit status if the child has exited, without waiting.
    pub fn exit_status(&mut self) -> Result<Option<ExitStatus>, LauncherError> {
        self.child
            .try_wait()
            .map_err(LauncherError::io(format!("cannot check on {}", self.name)))
    }

    /// Asks the child to stop (SIGTERM), gives it `grace` to do so, then kills its whole
    /// process group so nothing it started outlives it.
    pub async fn stop(&mut self, grace: Duration) {
        if matches!(self.exit_status(), Ok(None)) {
            tracing::info!(
                child = self.name,
                "stopping {} (up to {}s)",
                self.name,
                grace.as_secs()
            );
            self.signal_group(Signal::SIGTERM);
            match timeout(grace, self.child.wait()).await {
                Ok(Ok(status)) => {
                    tracing::info!(child = self.name, "{} exited with {status}", self.name);
                }
                Ok(Err(err)) => {
                    tracing::warn!(child = self.name, "cannot wait for {}: {err}", self.name);
                }
                Err(_) => tracing::warn!(
                    child = self.name,
                    "{} did not stop within {}s, killing it",
                    self.name,
                    grace.as_secs()
                ),
            }
        }
        self.kill().await;
    }

    /// Kills the child's process group at once and reaps the child.
    pub async fn kill(&mut self) {
        self.signal_group(Signal::SIGKILL);
        if let Err(err) = self.child.wait().await {
            tracing::warn!(child = self.name, "cannot wait for {}: {err}", self.name);
        }
    }

    /// The error that reports this child's exit, with its last stderr lines.
    pub async fn exit_error(&mut self, status: ExitStatus) -> LauncherError {
        LauncherError::ChildExited {
            name: self.name.clone(),
            status,
            stderr: self.stderr_tail().await,
        }
    }

    /// The last stderr lines; once the child has exited, first lets its final output arrive.
    pub async fn stderr_tail(&mut self) -> StderrTail {
        self.drain_output_if_exited().await;
        self.stderr_tail
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .snapshot()
    }

    /// The last non-empty line the child printed on stdout; once it has exited, first lets its
    /// final output arrive.
    pub async fn last_stdout_line(&mut self) -> Option<String> {
        self.drain_output_if_exited().await;
        self.last_stdout_line
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last()
            .map(str::to_owned)
    }

    async fn drain_output_if_exited(&mut self) {
        if matches!(self.exit_status(), Ok(Some(_))) {
            let deadline = Instant::now() + OUTPUT_DRAIN_TIMEOUT;
            for forwarder in self.forwarders.drain(..) {
                // A forwarder that misses the deadline keeps running detached; it ends at EOF.
                let _ = tokio::time::timeout_at(deadline, forwarder).await;
            }
        }
    }

    fn signal_group(&self, signal: Signal) {
        let Some(group) = self.process_group else {
            return;
        };
        match killpg(group, signal) {
            // ESRCH: the group is already gone, which is what we want.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(err) => tracing::warn!(
                child = self.name,
                "cannot send {signal} to {}: {err}",
                self.name
            ),
        }
    }
}

/// Logs each line of a child's output stream (see `child_log`), keeping a copy of the last
/// ones if asked.
fn forward_lines(
    name: String,
    stream: impl AsyncRead + Unpin + Send + 'static,
    keep_last: Option<Arc<Mutex<LastLines>>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut reader = BufReader::new(stream);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match reader.read_until(b'\n', &mut buffer).await {
                Ok(0) => break,
                Ok(_) => {
                    // Children may print anything; a bad byte must not stop the forwarding.
                    let line = String::from_utf8_lossy(&buffer);
                    let line = line.trim_end();
                    if line.is_empty() {
                        continue;
                    }
                    let line = ChildLine::parse(line);
                    line.log(&name);
                    if let Some(last) = &keep_last {
                        last.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(line.render());
                    }
                }
                Err(err) => {
                    tracing::warn!(child = name, "cannot read output of {name}: {err}");
                    break;
                }
            }
        }
    })
}

/// Makes the kernel kill the child if the launcher dies without stopping it (SIGKILL, a
/// crash), so no shard or router is ever orphaned. The signal fires when the spawning
/// thread exits, which is why the launcher runs a single-threaded runtime.
#[cfg(target_os = "linux")]
fn die_with_launcher(command: &mut Command) {
    let launcher = nix::unistd::getpid();
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe calls
    // are allowed: prctl and getppid are, and nothing here allocates.
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // The launcher may have died before prctl took effect; then no signal would come.
            if nix::unistd::getppid() != launcher {
                return Err(nix::errno::Errno::ESRCH.into());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_launcher(_command: &mut Command) {}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(tail: &StderrTail) -> Vec<&str> {
        tail.0.iter().map(String::as_str).collect()
    }

    #[test]
    fn last_lines_keeps_only_the_most_recent() {
        let mut last = LastLines::new(3);
        for line in ["a", "b", "c", "d", "e"] {
            last.push(line.to_owned());
        }
        assert_eq!(lines(&last.snapshot()), ["c", "d", "e"]);
    }

    #[test]
    fn last_lines_with_no_capacity_keeps_nothing() {
        let mut last = LastLines::new(0);
        last.push("a".to_owned());
        assert_eq!(last.snapshot(), StderrTail::default());
    }

    #[test]
    fn stderr_tail_from_output_keeps_the_last_lines() {
        let stderr: String = (0..30).map(|i| format!("line {i}\n")).collect();
        let tail = StderrTail::from_output(stderr.as_bytes());
        assert_eq!(tail.0.len(), STDERR_TAIL_LINES);
        assert_eq!(tail.0.first().map(String::as_str), Some("line 10"));
        assert_eq!(tail.0.last().map(String::as_str), Some("line 29"));
    }

    #[test]
    fn stderr_tail_display() {
        assert_eq!(StderrTail::default().to_string(), "");
        let tail = StderrTail(vec!["Traceback".to_owned(), "OSError: boom".to_owned()]);
        assert_eq!(
            tail.to_string(),
            "; last stderr lines:\n    Traceback\n    OSError: boom"
        );
    }

    #[tokio::test]
    async fn a_failing_child_reports_its_last_stderr_lines() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo out; echo first >&2; echo second >&2; exit 3"]);
        let mut child = ManagedChild::spawn("test-child", command).expect("sh runs");
        let status = child.wait().await.expect("child exits");
        assert_eq!(status.code(), Some(3));
        let message = child.exit_error(status).await.to_string();
        assert_eq!(
            message,
            "test-child exited with exit status: 3; last stderr lines:\n    first\n    second"
        );
    }

    #[tokio::test]
    async fn the_last_stdout_line_is_kept() {
        let mut command = Command::new("sh");
        command.args(["-c", "echo first; echo; echo /the/answer; echo noise >&2"]);
        let mut child = ManagedChild::spawn("answering-child", command).expect("sh runs");
        assert!(child.wait().await.expect("child exits").success());
        assert_eq!(
            child.last_stdout_line().await.as_deref(),
            Some("/the/answer")
        );
        assert_eq!(child.stderr_tail().await.last(), Some("noise"));
    }

    #[tokio::test]
    async fn stop_ends_a_child_that_ignores_sigterm() {
        let mut command = Command::new("sh");
        command.args(["-c", "trap '' TERM; sleep 30"]);
        let mut child = ManagedChild::spawn("stubborn", command).expect("sh runs");
        let started = std::time::Instant::now();
        child.stop(Duration::from_millis(200)).await;
        assert!(matches!(child.exit_status(), Ok(Some(_))));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
