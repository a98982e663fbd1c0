// SPDX-License-Identifier: GPL-2.0

//! The x86 instruction emulator: one decoder ([`decode`]) and one executor
//! ([`execute`]) for every path that carries out a guest instruction in the host:
//! accesses to device memory (MMIO), writes to write-protected guest page tables.
//!
//! The caller gives the instruction's bytes, the CPU mode, the registers and an
//! [`Env`] (guest linear memory with its paging, and the segment registers); the
//! result is the new registers, or the exception the guest gets, or a retry.

pub mod decode;
pub mod execute;
pub mod flags;

pub use decode::{decode, DecodeError, Insn, Map, Mem, Rep, Rm, SegReg, Vex, MAX_INSN_LEN};
pub use execute::{
    execute, real_mode_interrupt, task_switch, Control, Done, Env, Exception, Mode, Regs, Stop,
    SysWrite, TaskLoad, TaskSource,
};

/// What a decoding failure means for the guest: the exception the CPU raises for it,
/// or an instruction the emulator does not carry out.
pub fn decode_stop(e: DecodeError) -> Stop {
    match e {
        DecodeError::TooLong => Exception::GP0.into(),
        DecodeError::Invalid => Exception::UD.into(),
        DecodeError::Truncated => Stop::Unsupported(0),
        DecodeError::Unsupported(op) => Stop::Unsupported(op),
    }
}

/// Decodes and carries out the instruction in `code` (the bytes at `regs.rip`).
/// Returns the decoded instruction with how it completed; an encoding the CPU rejects
/// is the exception it raises.
pub fn emulate<E: Env>(
    code: &[u8],
    mode: &Mode,
    regs: &mut Regs,
    env: &mut E,
) -> Result<(Insn, Done), Stop> {
    let insn = decode(code, mode.long, mode.def32).map_err(decode_stop)?;
    let done = execute(&insn, mode, regs, env)?;
    Ok((insn, done))
}

#[cfg(test)]
mod tests;
