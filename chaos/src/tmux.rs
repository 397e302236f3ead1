//! A detached tmux session running one interactive client (ssh -tt, kubectl exec -it): the
//! test types into its pane, reads what the pane shows and resizes its window, as a person at
//! a terminal would. The session is killed when the value is dropped.

use std::process::Command;
use std::time::Duration;

pub struct Tmux {
    pub name: String,
}

impl Tmux {
    /// Starts `command` (run by tmux through the shell) in a new detached session of
    /// `width` x `height`.
    pub fn start(command: &str, width: u16, height: u16) -> Self {
        let name = format!("vigil-{}", crate::random_suffix());
        let st = Command::new("tmux")
            .args(["new-session", "-d", "-s", &name])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .arg(command)
            .status()
            .expect("tmux runs");
        assert!(st.success(), "tmux new-session {command:?}");
        Self { name }
    }

    /// The pane's text.
    pub fn pane(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .expect("tmux runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to 10 s) until the pane shows `text`.
    pub async fn wait_for(&self, text: &str) {
        for _ in 0..200 {
            if self.pane().contains(text) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the pane never showed {text:?}:\n{}", self.pane());
    }

    /// `tmux send-keys`: each of `keys` is a key name (`Enter`, `C-c`) or literal text.
    pub fn keys(&self, keys: &[&str]) {
        let st = Command::new("tmux")
            .args(["send-keys", "-t", &self.name])
            .args(keys)
            .status()
            .expect("tmux runs");
        assert!(st.success(), "tmux send-keys {keys:?}");
    }

    /// Resizes the session's window (the client in it gets SIGWINCH).
    pub fn resize(&self, width: u16, height: u16) {
        let st = Command::new("tmux")
            .args(["resize-window", "-t", &self.name])
            .args(["-x", &width.to_string(), "-y", &height.to_string()])
            .status()
            .expect("tmux runs");
        assert!(st.success(), "tmux resize-window");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}
