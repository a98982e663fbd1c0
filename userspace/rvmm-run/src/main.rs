// SPDX-License-Identifier: GPL-2.0

//! `rvmm-run`: create VMs on rvmm and inspect the module.

mod bench;
mod console;
mod linux;
mod multiboot;
mod platform;
mod run;

use clap::{Parser, Subcommand};
use rvmm::{Rvmm, VmxCaps};
use rvmm_core::caps::{AllowedControls, VmxBasic};
use std::process::ExitCode;
use x86::vmx::vmcs::control::{
    EntryControls, ExitControls, PinbasedControls, PrimaryControls, SecondaryControls,
};

/// Run guests on rvmm, the shadow-paging VT-x hypervisor module.
#[derive(Parser)]
#[command(version, about, long_about = None, args_conflicts_with_subcommands = true)]
struct Cli {
    /// The rvmm device node.
    #[arg(long, default_value = rvmm::DEFAULT_DEVICE, global = true)]
    device: String,
    #[command(subcommand)]
    command: Option<Command>,
    /// `rvmm-run [OPTIONS] IMAGE` is `rvmm-run run [OPTIONS] IMAGE`.
    #[command(flatten)]
    run: Option<run::RunArgs>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the module's ABI version and the VMX capabilities it reports.
    Info,
    /// Check VMX operation on every online CPU (VMXE in CR4 and its shadow, a VMCS
    /// load/write/read/clear) and print the result; exits 1 if a CPU fails.
    Status,
    /// Run a guest image. The guest's serial port (COM1, 0x3f8) goes to stdout; a write
    /// of v to port 0xf4 ends the run with exit status (v << 1) | 1, as QEMU's
    /// isa-debug-exit; HLT ends it with status 0. Other exit statuses: 2 usage or setup
    /// error, 3 triple fault, 4 failed VM entry, 5 an exit rvmm-run or the module cannot
    /// handle.
    Run(run::RunArgs),
    /// Benchmarks: run benchmark guests on one backend and record guest-measured ticks
    /// and exits per operation (`bench run`), or print recorded results (`bench table`).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rvmm-run: {e}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> Result<ExitCode, rvmm::Error> {
    let command = match (&cli.command, &cli.run) {
        (Some(c), _) => c,
        (None, Some(args)) => return Ok(run::run(&cli.device, args)),
        (None, None) => {
            eprintln!("rvmm-run: give an IMAGE or a command; see rvmm-run --help");
            return Ok(ExitCode::from(2));
        }
    };
    match command {
        Command::Run(args) => return Ok(run::run(&cli.device, args)),
        Command::Bench(b) => {
            return Ok(match bench::bench(&cli.device, b) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rvmm-run bench: {e}");
                    ExitCode::FAILURE
                }
            })
        }
        _ => {}
    }
    let dev = Rvmm::open(&cli.device)?;
    match command {
        Command::Info => {
            println!(
                "rvmm API version: {} (this rvmm-run: {})",
                dev.api_version()?,
                rvmm::RVMM_API_VERSION
            );
            print_caps(&dev.vmx_caps()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let s = dev.status()?;
            println!("online CPUs:            {}", s.online_cpus);
            println!("VMX held by rvmm:       {}", s.vmx_cpus);
            println!("CR4.VMXE (reg+shadow):  {}", s.vmxe_cpus);
            println!("VMCS check passed:      {}", s.vmcs_ok_cpus);
            println!("VMX shared (KVM first): {}", s.shared_cpus);
            println!("foreign VMCS current:   {}", s.foreign_vmcs_cpus);
            println!("VMCS pointer clobbered: {}", s.vmcs_ptr_clobbered);
            let ok = s.vmx_cpus == s.online_cpus
                && s.vmxe_cpus == s.online_cpus
                && s.vmcs_ok_cpus == s.online_cpus
                && s.vmcs_ptr_clobbered == 0;
            println!(
                "{}",
                if ok {
                    "VMX operation OK on every CPU"
                } else {
                    "VMX operation FAILED on some CPU"
                }
            );
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Run(_) | Command::Bench(_) => unreachable!("handled above"),
    }
}

fn print_caps(c: &VmxCaps) {
    let basic = VmxBasic(c.basic);
    println!("VMX basic:        {:#018x}", c.basic);
    println!("  VMCS revision:  {:#x}", c.vmcs_revision);
    println!("  VMCS size:      {} bytes", c.vmcs_size);
    println!(
        "  memory type:    {} ({})",
        basic.memory_type(),
        if basic.memory_type() == 6 {
            "write-back"
        } else {
            "other"
        }
    );
    println!(
        "  true controls:  {}",
        if basic.true_controls() { "yes" } else { "no" }
    );
    println!(
        "  INS/OUTS info:  {}",
        if basic.ins_outs_info() { "yes" } else { "no" }
    );
    controls("pin-based", c.pinbased, |b| {
        format!("{:?}", PinbasedControls::from_bits_truncate(b))
    });
    controls("primary proc-based", c.procbased, |b| {
        format!("{:?}", PrimaryControls::from_bits_truncate(b))
    });
    controls("secondary proc-based", c.procbased2, |b| {
        format!("{:?}", SecondaryControls::from_bits_truncate(b))
    });
    controls("VM-exit", c.exit, |b| {
        format!("{:?}", ExitControls::from_bits_truncate(b))
    });
    controls("VM-entry", c.entry, |b| {
        format!("{:?}", EntryControls::from_bits_truncate(b))
    });
    println!("VMX misc:         {:#018x}", c.misc);
    println!("EPT/VPID caps:    {:#018x}", c.ept_vpid_cap);
    println!(
        "CR0 fixed0/1:     {:#x} / {:#x}",
        c.cr0_fixed0, c.cr0_fixed1
    );
    println!(
        "CR4 fixed0/1:     {:#x} / {:#x}",
        c.cr4_fixed0, c.cr4_fixed1
    );
}

fn controls(name: &str, msr: u64, names: impl Fn(u32) -> String) {
    let a = AllowedControls(msr);
    println!(
        "{name} controls: must be 1 {:#010x}, may be 1 {:#010x}",
        a.must_be_one(),
        a.may_be_one()
    );
    println!("  supported: {}", names(a.may_be_one()));
}
