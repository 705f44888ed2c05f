//! Writing samples as CSV or JSONL (`colocate gpu monitor --out`), one line per GPU and
//! interval, flushed as they come so an interrupted monitor keeps what it saw.
use anyhow::{bail, Context, Result};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::Sample;

/// The CSV columns, in order.
pub const CSV_HEADER: &str = "t,gpu,source,sm_active,sm_occupancy,tensor_active,dram_bw,power_w,temp_c,sm_clock_mhz,mem_clock_mhz,mem_used_bytes,processes";

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Format {
    Csv,
    Jsonl,
}

impl Format {
    /// From the file's extension: `.csv`, `.jsonl` (or `.json`, written as JSONL).
    pub fn from_path(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("csv") => Ok(Self::Csv),
            Some("jsonl") | Some("json") => Ok(Self::Jsonl),
            _ => bail!("--out {}: use a .csv or .jsonl file name", path.display()),
        }
    }
}

/// A sample as one CSV row; empty cells for counters not measured; processes as
/// `pid:name:mem_bytes:sm_util` joined with `;` (sm_util empty where NVML gives none).
pub fn csv_row(s: &Sample) -> String {
    fn opt<T: ToString>(v: Option<T>) -> String {
        v.map(|v| v.to_string()).unwrap_or_default()
    }
    let procs = s
        .processes
        .iter()
        .map(|p| {
            format!(
                "{}:{}:{}:{}",
                p.pid,
                p.name.replace([',', ';', ':'], "_"),
                p.mem_bytes,
                opt(p.sm_util)
            )
        })
        .collect::<Vec<_>>()
        .join(";");
    format!(
        "{:.3},{},{},{},{},{},{},{},{},{},{},{},{}",
        s.t,
        s.gpu,
        s.source.as_str(),
        opt(s.sm_active),
        opt(s.sm_occupancy),
        opt(s.tensor_active),
        opt(s.dram_bw),
        opt(s.power_w),
        opt(s.temp_c),
        opt(s.sm_clock_mhz),
        opt(s.mem_clock_mhz),
        opt(s.mem_used_bytes),
        procs
    )
}

/// A file of samples in one format.
pub struct SampleWriter {
    out: BufWriter<File>,
    format: Format,
}

impl SampleWriter {
    pub fn create(path: &Path) -> Result<Self> {
        let format = Format::from_path(path)?;
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        if format == Format::Csv {
            writeln!(out, "{CSV_HEADER}")?;
        }
        Ok(Self { out, format })
    }

    /// Appends samples and flushes.
    pub fn write(&mut self, samples: &[Sample]) -> Result<()> {
        for s in samples {
            match self.format {
                Format::Csv => writeln!(self.out, "{}", csv_row(s))?,
                Format::Jsonl => writeln!(self.out, "{}", serde_json::to_string(s)?)?,
            }
        }
        self.out.flush().context("writing samples")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CounterSource, ProcSample};
    use super::*;

    fn sample() -> Sample {
        Sample {
            t: 1_790_000_000.25,
            gpu: 0,
            sm_active: Some(87.5),
            sm_occupancy: Some(40.0),
            tensor_active: None,
            dram_bw: Some(12.0),
            power_w: Some(420.5),
            temp_c: Some(55.0),
            sm_clock_mhz: Some(1980),
            mem_clock_mhz: Some(2619),
            mem_used_bytes: Some(123),
            processes: vec![ProcSample {
                pid: 42,
                name: "py,thon".into(),
                mem_bytes: 99,
                sm_util: Some(80.0),
            }],
            source: CounterSource::Gpm,
        }
    }

    #[test]
    fn csv_rows_match_the_header() {
        let row = csv_row(&sample());
        assert_eq!(
            row,
            "1790000000.250,0,gpm,87.5,40,,12,420.5,55,1980,2619,123,42:py_thon:99:80"
        );
        assert_eq!(row.split(',').count(), CSV_HEADER.split(',').count());
    }

    #[test]
    fn files_in_both_formats_read_back() {
        let tmp = tempfile::tempdir().unwrap();
        let jl = tmp.path().join("t.jsonl");
        SampleWriter::create(&jl)
            .unwrap()
            .write(&[sample(), sample()])
            .unwrap();
        let text = std::fs::read_to_string(&jl).unwrap();
        let back: Sample = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(back, sample());
        assert_eq!(text.lines().count(), 2);
        let csv = tmp.path().join("t.csv");
        SampleWriter::create(&csv)
            .unwrap()
            .write(&[sample()])
            .unwrap();
        let text = std::fs::read_to_string(&csv).unwrap();
        assert_eq!(text.lines().next().unwrap(), CSV_HEADER);
        assert!(Format::from_path(Path::new("x.txt"))
            .unwrap_err()
            .to_string()
            .contains(".csv or .jsonl"));
    }
}
