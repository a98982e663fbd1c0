// SPDX-License-Identifier: GPL-2.0

//! Guest memory and the CPU state a guest starts in (for rvmm-run and the tests): 64-bit long mode with identity
//! page tables built here, or 32-bit protected mode with paging off.

use crate::uapi::{Dtable, Regs, Segment, Sregs};
use std::io;

/// Guest RAM: anonymous memory of this process, mapped into the guest at 0.
pub struct GuestMem {
    ptr: *mut u8,
    size: usize,
}

impl GuestMem {
    pub fn new(size: usize) -> io::Result<Self> {
        // SAFETY: a fresh anonymous mapping owned by this struct.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: p.cast(),
            size,
        })
    }

    pub fn size(&self) -> usize {
        self.size
    }

    pub fn host_addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Copies `data` to guest-physical `gpa`; errors if it does not fit.
    /// Writes a zero to every page, so that the host allocates them all now.
    pub fn prefault(&mut self) {
        for off in (0..self.size).step_by(4096) {
            // SAFETY: `off` lies inside the mapping this struct owns.
            unsafe { self.ptr.add(off).write_volatile(0) };
        }
    }

    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let end = gpa
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.size as u64);
        if end.is_none() {
            return Err(format!(
                "{} bytes at guest address {gpa:#x} do not fit in {} bytes of guest memory",
                data.len(),
                self.size
            ));
        }
        // SAFETY: bounds checked above; the mapping is ours.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(gpa as usize), data.len())
        };
        Ok(())
    }

    /// Copies guest-physical bytes at `gpa` into `out`.
    pub fn read(&self, gpa: u64, out: &mut [u8]) -> Result<(), String> {
        let end = gpa
            .checked_add(out.len() as u64)
            .filter(|&e| e <= self.size as u64);
        if end.is_none() {
            return Err(format!(
                "{} bytes at guest address {gpa:#x} are outside guest memory",
                out.len()
            ));
        }
        // SAFETY: bounds checked above; the mapping is ours.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.add(gpa as usize), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    pub fn write_u64(&mut self, gpa: u64, v: u64) -> Result<(), String> {
        self.write(gpa, &v.to_le_bytes())
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe { libc::munmap(self.ptr.cast(), self.size) };
    }
}

/// How the guest starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode, paging on, the first 4 GiB identity-mapped (2 MiB pages).
    Long,
    /// 32-bit protected mode, paging off, flat segments.
    Protected,
}

/// Guest-physical layout of what rvmm-run builds below the image.
pub const GDT: u64 = 0x500;
pub const PML4: u64 = 0x1000;
pub const PDPT: u64 = 0x2000;
pub const PD: u64 = 0x3000; // four page directories: 0x3000..0x7000

fn seg(selector: u16, seg_type: u8, l: u8, db: u8) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        seg_type,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Builds the GDT (and, for long mode, the page tables) and returns the registers.
pub fn setup(
    mem: &mut GuestMem,
    mode: EntryMode,
    entry: u64,
    stack: u64,
) -> Result<(Regs, Sregs), String> {
    // null, 64-bit code (0x8), data (0x10), 32-bit code (0x18)
    let gdt: [u64; 4] = [
        0,
        0x00af_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
        0x00cf_9a00_0000_ffff,
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_u64(GDT + 8 * i as u64, *d)?;
    }
    let data = seg(0x10, 3, 0, 1);
    let tr = Segment {
        base: 0,
        limit: 0x67,
        selector: 0,
        seg_type: 11,
        present: 1,
        s: 0,
        g: 0,
        db: 0,
        l: 0,
        dpl: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let ldt = Segment {
        unusable: 1,
        ..Default::default()
    };
    let mut sregs = Sregs {
        cs: seg(0x8, 0xb, 1, 0),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr,
        ldt,
        gdt: Dtable {
            base: GDT,
            limit: 8 * gdt.len() as u16 - 1,
            padding: [0; 3],
        },
        idt: Dtable::default(),
        ..Default::default()
    };
    match mode {
        EntryMode::Long => {
            mem.write_u64(PML4, PDPT | 0x3)?;
            for i in 0..4u64 {
                mem.write_u64(PDPT + 8 * i, (PD + 0x1000 * i) | 0x3)?;
                for j in 0..512u64 {
                    let pa = (i << 30) | (j << 21);
                    mem.write_u64(PD + 0x1000 * i + 8 * j, pa | 0x83)?;
                }
            }
            sregs.cr0 = 0x8005_0033; // PG WP NE ET MP PE
            sregs.cr3 = PML4;
            sregs.cr4 = 0x20; // PAE
            sregs.efer = 0x500; // LME LMA
        }
        EntryMode::Protected => {
            sregs.cs = seg(0x18, 0xb, 0, 1);
            sregs.cr0 = 0x11; // ET PE
        }
    }
    let regs = Regs {
        rip: entry,
        rsp: stack,
        rflags: 2,
        ..Default::default()
    };
    Ok((regs, sregs))
}
