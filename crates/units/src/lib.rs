//! Where the units of config files are read: one rule per unit for every crate's files
//! (deployments, experiments, benchmark specs), so a value written for one reads the same
//! in another.
//!
//! Durations ([`duration`]): a humantime string (`"30s"`, `"2m"`, `"500ms"`, `"1m 30s"`)
//! or a whole number of seconds (`90`); written back as a humantime string.
//!
//! Byte sizes ([`bytes`]), in files and on command lines alike: `12GiB` binary, `40GB`
//! decimal, a bare letter as vLLM reads it (`4096M` = MiB, `4096m` = 10^6).

pub mod bytes;
pub mod duration;
