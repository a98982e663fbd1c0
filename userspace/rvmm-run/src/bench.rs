// SPDX-License-Identifier: GPL-2.0

//! `rvmm-run bench`: run benchmark guests and report, per scenario, the guest-measured
//! ticks per operation and the VM exits (and other counters) per operation.
//!
//! A benchmark guest brackets each measured section with writes to [`BENCH_MARK`]:
//! 1 before its first RDTSC, 2 after its last, with RCX = the operations in the section;
//! then it prints `NAME ticks/op: N` on its serial port. rvmm-run snapshots the backend's
//! counters at both marks, so the exits per operation cover the measured section only
//! (less the end mark's own exit).
//!
//! Results are rows of a CSV file, `config,scenario,metric,value`, appended run after
//! run (one run per configuration: rvmm, KVM ept=0, KVM ept=1 need different module
//! parameters), and `rvmm-run bench table FILE` prints them side by side.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::run::{self, Observer, RunArgs};
use rvmm::backend::Backend;

#[derive(clap::Subcommand, Debug)]
pub enum BenchCommand {
    /// Run benchmark images on one backend; print a line per scenario and append the
    /// results to a CSV file.
    Run(BenchRunArgs),
    /// Boot a Linux guest that runs a workload and powers off (the repo's guest kernel and
    /// initramfs: rvmm_linux=workload), and record the whole run: guest-TSC ticks from
    /// kernel entry to init, to the workload's end and to power-off, and the VM's exit
    /// and shadow-MMU counters (scenario `linux-<N>cpu`).
    Linux(BenchLinuxArgs),
    /// Print the results of a CSV file as one table: ticks per operation on each
    /// configuration, rvmm / KVM ept=0 with its target, and exits per operation.
    Table {
        /// The CSV file `bench run` wrote.
        csv: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
pub struct BenchRunArgs {
    /// Benchmark guest images (ELF).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub out: Output,
    /// Guest memory size, in MiB (64 keeps KVM's default shadow-page limit above what
    /// the 64-address-space scenario needs).
    #[arg(long, default_value_t = 64)]
    pub mem: u64,
}

#[derive(clap::Args, Debug)]
pub struct BenchLinuxArgs {
    /// The guest kernel (bzImage).
    #[arg(long)]
    pub kernel: PathBuf,
    /// Its initramfs (with the workload init).
    #[arg(long)]
    pub initrd: PathBuf,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory size, in MiB.
    #[arg(long, default_value_t = 96)]
    pub mem: u64,
    #[command(flatten)]
    pub out: Output,
}

/// Where a benchmark runs and where its results go (`bench run`, `bench linux`).
#[derive(clap::Args, Debug)]
pub struct Output {
    /// Run on /dev/kvm instead of /dev/rvmm.
    #[arg(long)]
    pub kvm: bool,
    /// The configuration's name in the results (default: rvmm, or kvm with --kvm).
    #[arg(long)]
    pub config: Option<String>,
    /// Append the results to this CSV file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
}

impl Output {
    /// The configuration's name in the results.
    fn config(&self) -> String {
        self.config
            .clone()
            .unwrap_or_else(|| if self.kvm { "kvm" } else { "rvmm" }.into())
    }

    /// The CSV file to append to, opened (or created).
    fn csv(&self) -> Result<Option<std::fs::File>, String> {
        self.csv
            .as_ref()
            .map(|p| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| format!("{}: {e}", p.display()))
            })
            .transpose()
    }
}

/// One measured section.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub scenario: String,
    pub ticks_per_op: u64,
    pub ops: u64,
    /// Counter increments over the section, by counter name (non-zero ones).
    pub counters: Vec<(String, u64)>,
}

#[derive(Default)]
struct Probe {
    begin: Option<Vec<(String, u64)>>,
    sections: Vec<(u64, Vec<(String, u64)>)>,
    serial: Vec<u8>,
}

impl Observer for Probe {
    fn mark(&mut self, cpu: &mut dyn Backend, value: u32) -> Result<(), String> {
        match value {
            1 => self.begin = Some(cpu.counters()?),
            2 => {
                let end = cpu.counters()?;
                let ops = cpu.regs()?.rcx;
                let begin = self
                    .begin
                    .take()
                    .ok_or("benchmark guest: end mark without a begin mark")?;
                self.sections
                    .push((ops, delta(&begin, &end, cpu.user_exit_counters())));
            }
            v => return Err(format!("benchmark guest: unknown mark {v}")),
        }
        Ok(())
    }
    fn serial(&mut self, byte: u8) {
        self.serial.push(byte);
    }
}

/// `end - begin` per counter, less one for each counter an exit to userspace bumps
/// (the end mark's own exit); zero differences left out.
fn delta(begin: &[(String, u64)], end: &[(String, u64)], marker: &[&str]) -> Vec<(String, u64)> {
    let before: BTreeMap<&str, u64> = begin.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    end.iter()
        .filter_map(|(k, v)| {
            let mut d = v.wrapping_sub(*before.get(k.as_str()).unwrap_or(&0));
            if marker.contains(&k.as_str()) {
                d = d.saturating_sub(1);
            }
            (d != 0 && d < u64::MAX / 2).then(|| (k.clone(), d))
        })
        .collect()
}

/// Pairs the guest's `NAME ticks/op: N` lines with the measured sections, in order.
fn samples(serial: &str, sections: Vec<(u64, Vec<(String, u64)>)>) -> Result<Vec<Sample>, String> {
    let lines: Vec<(String, u64)> = serial
        .lines()
        .filter_map(|l| {
            let (name, n) = l.trim().split_once(" ticks/op: ")?;
            Some((name.to_owned(), n.trim().parse().ok()?))
        })
        .collect();
    if lines.len() != sections.len() {
        return Err(format!(
            "the guest printed {} results for {} measured sections",
            lines.len(),
            sections.len()
        ));
    }
    Ok(lines
        .into_iter()
        .zip(sections)
        .map(|((scenario, ticks_per_op), (ops, counters))| Sample {
            scenario,
            ticks_per_op,
            ops,
            counters,
        })
        .collect())
}

fn per_op(n: u64, ops: u64) -> f64 {
    n as f64 / ops.max(1) as f64
}

pub fn bench(device: &str, cmd: &BenchCommand) -> Result<(), String> {
    match cmd {
        BenchCommand::Run(a) => bench_run(device, a),
        BenchCommand::Linux(a) => bench_linux(device, a),
        BenchCommand::Table { csv } => {
            let text =
                std::fs::read_to_string(csv).map_err(|e| format!("{}: {e}", csv.display()))?;
            print!("{}", table(&text)?);
            Ok(())
        }
    }
}

fn bench_run(device: &str, a: &BenchRunArgs) -> Result<(), String> {
    let config = a.out.config();
    let mut csv = a.out.csv()?;
    for image in &a.images {
        let args = RunArgs {
            image: Some(image.clone()),
            kernel: None,
            no_stdin: true,
            no_reboot: true,
            mem: a.mem,
            load_addr: 0x100000,
            mode: None,
            append: None,
            kvm: a.out.kvm,
            dump_regs: false,
            stats: false,
            prefault: true,
            shadow_pages: 0,
            shadow_roots: 0,
            module: Vec::new(),
            initrd: None,
            machine: Some(run::Machine::Bare),
            cpus: 1,
        };
        let mut probe = Probe::default();
        let code = run::run_inner(device, &args, Some(&mut probe))?;
        let name = image_name(image);
        // isa-debug-exit with 0: status 1.
        if code != std::process::ExitCode::from(1) {
            return Err(format!(
                "{name}: the benchmark guest did not end through its exit port ({code:?}); \
                 its output: {}",
                String::from_utf8_lossy(&probe.serial)
            ));
        }
        let serial = String::from_utf8_lossy(&probe.serial).into_owned();
        for s in samples(&serial, probe.sections).map_err(|e| format!("{name}: {e}"))? {
            let exits: Vec<String> = s
                .counters
                .iter()
                .map(|(k, v)| format!("{k}={:.2}", per_op(*v, s.ops)))
                .collect();
            println!(
                "{config} {} ticks/op {} ops {} per op: {}",
                s.scenario,
                s.ticks_per_op,
                s.ops,
                exits.join(" ")
            );
            if let Some(f) = csv.as_mut() {
                let mut rows = format!("{config},{},ticks_per_op,{}\n", s.scenario, s.ticks_per_op);
                rows += &format!("{config},{},ops,{}\n", s.scenario, s.ops);
                for (k, v) in &s.counters {
                    rows += &format!("{config},{},{k},{:.4}\n", s.scenario, per_op(*v, s.ops));
                }
                f.write_all(rows.as_bytes()).map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

/// What a Linux run leaves: its console output and, at its end, the counters.
#[derive(Default)]
struct LinuxProbe {
    serial: Vec<u8>,
    entry_tsc: Option<u64>,
    end_tsc: Option<u64>,
    counters: Vec<(String, u64)>,
}

impl Observer for LinuxProbe {
    fn mark(&mut self, _: &mut dyn Backend, _: u32) -> Result<(), String> {
        Ok(())
    }
    fn serial(&mut self, byte: u8) {
        self.serial.push(byte);
    }
    fn end(&mut self, cpu: &mut dyn Backend, entry_tsc: Option<u64>) -> Result<(), String> {
        self.entry_tsc = entry_tsc;
        self.end_tsc = Some(cpu.guest_tsc()?);
        self.counters = cpu.counters()?;
        Ok(())
    }
}

/// The `tsc=N` of the guest's first marker line that starts with `prefix`.
fn marker_tsc(console: &str, prefix: &str) -> Option<u64> {
    console
        .lines()
        .find(|l| l.starts_with(prefix))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tsc="))?
        .parse()
        .ok()
}

/// The CSV rows of a Linux run: TSC intervals from kernel entry, then the counters.
fn linux_rows(config: &str, scenario: &str, p: &LinuxProbe) -> Result<String, String> {
    let console = String::from_utf8_lossy(&p.serial).replace('\r', "");
    let entry = p.entry_tsc.ok_or("no guest TSC at kernel entry")?;
    let init = marker_tsc(&console, "RVMM-LINUX init ").ok_or("the guest's init printed no TSC")?;
    let done = marker_tsc(&console, "RVMM-LINUX done rc=0 ")
        .ok_or("the workload did not finish with rc=0 (no 'RVMM-LINUX done rc=0' marker)")?;
    let off = p.end_tsc.ok_or("no guest TSC at the end")?;
    let mut rows = String::new();
    for (metric, t) in [
        ("tsc_to_init", init),
        ("tsc_to_done", done),
        ("tsc_to_poweroff", off),
    ] {
        rows += &format!("{config},{scenario},{metric},{}\n", t.wrapping_sub(entry));
    }
    for (k, v) in p.counters.iter().filter(|(_, v)| *v != 0) {
        rows += &format!("{config},{scenario},{k},{v}\n");
    }
    Ok(rows)
}

fn bench_linux(device: &str, a: &BenchLinuxArgs) -> Result<(), String> {
    let config = a.out.config();
    let args = RunArgs {
        image: None,
        kernel: Some(a.kernel.clone()),
        no_stdin: true,
        no_reboot: true,
        mem: a.mem,
        load_addr: 0x100000,
        mode: None,
        append: Some("console=ttyS0 rvmm_linux=workload".into()),
        kvm: a.out.kvm,
        dump_regs: false,
        stats: false,
        prefault: false,
        shadow_pages: 0,
        shadow_roots: 0,
        module: Vec::new(),
        initrd: Some(a.initrd.clone()),
        machine: Some(run::Machine::Pc),
        cpus: a.cpus,
    };
    let mut probe = LinuxProbe::default();
    let code = run::run_inner(device, &args, Some(&mut probe))?;
    let console = String::from_utf8_lossy(&probe.serial).into_owned();
    if code != std::process::ExitCode::SUCCESS {
        let lines: Vec<&str> = console.lines().collect();
        return Err(format!(
            "the Linux guest did not power off cleanly ({code:?}); its last lines:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        ));
    }
    let scenario = format!("linux-{}cpu", a.cpus);
    let rows = linux_rows(&config, &scenario, &probe)?;
    print!("{}", rows.replace(',', " "));
    if let Some(mut f) = a.out.csv()? {
        f.write_all(rows.as_bytes()).map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn image_name(p: &Path) -> String {
    p.file_stem().map_or_else(
        || p.display().to_string(),
        |s| s.to_string_lossy().into_owned(),
    )
}

/// The targets rvmm / KVM ept=0 is held against, by scenario.
fn target(scenario: &str) -> Option<f64> {
    match scenario {
        "cpuid" => Some(0.3),
        "io" => Some(0.5),
        "cr3-k16" => Some(0.3),
        "touch" => Some(0.5),
        _ => None,
    }
}

/// The exit-like counters shown in the table, per configuration kind.
fn shown(counter: &str) -> bool {
    counter.starts_with("exit:")
        || matches!(
            counter,
            "shadow_faults"
                | "faults_direct"
                | "unsyncs_upper"
                | "sync_cr3"
                | "sync_invlpg"
                | "sync_link"
                | "sync_flush_all"
                | "sync_scanned"
                | "resync_entries"
                | "resync_changed"
                | "remote_flushes"
                | "flush_ipis"
                | "irq_kicks"
                | "pt_writes"
                | "pt_emulated"
                | "unsyncs"
                | "resyncs"
                | "flood_unshadows"
                | "prefetched"
                | "root_hits"
                | "root_misses"
                | "pool_reclaimed"
                | "zaps"
                | "mmio_exits"
                | "mmio_fast"
                | "guest_page_faults"
                | "shadow_resets"
                | "exits"
                | "pf_fixed"
                | "pf_guest"
                | "invlpg"
                | "tlb_flush"
                | "insn_emulation"
                | "mmu_pte_write"
                | "mmu_shadow_zapped"
                | "mmu_flooded"
                | "mmu_cache_miss"
                | "mmu_recycled"
        )
}

/// The table of a results CSV (`config,scenario,metric,value` rows).
pub fn table(csv: &str) -> Result<String, String> {
    let mut order: Vec<String> = Vec::new();
    let mut configs: Vec<String> = Vec::new();
    let mut v: BTreeMap<(String, String), Vec<(String, f64)>> = BTreeMap::new();
    for (i, line) in csv.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').collect();
        let [config, scenario, metric, value] = f[..] else {
            return Err(format!("line {}: want config,scenario,metric,value", i + 1));
        };
        let value: f64 = value
            .parse()
            .map_err(|e| format!("line {}: {value}: {e}", i + 1))?;
        if !order.iter().any(|s| s == scenario) {
            order.push(scenario.into());
        }
        if !configs.iter().any(|c| c == config) {
            configs.push(config.into());
        }
        v.entry((config.into(), scenario.into()))
            .or_default()
            .push((metric.into(), value));
    }
    let get = |c: &str, s: &str, m: &str| {
        v.get(&(c.to_owned(), s.to_owned()))
            .and_then(|l| l.iter().rev().find(|(k, _)| k == m).map(|(_, x)| *x))
    };
    // Whole Linux runs (`bench linux`) have a section of their own.
    let linux: Vec<String> = order
        .iter()
        .filter(|s| s.starts_with("linux-"))
        .cloned()
        .collect();
    order.retain(|s| !s.starts_with("linux-"));
    let mut out = String::new();
    out +=
        "Guest-measured ticks per operation (Bochs: ticks are emulated instructions, not time)\n";
    out += &format!("{:<12}", "scenario");
    for c in &configs {
        out += &format!(" {c:>11}");
    }
    let ratio = configs.iter().any(|c| c == "rvmm") && configs.iter().any(|c| c == "kvm-ept0");
    if ratio {
        out += &format!(" {:>15} {:>7}", "rvmm/kvm-ept0", "target");
    }
    out += "\n";
    for s in &order {
        out += &format!("{s:<12}");
        for c in &configs {
            out += &match get(c, s, "ticks_per_op") {
                Some(t) => format!(" {t:>11.0}"),
                None => format!(" {:>11}", "-"),
            };
        }
        if ratio {
            match (
                get("rvmm", s, "ticks_per_op"),
                get("kvm-ept0", s, "ticks_per_op"),
            ) {
                (Some(r), Some(k)) if k > 0.0 => {
                    let t = target(s);
                    out += &format!(
                        " {:>15.2} {:>7}",
                        r / k,
                        t.map_or("-".into(), |t| format!(
                            "{}{t}",
                            if r / k <= t { "ok<=" } else { "NO<=" }
                        ))
                    );
                }
                _ => out += &format!(" {:>15} {:>7}", "-", "-"),
            }
        }
        out += "\n";
    }
    out += "\nExits and MMU events per operation (measured section only)\n";
    for s in &order {
        for c in &configs {
            let Some(list) = v.get(&(c.clone(), s.clone())) else {
                continue;
            };
            let items: Vec<String> = list
                .iter()
                .filter(|(k, x)| shown(k) && *x >= 0.005)
                .map(|(k, x)| format!("{}={x:.2}", k.trim_start_matches("exit:")))
                .collect();
            out += &format!(
                "{s:<12} {c:<9} {}\n",
                if items.is_empty() {
                    "no exits".into()
                } else {
                    items.join(" ")
                }
            );
        }
    }
    for s in &linux {
        out += &format!(
            "\n{s}: Linux guest boot, workload and power-off (totals; ticks = guest TSC)\n"
        );
        out += &format!("{:<22}", "metric");
        for c in &configs {
            out += &format!(" {c:>13}");
        }
        if ratio {
            out += &format!(" {:>14}", "rvmm/kvm-ept0");
        }
        out += "\n";
        let mut metrics: Vec<String> = LINUX_METRICS.iter().map(|m| m.to_string()).collect();
        for c in &configs {
            for (k, _) in v.get(&(c.clone(), s.clone())).into_iter().flatten() {
                if k.starts_with("exit:") && !metrics.contains(k) {
                    metrics.push(k.clone());
                }
            }
        }
        for m in &metrics {
            if configs.iter().all(|c| get(c, s, m).is_none()) {
                continue;
            }
            out += &format!("{:<22}", m.trim_start_matches("exit:"));
            for c in &configs {
                out += &match get(c, s, m) {
                    Some(x) => format!(" {x:>13.0}"),
                    None => format!(" {:>13}", "-"),
                };
            }
            if ratio {
                out += &match (get("rvmm", s, m), get("kvm-ept0", s, m)) {
                    (Some(r), Some(k)) if k > 0.0 => format!(" {:>14.2}", r / k),
                    _ => format!(" {:>14}", "-"),
                };
            }
            out += "\n";
        }
    }
    Ok(out)
}

/// The rows of a Linux run's table, in order (then rvmm's exits by reason). rvmm and
/// KVM count different things: a metric one of them lacks shows as `-`.
const LINUX_METRICS: &[&str] = &[
    "tsc_to_init",
    "tsc_to_done",
    "tsc_to_poweroff",
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "shadow_faults",
    "pf_fixed",
    "guest_page_faults",
    "pf_guest",
    "pt_writes",
    "pt_emulated",
    "mmu_pte_write",
    "insn_emulation",
    "unsyncs",
    "mmu_unsync",
    "resyncs",
    "flood_unshadows",
    "mmu_flooded",
    "root_hits",
    "root_misses",
    "mmu_cache_miss",
    "pool_pages_peak",
    "zaps",
    "mmu_shadow_zapped",
    "mmu_recycled",
    "invlpg",
    "tlb_flush",
    "apic_injections",
    "irq_injections",
    "faults_direct",
    "unsyncs_upper",
    "sync_cr3",
    "sync_invlpg",
    "sync_link",
    "sync_flush_all",
    "sync_scanned",
    "resync_entries",
    "resync_changed",
    "remote_flushes",
    "flush_ipis",
    "flush_wait_ns",
    "irq_kicks",
    "longest_section_ns",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn c(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(k, n)| (k.to_string(), *n)).collect()
    }

    #[test]
    fn delta_subtracts_the_marker_exit_and_drops_zeros() {
        let d = delta(
            &c(&[("exits", 10), ("io_exits", 4), ("pf_fixed", 7)]),
            &c(&[("exits", 111), ("io_exits", 5), ("pf_fixed", 7), ("new", 3)]),
            &["exits", "io_exits"],
        );
        assert_eq!(d, c(&[("exits", 100), ("new", 3)]));
    }

    #[test]
    fn samples_pair_lines_with_sections_in_order() {
        let serial = "hello\ncr3-k1 ticks/op: 1217\ncr3-k4 ticks/op: 1408\n";
        let s = samples(
            serial,
            vec![(4096, c(&[("exits", 4096)])), (4096, c(&[("exits", 8192)]))],
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[1].scenario.as_str(), s[1].ticks_per_op),
            ("cr3-k4", 1408)
        );
        assert_eq!(s[1].counters, c(&[("exits", 8192)]));
        assert!(samples(serial, vec![]).is_err());
    }

    #[test]
    fn linux_rows_and_table() {
        let p = LinuxProbe {
            serial: b"boot\r\nRVMM-LINUX init cpus=1 kernel=7.3.4 tsc=1500 job=workload\r\n\
                      RVMM-LINUX done rc=0 tsc=9000\r\n"
                .to_vec(),
            entry_tsc: Some(1000),
            end_tsc: Some(9500),
            counters: c(&[
                ("exits", 70),
                ("exit:HLT", 5),
                ("pool_pages_peak", 300),
                ("zaps", 0),
            ]),
        };
        let rows = linux_rows("rvmm", "linux-1cpu", &p).unwrap();
        assert_eq!(
            rows,
            "rvmm,linux-1cpu,tsc_to_init,500\nrvmm,linux-1cpu,tsc_to_done,8000\n\
             rvmm,linux-1cpu,tsc_to_poweroff,8500\nrvmm,linux-1cpu,exits,70\n\
             rvmm,linux-1cpu,exit:HLT,5\nrvmm,linux-1cpu,pool_pages_peak,300\n"
        );
        let failed = LinuxProbe {
            serial: b"RVMM-LINUX init cpus=1 tsc=1\nRVMM-LINUX done rc=1 tsc=2\n".to_vec(),
            entry_tsc: Some(0),
            ..Default::default()
        };
        assert!(linux_rows("rvmm", "linux-1cpu", &failed).is_err());
        let csv = format!(
            "rvmm,cpuid,ticks_per_op,239\nkvm-ept0,cpuid,ticks_per_op,845\n{rows}\
             kvm-ept0,linux-1cpu,tsc_to_init,1000\nkvm-ept0,linux-1cpu,exits,140\n\
             kvm-ept0,linux-1cpu,pf_fixed,9\n"
        );
        let t = table(&csv).unwrap();
        assert!(
            !t.contains("linux-1cpu  "),
            "a Linux run is not a per-op scenario: {t}"
        );
        let row = |name: &str| t.lines().find(|l| l.starts_with(name)).unwrap().to_owned();
        let init = row("tsc_to_init ");
        assert!(
            init.contains("500") && init.contains("1000") && init.ends_with("0.50"),
            "{init}"
        );
        assert!(row("exits ").ends_with("0.50"), "{t}");
        let pf = row("pf_fixed ");
        assert!(
            pf.contains(" - ") || pf.split_whitespace().nth(1) == Some("-"),
            "{pf}"
        );
        assert!(row("HLT ").contains('5'), "{t}");
        assert!(!t.lines().any(|l| l.starts_with("zaps")), "{t}");
    }

    #[test]
    fn table_has_ratio_and_target_verdict() {
        let csv = "rvmm,cpuid,ticks_per_op,287\nrvmm,cpuid,exit:cpuid,1.0000\n\
                   kvm-ept0,cpuid,ticks_per_op,917\nkvm-ept0,cpuid,exits,1.0000\n\
                   kvm-ept1,cpuid,ticks_per_op,900\n\
                   rvmm,io,ticks_per_op,1804\nkvm-ept0,io,ticks_per_op,2711\n";
        let t = table(csv).unwrap();
        let cpuid = t.lines().find(|l| l.starts_with("cpuid ")).unwrap();
        assert!(cpuid.contains("287") && cpuid.contains("917") && cpuid.contains("900"));
        assert!(
            cpuid.contains("0.31") && cpuid.contains("NO<=0.3"),
            "{cpuid}"
        );
        let io = t.lines().find(|l| l.starts_with("io ")).unwrap();
        assert!(io.contains("0.67") && io.contains("NO<=0.5"), "{io}");
        assert!(t.contains("cpuid        rvmm      cpuid=1.00"), "{t}");
        assert!(table("a,b\n").is_err());
    }
}
