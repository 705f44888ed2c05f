//! Which engine an MPS client process belongs to.
//!
//! The MPS client is the process that made the CUDA context: the engine itself for the
//! built-in engine, a child for vLLM (its engine-core process) and SGLang (its scheduler).
//! So a client pid is matched to an engine's pid, then to its ancestors through
//! `/proc/<pid>/stat`, which works while the client is alive (as it is when the server
//! logs the fault).

/// How many ancestors are followed before giving up (engines nest a few levels at most).
const MAX_DEPTH: usize = 32;

/// The index of the engine in `engines` (index, pid) whose process is `pid` or one of its
/// ancestors.
pub fn owner(pid: u32, engines: &[(usize, u32)]) -> Option<usize> {
    let mut cur = pid;
    for _ in 0..MAX_DEPTH {
        if let Some((i, _)) = engines.iter().find(|(_, p)| *p == cur) {
            return Some(*i);
        }
        cur = parent(cur)?;
        if cur <= 1 {
            return None;
        }
    }
    None
}

/// The parent pid from `/proc/<pid>/stat` ("pid (comm) state ppid ..."; comm may hold
/// spaces and parentheses, so the fields are read after its last ')').
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_belongs_to_its_engine() {
        let me = std::process::id();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let engines = [(0, 1_000_000_000), (3, me)];
        assert_eq!(owner(child.id(), &engines), Some(3));
        assert_eq!(owner(me, &engines), Some(3));
        assert_eq!(owner(child.id(), &[(0, 1_000_000_000)]), None);
        // pid_max is at most 2^22, so this process cannot exist.
        assert_eq!(owner(4_194_305, &engines), None);
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
