//! Subcommands of `shoal`.

pub mod bench;
pub mod cert;
pub mod cluster;
pub mod delay_proxy;
pub mod info;
pub mod jobs;
pub mod plan;
pub mod run;
pub mod serve;
pub mod status;
pub mod worker;

use std::io::IsTerminal;

use shoal_model::gguf::GgufFile;

/// Default compute threads: the cores this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Reads every page of the model's tensor data once, so the first request does not pay for
/// page faults, with a progress bar when stderr is a terminal.
pub fn prefault(file: &GgufFile) {
    let bytes = file.bytes();
    let start = file.header().data_offset as usize;
    let data = &bytes[start.min(bytes.len())..];
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(data.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("loading {bar:40} {bytes}/{total_bytes} {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    file.advise_willneed();
    let mut sum = 0u8;
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        for page in chunk.chunks(4096) {
            sum ^= page[0];
        }
        if let Some(b) = &bar {
            b.set_position(((i + 1) * (1 << 20)).min(data.len()) as u64);
        }
    }
    std::hint::black_box(sum);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Writes `text` to stdout. A closed pipe (`shoal info | head`) ends the output quietly.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
