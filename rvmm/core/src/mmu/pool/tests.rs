// SPDX-License-Identifier: GPL-2.0

//! The pool against a reference walker written from the SDM (Vol. 3A, 4.5 and 4.6):
//! random page-table forests and random operations; every access through the shadow
//! gives what the reference gives, except where the architecture lets a TLB be stale.

extern crate std;
use super::*;
use crate::mmu::pdptes::WithPdptes;
use crate::mmu::root_hints::RootHints;
use proptest::prelude::*;
use std::cell::Cell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

/// Guest memory: 2 MiB. Frames 0-3: the kernel's identity map of all of it (PML4 entry 0
/// of every address space, never changed by the tests); 4-11: roots (PML4s); 16-47:
/// tables the tests rewrite; 64-511: data.
const GPAGES: u64 = 512;
const HOST_OFF: u64 = 0x40_0000_0000;
const SHADOW_BASE: u64 = 0x80_0000_0000;
const ROOTS: u64 = 4;
const NROOTS: u64 = 8;
const TABLES: u64 = 16;
const NTABLES: u64 = 32;
const DATA: u64 = 64;

struct Guest {
    mem: Vec<u64>,
    /// Another vCPU's store, armed by [`Machine::race`].
    race: Option<Race>,
}

/// A store by another vCPU into a guest table, made without a VM exit because that
/// vCPU's TLB still holds a writable translation of the table's page: it lands right
/// after this vCPU's pool operation reads the entry (the worst moment), unless a remote
/// flush came first (from then on the store faults and goes through the pool).
struct Race {
    gpa: u64,
    size: u8,
    value: u64,
    /// Remote flushes so far, shared with [`VecTables`].
    flushes: Rc<Cell<u64>>,
    /// Remote flushes when the race was armed.
    armed_at: u64,
    landed: bool,
}

impl GuestMemory for Guest {
    fn read_entry(&mut self, gpa: u64, size: u8) -> Option<u64> {
        let q = *self.mem.get((gpa / 8) as usize)?;
        let v = if size == 8 {
            q
        } else {
            (q >> (8 * (gpa & 4))) & 0xffff_ffff
        };
        if let Some(r) = self.race.as_mut() {
            if !r.landed && r.gpa & !7 == gpa & !7 && r.flushes.get() == r.armed_at {
                r.landed = true;
                let (at, size, value) = (r.gpa, r.size, r.value);
                self.write_entry(at, size, value);
            }
        }
        Some(v)
    }
    fn update_entry(&mut self, gpa: u64, size: u8, old: u64, new: u64) -> bool {
        if self.read_entry(gpa, size) != Some(old) {
            return false;
        }
        self.write_entry(gpa, size, new);
        true
    }
}

impl Guest {
    fn write_entry(&mut self, gpa: u64, size: u8, value: u64) {
        let q = &mut self.mem[(gpa / 8) as usize];
        if size == 8 {
            *q = value;
        } else {
            let sh = 8 * (gpa & 4);
            *q = (*q & !(0xffff_ffff << sh)) | ((value & 0xffff_ffff) << sh);
        }
    }
}

impl GuestPhys for Guest {
    fn host_pa(&mut self, gpa: u64) -> Option<(u64, bool)> {
        (gpa >> 12 < GPAGES).then_some(((gpa & !0xfff) + HOST_OFF, false))
    }
}

/// The table pages, the remote flushes the pool asked for (with the generation it
/// published in the last one), how many of the pages exist (a pool grows its pages up
/// to its limit), and the flush count again for a [`Race`] to see.
struct VecTables(Vec<[u64; 512]>, u64, u64, u32, Rc<Cell<u64>>);

impl Tables for VecTables {
    fn table(&mut self, i: SpId) -> &mut [u64; 512] {
        assert!(
            i.get() < self.3,
            "table page {} does not exist yet ({} do)",
            i.get(),
            self.3
        );
        &mut self.0[i.index()]
    }
    fn flush_remote(&mut self, generation: u64) {
        self.1 += 1;
        self.2 = generation;
        self.4.set(self.1);
    }
    fn pa(&self, i: SpId) -> u64 {
        SHADOW_BASE + u64::from(i.get()) * 4096
    }
    fn index(&self, pa: u64) -> SpId {
        SpId::new(((pa - SHADOW_BASE) / 4096) as u32)
    }
}

struct Store {
    sps: Vec<Sp>,
    buckets: Vec<Option<SpId>>,
    links: Vec<Link>,
    rmaps: Vec<Rmap>,
    rbuckets: Vec<Option<RmapId>>,
    unsync: Vec<SpId>,
    st: State,
    tables: VecTables,
}

impl Store {
    fn new(pages: usize, roots: usize) -> Self {
        let mut s = Self {
            sps: vec![Sp::default(); pages],
            buckets: vec![None; pages.next_power_of_two()],
            links: vec![Link::default(); pages * 8],
            rmaps: vec![Rmap::default(); pages * 64],
            rbuckets: vec![None; (pages * 16).next_power_of_two()],
            // Any sp: only the ones `n_unsync` counts are read.
            unsync: vec![SpId::new(0); pages],
            st: State::new(roots),
            tables: VecTables(vec![[0; 512]; pages], 0, 0, pages as u32, Rc::default()),
        };
        s.pool().init();
        s.st.sp_cap = pages as u32;
        s
    }
    fn pool(&mut self) -> Pool<'_, VecTables> {
        Pool {
            sps: &mut self.sps,
            buckets: &mut self.buckets,
            links: &mut self.links,
            rmaps: &mut self.rmaps,
            rbuckets: &mut self.rbuckets,
            unsync: &mut self.unsync,
            st: &mut self.st,
            tables: &mut self.tables,
        }
    }
}

const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;
/// A walk that met a table outside guest RAM (the module stops the vCPU there).
const UNBACKED: u32 = u32::MAX;

fn rd_entry(mem: &[u64], gpa: u64, size: u8) -> Option<u64> {
    let q = *mem.get((gpa / 8) as usize)?;
    Some(if size == 8 {
        q
    } else {
        (q >> (8 * (gpa & 4))) & 0xffff_ffff
    })
}

/// The SDM 4.6 access-rights check on the combined rights of a translation.
fn denied(acc: Access, rw: bool, us: bool, xd: bool, ctx: &PermCtx) -> bool {
    if acc.user {
        !us || (acc.write && !rw) || (acc.fetch && xd)
    } else if acc.fetch {
        xd || (us && ctx.smep)
    } else {
        (us && ctx.smap && !ctx.ac) || (acc.write && !rw && ctx.wp)
    }
}

/// The reference for 32-bit paging (SDM 4.3) and PAE paging (SDM 4.4), no side effects.
fn reference32(
    mem: &[u64],
    mode: u8,
    cr3: u64,
    gva: u64,
    acc: Access,
    ctx: &PermCtx,
) -> Result<(u64, Vec<u64>), u32> {
    let gva = gva & 0xffff_ffff;
    let pae = mode == MODE_PAE;
    let ec_base = u32::from(acc.write) << 1
        | u32::from(acc.user) << 2
        | u32::from(acc.fetch && ((pae && ctx.nxe) || ctx.smep)) << 4;
    let maxphy_mask = (1u64 << ctx.maxphyaddr) - 1;
    let unbacked = |_| UNBACKED;
    let (mut rw, mut us, mut xd) = (true, true, false);
    let mut used = Vec::new();
    let mut rsvd8 = |e: u64| e & !maxphy_mask & ((1 << 63) - 1) != 0 || (!ctx.nxe && e & XD != 0);
    let table;
    if pae {
        // PDPTE: only P and the address; bits 2:1, 8:5 and 63 reserved.
        let egpa = (cr3 & 0xffff_ffe0) + 8 * ((gva >> 30) & 3);
        let e = rd_entry(mem, egpa, 8).ok_or(0).map_err(unbacked)?;
        if e & P == 0 {
            return Err(ec_base);
        }
        if e & 0x1e6 != 0 || e & XD != 0 || e & !maxphy_mask & ((1 << 63) - 1) != 0 {
            return Err(ec_base | 1 | 8);
        }
        used.push(egpa);
        let egpa = (e & maxphy_mask & !0xfff) + 8 * ((gva >> 21) & 511);
        let e = rd_entry(mem, egpa, 8).ok_or(0).map_err(unbacked)?;
        if e & P == 0 {
            return Err(ec_base);
        }
        if rsvd8(e) || (e & PS != 0 && e & 0x1f_e000 != 0) {
            return Err(ec_base | 1 | 8);
        }
        used.push(egpa);
        rw &= e & RW != 0;
        us &= e & US != 0;
        xd |= ctx.nxe && e & XD != 0;
        if e & PS != 0 {
            if denied(acc, rw, us, xd, ctx) {
                return Err(ec_base | 1);
            }
            return Ok(((e & maxphy_mask & !0x1f_ffff) | (gva & 0x1f_ffff), used));
        }
        table = e & maxphy_mask & !0xfff;
        let egpa = table + 8 * ((gva >> 12) & 511);
        let e = rd_entry(mem, egpa, 8).ok_or(0).map_err(unbacked)?;
        if e & P == 0 {
            return Err(ec_base);
        }
        if rsvd8(e) {
            return Err(ec_base | 1 | 8);
        }
        used.push(egpa);
        rw &= e & RW != 0;
        us &= e & US != 0;
        xd |= ctx.nxe && e & XD != 0;
        if denied(acc, rw, us, xd, ctx) {
            return Err(ec_base | 1);
        }
        return Ok(((e & maxphy_mask & !0xfff) | (gva & 0xfff), used));
    }
    // 32-bit paging: 4-byte entries, no XD; 4-MiB pages with CR4.PSE (PSE-36).
    let pse = ctx.gbpages; // the tests pass CR4.PSE here for 32-bit paging
    let egpa = (cr3 & 0xffff_f000) + 4 * ((gva >> 22) & 0x3ff);
    let e = rd_entry(mem, egpa, 4).ok_or(0).map_err(unbacked)?;
    if e & P == 0 {
        return Err(ec_base);
    }
    used.push(egpa);
    rw &= e & RW != 0;
    us &= e & US != 0;
    if pse && e & PS != 0 {
        // Bit 21 is reserved (MAXPHYADDR 46 > 40: PSE-36 bits 20:13 are all address).
        if e & (1 << 21) != 0 {
            return Err(ec_base | 1 | 8);
        }
        if denied(acc, rw, us, false, ctx) {
            return Err(ec_base | 1);
        }
        let frame = (e & 0xffc0_0000) | (((e >> 13) & 0xff) << 32);
        return Ok((frame | (gva & 0x3f_ffff), used));
    }
    table = e & 0xffff_f000;
    let egpa = table + 4 * ((gva >> 12) & 0x3ff);
    let e = rd_entry(mem, egpa, 4).ok_or(0).map_err(unbacked)?;
    if e & P == 0 {
        return Err(ec_base);
    }
    used.push(egpa);
    rw &= e & RW != 0;
    us &= e & US != 0;
    let _ = &mut rsvd8;
    if denied(acc, rw, us, false, ctx) {
        return Err(ec_base | 1);
    }
    Ok(((e & 0xffff_f000) | (gva & 0xfff), used))
}

/// The reference: SDM 4.5 (4-level paging) and 4.6 (access rights), no side effects.
/// Ok(gpa, entries used (their gpas)) or Err(#PF error code).
fn reference(
    mem: &[u64],
    cr3: u64,
    gva: u64,
    acc: Access,
    ctx: &PermCtx,
) -> Result<(u64, Vec<u64>), u32> {
    let ec_base = u32::from(acc.write) << 1
        | u32::from(acc.user) << 2
        | u32::from(acc.fetch && (ctx.nxe || ctx.smep)) << 4;
    let maxphy_mask = (1u64 << ctx.maxphyaddr) - 1;
    let mut table = cr3 & maxphy_mask & !0xfff;
    let (mut rw, mut us, mut xd) = (true, true, false);
    let mut used = Vec::new();
    for level in (1..=4u32).rev() {
        let index = (gva >> (12 + 9 * (level - 1))) & 511;
        let egpa = table + 8 * index;
        let Some(&e) = mem.get((egpa / 8) as usize) else {
            return Err(UNBACKED);
        };
        if e & P == 0 {
            return Err(ec_base);
        }
        // Reserved: physical-address bits at or above MAXPHYADDR; XD without NXE; PS in
        // a PML4E; PS in a PDPTE without 1-GiB pages; the low frame bits of large pages.
        let mut rsvd = e & !maxphy_mask & ((1 << 52) - 1) & !XD != 0;
        rsvd |= !ctx.nxe && e & XD != 0;
        let large = level > 1 && e & PS != 0;
        rsvd |= level == 4 && large;
        rsvd |= level == 3 && large && !ctx.gbpages;
        rsvd |= level == 3 && large && e & 0x3fff_e000 != 0;
        rsvd |= level == 2 && large && e & 0x1f_e000 != 0;
        if rsvd {
            return Err(ec_base | 1 | 8);
        }
        used.push(egpa);
        rw &= e & RW != 0;
        us &= e & US != 0;
        xd |= ctx.nxe && e & XD != 0;
        if level == 1 || (large && level < 4) {
            let size = 1u64 << (12 + 9 * (level - 1));
            let gpa = (e & maxphy_mask & !(size - 1)) | (gva & (size - 1));
            let denied = if acc.user {
                !us || (acc.write && !rw) || (acc.fetch && xd)
            } else if acc.fetch {
                xd || (us && ctx.smep)
            } else {
                (us && ctx.smap && !ctx.ac) || (acc.write && !rw && ctx.wp)
            };
            if denied {
                return Err(ec_base | 1);
            }
            return Ok((gpa, used));
        }
        table = e & maxphy_mask & !0xfff;
    }
    unreachable!()
}

/// The CPU over the shadow: CR0.WP = 1, EFER.NXE = 1, CR4.SMEP/SMAP as the guest has
/// them, MAXPHYADDR 46. Host-physical address of the access, or a fault (Err(true) for
/// a reserved-bit fault).
fn hw(
    t: &mut VecTables,
    mode: u8,
    root_pa: u64,
    gva: u64,
    acc: Access,
    ctx: &PermCtx,
) -> Result<u64, bool> {
    let mut table = root_pa;
    let (mut rw, mut us, mut nx) = (true, true, false);
    let gva = if mode == MODE_LONG4 {
        gva
    } else {
        gva & 0xffff_ffff
    };
    for level in (1..=top_level(mode)).rev() {
        let i = t.index(table);
        let e = t.table(i)[sindex(gva, level, mode)];
        if level == 3 && mode != MODE_LONG4 {
            // A PDPTE: P and the address only (anything else would fail VM entry).
            assert_eq!(e & !(SPTE_ADDR | SPTE_P), 0, "PDPTE {e:#x}");
            if e & SPTE_P == 0 {
                return Err(false);
            }
            table = e & SPTE_ADDR;
            continue;
        }
        if e & SPTE_P == 0 {
            return Err(false);
        }
        if e & !((1u64 << 46) - 1) & ((1 << 52) - 1) != 0 {
            return Err(true);
        }
        rw &= e & SPTE_RW != 0;
        us &= e & SPTE_US != 0;
        nx |= e & SPTE_NX != 0;
        table = e & SPTE_ADDR;
    }
    let denied = if acc.user {
        !us || (acc.write && !rw) || (acc.fetch && nx)
    } else if acc.fetch {
        nx || (us && ctx.smep)
    } else {
        (us && ctx.smap && !ctx.ac) || (acc.write && !rw)
    };
    if denied {
        Err(false)
    } else {
        Ok(table | (gva & 0xfff))
    }
}

struct Machine {
    /// The value a guest write in progress stores (None: an abstract access, which
    /// writes back what is there).
    write_value: Option<u64>,
    /// The last write was emulated (upper-level table).
    emulated: bool,
    /// The vCPU cannot emulate writes to protected tables (a string instruction): the
    /// pool unprotects the table and the write runs again natively.
    unemulable: bool,
    s: Store,
    g: Guest,
    cr3: u64,
    /// The root in use (`None` before the first CR3 load).
    root: Option<SpId>,
    ctx: PermCtx,
    generation: u64,
    mode: u8,
    /// The sync budget of flushing instructions ([`SYNC_BUDGET`] as in the module): a
    /// CR3 load, INVLPG or flush whose sync is not done runs again, as a vCPU does.
    budget: u32,
    /// Flushing instructions that took more than one call.
    reruns: u64,
    /// This vCPU's index, and its PDPTE registers (PAE paging).
    vcpu: u32,
    pdptes: [u64; 4],
    /// The root this vCPU holds its active reference on (MOV CR3 through the pool
    /// moves it; a lock-free switch to a root it holds a hint on does not).
    pinned: Option<SpId>,
}

impl Machine {
    fn new(pages: usize, roots: usize) -> Self {
        Self::with_mode(pages, roots, MODE_LONG4)
    }

    fn with_mode(pages: usize, roots: usize, mode: u8) -> Self {
        let mut g = Guest {
            mem: vec![0; (GPAGES * 512) as usize],
            race: None,
        };
        // Kernel identity map of the 2 MiB: PML4[0] (in every root) -> 1 -> 2 -> 3;
        // with PAE, PDPTE 0 -> 2 -> 3; with 32-bit paging, PDE 0 -> 3 (4-byte entries).
        g.mem[512] = (2 << 12) | P | RW;
        g.mem[2 * 512] = (3 << 12) | P | RW;
        for f in 0..GPAGES {
            if mode == MODE_BITS32 {
                let sh = 32 * (f & 1);
                g.mem[(3 * 512 + f / 2) as usize] |= ((f << 12) | P | RW) << sh;
            } else {
                g.mem[(3 * 512 + f) as usize] = (f << 12) | P | RW;
            }
        }
        for r in ROOTS..ROOTS + NROOTS {
            g.mem[(r * 512) as usize] = match mode {
                MODE_LONG4 => (1 << 12) | P | RW,
                MODE_PAE => (2 << 12) | P,
                _ => (3 << 12) | P | RW,
            };
        }
        let mut store = Store::new(pages, roots);
        store.st.mmio_sptes = true;
        let mut m = Self {
            write_value: None,
            emulated: false,
            unemulable: false,
            s: store,
            g,
            cr3: ROOTS << 12,
            root: None,
            ctx: PermCtx {
                // 32-bit paging: the tests' CR4.PSE.
                gbpages: true,
                ..PermCtx::default()
            },
            generation: 0,
            mode,
            budget: SYNC_BUDGET,
            reruns: 0,
            vcpu: 0,
            pdptes: [0; 4],
            pinned: None,
        };
        m.load_cr3(ROOTS << 12);
        m
    }

    fn paging(&self) -> PagingMode {
        match self.mode {
            MODE_LONG4 => PagingMode::Long4,
            MODE_PAE => PagingMode::Pae,
            MODE_NONE => PagingMode::None,
            _ => PagingMode::Bits32 {
                pse: self.ctx.gbpages,
            },
        }
    }

    fn reference(&self, gva: u64, acc: Access) -> Result<(u64, Vec<u64>), u32> {
        if self.mode == MODE_LONG4 {
            reference(&self.g.mem, self.cr3, gva, acc, &self.ctx)
        } else {
            reference32(&self.g.mem, self.mode, self.cr3, gva, acc, &self.ctx)
        }
    }

    fn load_cr3(&mut self, cr3: u64) {
        self.load_cr3_pcid(cr3, true);
    }

    /// MOV CR3 with PCIDs: without `flush` (bit 63 set) the TLB may stay stale.
    fn load_cr3_pcid(&mut self, cr3: u64, flush: bool) {
        self.cr3 = cr3;
        let paging = self.paging();
        let prev = if self.generation == self.s.st.generation {
            self.pinned
        } else {
            None
        };
        if self.mode == MODE_PAE {
            // MOV CR3 loads the PDPTE registers.
            self.pdptes = WithPdptes::load(&mut self.g, cr3 & 0xffff_ffe0);
        }
        let (pdpt, regs) = self.pdpt();
        let root = loop {
            match self.s.pool().load_root(
                &mut WithPdptes {
                    mem: &mut self.g,
                    pdpt,
                    regs,
                },
                paging,
                cr3,
                self.vcpu,
                &self.ctx,
                prev,
                flush,
                self.budget,
            ) {
                Ok(Some(r)) => break r,
                // The vCPU runs MOV CR3 again.
                Ok(None) => self.reruns += 1,
                Err(Full) => {
                    self.s.pool().reset();
                    break self
                        .s
                        .pool()
                        .load_root(
                            &mut WithPdptes {
                                mem: &mut self.g,
                                pdpt,
                                regs,
                            },
                            paging,
                            cr3,
                            self.vcpu,
                            &self.ctx,
                            None,
                            true,
                            u32::MAX,
                        )
                        .expect("an empty pool has room for a root")
                        .expect("an unbounded sync completes");
                }
            }
        };
        self.root = Some(root);
        self.generation = self.s.st.generation;
        self.pinned = Some(root);
    }

    /// The root in use.
    fn root(&self) -> SpId {
        self.root.expect("a root is loaded")
    }

    /// An access by the guest: through the shadow, with #PF exits handled by the pool.
    /// Returns the result and whether the shadow gave it without an exit.
    fn access(&mut self, gva: u64, acc: Access) -> (Result<u64, u32>, bool) {
        // Retries of a sync in steps need as many tries as the pool has shadows.
        let most = 8 + self.s.sps.len();
        for tries in 0..most {
            if self.generation != self.s.st.generation {
                self.load_cr3(self.cr3);
            }
            let root = self.root();
            let root_pa = self.s.pool().root_pa(root);
            match hw(&mut self.s.tables, self.mode, root_pa, gva, acc, &self.ctx) {
                Ok(hpa) => return (Ok(hpa - HOST_OFF), tries == 0),
                Err(true) => {
                    if let Some(gpa) = self.s.pool().mmio_fast(root, gva, acc, &self.ctx) {
                        return (Ok(gpa), tries == 0);
                    }
                }
                Err(false) => {}
            }
            let (pdpt, regs) = self.pdpt();
            let mut mem = WithPdptes {
                mem: &mut self.g,
                pdpt,
                regs,
            };
            match self
                .s
                .pool()
                .page_fault(&mut mem, root, self.cr3, gva, acc, &self.ctx)
            {
                Ok(Fix::Mapped) => {}
                // The access faults again.
                Ok(Fix::Retry) => self.reruns += 1,
                Ok(Fix::GuestFault(f)) if f.unbacked_table.is_some() => {
                    return (Err(UNBACKED), false)
                }
                Ok(Fix::GuestFault(f)) => return (Err(f.error_code), false),
                Ok(Fix::Mmio { gpa, .. }) => return (Ok(gpa), false),
                Ok(Fix::WriteProtected { gpa, .. }) if self.unemulable => {
                    self.s.pool().unprotect(gpa >> 12);
                    self.settle();
                    self.reruns += 1;
                }
                Ok(Fix::WriteProtected { gpa, .. }) => {
                    // The vCPU emulates the store, then the pool follows it.
                    let size = self.esize();
                    let at = gpa & !(u64::from(size) - 1);
                    let old = self.g.read_entry(at, size).unwrap();
                    let v = self.write_value.unwrap_or(old);
                    self.g.write_entry(at, size, v);
                    self.emulated = true;
                    if self
                        .s
                        .pool()
                        .pt_written(&mut self.g, at, size, &self.ctx)
                        .is_err()
                    {
                        self.s.pool().reset();
                    }
                    return (Ok(gpa), false);
                }
                Err(Full) => self.s.pool().reset(),
            }
        }
        panic!("no progress at {gva:#x} {acc:?}");
    }

    /// A guest write of `value` to guest-physical `gpa`, by the kernel, through its
    /// identity map (so through the shadow and its write protection).
    fn write(&mut self, gpa: u64, value: u64) {
        let acc = Access {
            write: true,
            ..Access::default()
        };
        self.write_value = Some(value);
        self.emulated = false;
        let (r, _) = self.access(gpa, acc);
        self.write_value = None;
        assert_eq!(r, Ok(gpa), "kernel write to {gpa:#x}");
        if !self.emulated {
            let size = self.esize();
            self.g.write_entry(gpa, size, value);
        }
    }

    /// Where this vCPU's PDPTE registers stand in for memory (PAE paging), and them.
    fn pdpt(&self) -> (Option<u64>, [u64; 4]) {
        (
            (self.mode == MODE_PAE).then_some(self.cr3 & 0xffff_ffe0),
            self.pdptes,
        )
    }

    /// The pool's count of `Mapped` faults, and of the spurious ones among them.
    fn faults(&self) -> (u64, u64) {
        let s = self.s.st.stats;
        (s.faults_fixed, s.spurious_faults)
    }

    /// Page-table entry size.
    fn esize(&self) -> u8 {
        if self.mode == MODE_BITS32 || self.mode == MODE_NONE {
            4
        } else {
            8
        }
    }

    fn invlpg(&mut self, gva: u64) {
        let root = self.root();
        loop {
            match self
                .s
                .pool()
                .invlpg(&mut self.g, root, gva, &self.ctx, self.budget)
            {
                Ok(true) => return,
                Ok(false) => self.reruns += 1,
                Err(Full) => return self.s.pool().reset(),
            }
        }
    }

    /// INVPCID of all contexts.
    fn flush_all(&mut self) {
        loop {
            match self.s.pool().flush_all(&mut self.g, &self.ctx, self.budget) {
                Ok(true) => return,
                Ok(false) => self.reruns += 1,
                Err(Full) => return self.s.pool().reset(),
            }
        }
    }

    /// Another vCPU stores `value` at guest-physical `gpa` (a table entry) during this
    /// vCPU's next pool operations, right after one of them reads the entry, if it can
    /// without an exit: the shadow maps the page writable now (the other vCPU's TLB
    /// may hold that; what lost rights before was flushed at the end of the operation
    /// that took them) and no remote flush comes first. See [`Machine::end_race`].
    fn race(&mut self, gpa: u64, value: u64) {
        self.end_race();
        self.settle();
        if !self.maps_writable(gpa) {
            // It faults at once: a plain write through the pool.
            return self.write(gpa, value);
        }
        self.arm_race(gpa, value);
    }

    /// Whether a shadow leaf maps guest page `gpa` writable now.
    fn maps_writable(&self, gpa: u64) -> bool {
        let hpa = (gpa & !0xfff) + HOST_OFF;
        self.s.sps.iter().enumerate().any(|(i, sp)| {
            sp.valid
                && sp.role.level() == 1
                && self.s.tables.0[i].iter().any(|&e| {
                    e & (SPTE_P | SPTE_RW | SPTE_MMIO) == SPTE_P | SPTE_RW && e & SPTE_ADDR == hpa
                })
        })
    }

    /// Arms another vCPU's store that can land without an exit (see [`Machine::race`]).
    fn arm_race(&mut self, gpa: u64, value: u64) {
        self.g.race = Some(Race {
            gpa,
            size: self.esize(),
            value,
            flushes: self.s.tables.4.clone(),
            armed_at: self.s.tables.1,
            landed: false,
        });
    }

    /// After the operations the race ran against: if the other vCPU's store did not
    /// land under them, it is made now (it faulted: through the pool). Returns whether
    /// it landed under them.
    fn end_race(&mut self) -> bool {
        let Some(r) = self.g.race.take() else {
            return false;
        };
        self.settle();
        if !r.landed {
            self.write(r.gpa, r.value);
        }
        r.landed
    }

    /// The end of a pool operation in the module: entries that lost rights are flushed
    /// from every vCPU's TLB before the pool lock is dropped.
    fn settle(&mut self) {
        if self.s.st.tlb_dirty {
            self.s.pool().flush_tlbs();
        }
    }
}

fn rd() -> Access {
    Access::default()
}
fn wr_user() -> Access {
    Access {
        write: true,
        user: true,
        fetch: false,
    }
}

/// A private page per address space at 512 GiB * (1 + k / 2) ..., mapped by tables
/// from the rewritable range; returns its gva.
fn map_private(m: &mut Machine, k: u64) -> u64 {
    let root = ROOTS + k;
    let pdpt = TABLES + 3 * k;
    let (pd, pt) = (pdpt + 1, pdpt + 2);
    let flags = P | RW | US;
    m.g.mem[(root * 512 + 1) as usize] = (pdpt << 12) | flags;
    m.g.mem[(pdpt * 512) as usize] = (pd << 12) | flags;
    m.g.mem[(pd * 512) as usize] = (pt << 12) | flags;
    m.g.mem[(pt * 512) as usize] = ((DATA + k) << 12) | flags;
    1 << 39
}

#[test]
fn warm_switch_among_roots_takes_no_fault_and_builds_nothing() {
    let mut m = Machine::new(128, 16);
    let gva = (0..8).map(|k| map_private(&mut m, k)).last().unwrap();
    for round in 0..3 {
        let before = m.s.st.stats;
        for k in 0..8 {
            m.load_cr3((ROOTS + k) << 12);
            let (r, hit) = m.access(gva, rd());
            assert_eq!(r, Ok((DATA + k) << 12));
            if round > 0 {
                assert!(
                    hit,
                    "round {round}, address space {k}: the cached root faulted"
                );
            }
        }
        let after = m.s.st.stats;
        if round > 0 {
            assert_eq!(after.root_hits - before.root_hits, 8);
            assert_eq!(after.root_misses, before.root_misses);
            assert_eq!(after.faults_fixed, before.faults_fixed);
            assert_eq!(after.pages_in_use, before.pages_in_use);
        }
    }
    // The kernel half's tables are shared: 8 roots + 3 kernel tables (PDPT, PD, PT of the
    // identity map: only touched through PT 3) + 3 private tables per address space.
    assert_eq!(m.s.st.stats.pages_in_use, 8 + 3 * 8);
}

#[test]
fn a_small_root_cache_evicts_but_stays_correct() {
    let mut m = Machine::new(128, 2);
    for k in 0..8 {
        map_private(&mut m, k);
    }
    for _ in 0..2 {
        for k in 0..8 {
            m.load_cr3((ROOTS + k) << 12);
            assert_eq!(m.access(1 << 39, rd()).0, Ok((DATA + k) << 12));
        }
    }
    // Evicted roots stay in the pool (unpinned) until reclaimed: still hits.
    assert!(m.s.st.stats.root_hits >= 8);
}

#[test]
fn table_write_goes_unsync_and_resyncs_on_cr3_load() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    let pt = TABLES + 2;
    assert!(m.s.pool().is_shadowed(pt));
    // The kernel remaps the page: the PT is write-protected, so this write exits.
    let before = m.s.st.stats;
    m.write(pt << 12, ((DATA + 5) << 12) | P | RW | US);
    let after = m.s.st.stats;
    assert_eq!(after.pt_writes, before.pt_writes + 1);
    assert_eq!(m.s.pool().unsync_count(), 1);
    // A second write to the same table does not exit (it is out of sync).
    m.write((pt << 12) + 8, ((DATA + 6) << 12) | P | RW | US);
    assert_eq!(m.s.st.stats.pt_writes, after.pt_writes);
    // Before a flush the TLB may still give the old page; after MOV CR3 never.
    m.load_cr3(m.cr3);
    assert_eq!(m.s.pool().unsync_count(), 0);
    assert!(m.s.st.stats.resyncs >= 1);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 5) << 12));
    assert_eq!(m.access(gva + 0x1000, rd()).0, Ok((DATA + 6) << 12));
    // And the table is protected again.
    m.write((pt << 12) + 16, 0);
    assert_eq!(m.s.st.stats.pt_writes, after.pt_writes + 1);
}

/// A flushing CR3 load with 8 full page tables out of sync under its root: each call
/// brings at most one of them in sync (the budget is half a table), the vCPU runs the
/// instruction again until all are, and only then moves to the root.
#[test]
fn a_long_sync_takes_steps_of_bounded_work() {
    const TABLES_OUT: u64 = 8;
    // Room for the 4096 leaf entries' rmaps.
    let mut m = Machine::new(256, 16);
    let (pdpt, pd) = (TABLES, TABLES + 1);
    let flags = P | RW | US;
    m.g.mem[(ROOTS * 512 + 1) as usize] = (pdpt << 12) | flags;
    m.g.mem[(pdpt * 512) as usize] = (pd << 12) | flags;
    for t in 0..TABLES_OUT {
        let pt = TABLES + 2 + t;
        m.g.mem[(pd * 512 + t) as usize] = (pt << 12) | flags;
        for i in 0..512 {
            // Accessed entries: faults prefetch their neighbours.
            m.g.mem[(pt * 512 + i) as usize] = ((DATA + (i % 64)) << 12) | flags | PTE_A;
        }
    }
    let gva = |t: u64, i: u64| (1u64 << 39) | (t << 21) | (i << 12);
    for t in 0..TABLES_OUT {
        for i in 0..512 {
            assert_eq!(m.access(gva(t, i), rd()).0, Ok((DATA + (i % 64)) << 12));
        }
    }
    // One write per table: all of them go out of sync.
    for t in 0..TABLES_OUT {
        m.write((TABLES + 2 + t) << 12, ((DATA + 100) << 12) | flags | PTE_A);
    }
    assert_eq!(
        m.s.pool().unsync_count(),
        TABLES_OUT as usize,
        "{:?}",
        m.s.st.stats
    );
    let before = m.s.st.stats;
    let root = m.root();
    // Step by step, as the module does it: the vCPU stays on its root in between.
    let paging = m.paging();
    let mut calls = 0;
    let r = loop {
        calls += 1;
        let resyncs = m.s.st.stats.resyncs;
        let r =
            m.s.pool()
                .load_root(
                    &mut m.g,
                    paging,
                    m.cr3,
                    0,
                    &m.ctx,
                    Some(root),
                    true,
                    SYNC_BUDGET,
                )
                .expect("room in the pool");
        assert!(m.s.st.stats.resyncs - resyncs <= 1, "one table per call");
        if let Some(r) = r {
            break r;
        }
        assert_eq!(
            m.s.sps[root.index()].pins,
            2,
            "the vCPU's root keeps its pin"
        );
    };
    assert_eq!(r, root);
    assert!(calls >= TABLES_OUT, "{calls} calls for {TABLES_OUT} tables");
    assert_eq!(m.s.st.stats.resyncs - before.resyncs, TABLES_OUT);
    assert_eq!(m.s.st.stats.sync_steps - before.sync_steps, calls - 1);
    assert_eq!(m.s.pool().unsync_count(), 0);
    for t in 0..TABLES_OUT {
        assert_eq!(m.access(gva(t, 0), rd()).0, Ok((DATA + 100) << 12));
        assert_eq!(m.access(gva(t, 1), rd()).0, Ok((DATA + 1) << 12));
    }
}

/// The same 8 full tables out of sync under a PDPT that a new address space links in
/// (its root is new, so its CR3 load has nothing to sync): the fault that links the
/// PDPT syncs them in steps too, one table per exit, the access faulting again until
/// the PDPT can be linked.
#[test]
fn linking_a_table_syncs_what_it_brings_in_steps() {
    const TABLES_OUT: u64 = 8;
    let mut m = Machine::new(256, 16);
    let (pdpt, pd) = (TABLES, TABLES + 1);
    let flags = P | RW | US;
    for root in [ROOTS, ROOTS + 1] {
        m.g.mem[(root * 512 + 1) as usize] = (pdpt << 12) | flags;
    }
    m.g.mem[(pdpt * 512) as usize] = (pd << 12) | flags;
    for t in 0..TABLES_OUT {
        let pt = TABLES + 2 + t;
        m.g.mem[(pd * 512 + t) as usize] = (pt << 12) | flags;
        for i in 0..512 {
            m.g.mem[(pt * 512 + i) as usize] = ((DATA + (i % 64)) << 12) | flags | PTE_A;
        }
    }
    let gva = |t: u64, i: u64| (1u64 << 39) | (t << 21) | (i << 12);
    for t in 0..TABLES_OUT {
        for i in 0..512 {
            assert_eq!(m.access(gva(t, i), rd()).0, Ok((DATA + (i % 64)) << 12));
        }
    }
    for t in 0..TABLES_OUT {
        m.write((TABLES + 2 + t) << 12, ((DATA + 100) << 12) | flags | PTE_A);
    }
    assert_eq!(m.s.pool().unsync_count(), TABLES_OUT as usize);
    m.load_cr3((ROOTS + 1) << 12);
    assert_eq!(
        m.s.pool().unsync_count(),
        TABLES_OUT as usize,
        "nothing under the new root"
    );
    let (before, reruns) = (m.s.st.stats, m.reruns);
    assert_eq!(m.access(gva(3, 0), rd()).0, Ok((DATA + 100) << 12));
    assert_eq!(m.s.st.stats.resyncs - before.resyncs, TABLES_OUT);
    assert!(
        m.reruns - reruns >= TABLES_OUT - 1,
        "{} retries",
        m.reruns - reruns
    );
    assert_eq!(m.s.pool().unsync_count(), 0);
    for t in 0..TABLES_OUT {
        assert_eq!(m.access(gva(t, 0), rd()).0, Ok((DATA + 100) << 12));
        assert_eq!(m.access(gva(t, 5), rd()).0, Ok((DATA + 5) << 12));
    }
}

/// A shadow built under EFER.NXE = 0 is resynced under its own controls when a flush
/// made under NXE = 1 reaches it: a PTE that gained the XD bit (reserved without NXE)
/// must fault with RSVD in the first address space, not map the page as no-execute.
#[test]
fn a_flush_resyncs_other_roles_under_their_own_controls() {
    const XD: u64 = 1 << 63;
    let mut m = Machine::new(64, 16);
    m.ctx.nxe = false;
    m.load_cr3(ROOTS << 12);
    let gva = map_private(&mut m, 0);
    let pt = TABLES + 2;
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    // The guest sets XD in the PTE (its table goes out of sync).
    m.write(pt << 12, (DATA << 12) | P | RW | US | PTE_A | XD);
    assert_eq!(m.s.pool().unsync_count(), 1);
    // Another vCPU, with NXE on, flushes everything.
    let mut nxe = m.ctx;
    nxe.nxe = true;
    loop {
        match m.s.pool().flush_all(&mut m.g, &nxe, SYNC_BUDGET) {
            Ok(true) => break,
            Ok(false) => {}
            Err(Full) => panic!("room in the pool"),
        }
    }
    // Back in the NXE = 0 address space without a flush: XD is a reserved bit there.
    m.load_cr3_pcid(ROOTS << 12, false);
    match m.access(gva, rd()).0 {
        Err(ec) => assert_ne!(ec & walker::pferr::RSVD, 0, "error code {ec:#x}"),
        Ok(pa) => panic!("read {pa:#x} through a PTE with a reserved bit set"),
    }
}

/// Another vCPU remaps a page while this one's CR3 load resyncs the page table that
/// maps it (the table is out of sync: its page is writable, and that vCPU writes it
/// without an exit until a remote flush). After that vCPU's own flush the store is
/// seen: the table was write-protected, and the protection flushed, before its entries
/// were read.
#[test]
fn a_store_racing_a_resync_is_not_lost() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    let pte = (TABLES + 2) << 12;
    m.write(pte, ((DATA + 5) << 12) | P | RW | US | A);
    assert_eq!(m.s.pool().unsync_count(), 1);
    m.race(pte, ((DATA + 6) << 12) | P | RW | US | A);
    let cr3 = m.cr3;
    m.load_cr3(cr3);
    m.end_race();
    m.load_cr3(cr3);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 6) << 12));
}

/// Another vCPU remaps a page while this one's fault walks to it through a page table
/// the pool has not shadowed yet (so its page is writable): the shadow built for the
/// table is checked against the guest's entry once the table is write-protected and
/// the protection flushed, and the fault is taken again when they differ.
#[test]
fn a_store_racing_a_new_shadow_is_not_lost() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    let pte = (TABLES + 2) << 12;
    // The kernel fills the table through its identity map (writable in the shadow).
    m.write(pte, (DATA << 12) | P | RW | US | A);
    m.race(pte, ((DATA + 6) << 12) | P | RW | US | A);
    let _ = m.access(gva, rd());
    m.end_race();
    let cr3 = m.cr3;
    m.load_cr3(cr3);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 6) << 12));
}

#[test]
fn invlpg_refreshes_the_page_it_names() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    // Accessed, so the entry can be cached: INVLPG refreshes it without a fault.
    m.write((TABLES + 2) << 12, ((DATA + 9) << 12) | P | RW | US | A);
    m.invlpg(gva);
    assert_eq!(m.access(gva, rd()), (Ok((DATA + 9) << 12), true));
    // Not accessed: dropped, and refilled by a fault that sets A.
    m.write((TABLES + 2) << 12, ((DATA + 10) << 12) | P | RW | US);
    m.invlpg(gva);
    assert_eq!(m.access(gva, rd()), (Ok((DATA + 10) << 12), false));
}

#[test]
fn a_table_page_reused_as_data_is_unshadowed() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    // The guest frees its private mapping and writes data into the old PT, flushing
    // in between, without walking through it again.
    m.write(((ROOTS) << 12) + 8, 0);
    let pt = TABLES + 2;
    for i in 0..(FLOOD_LIMIT as u64 + 2) {
        m.write((pt << 12) + 8 * i, 0xdead_beef_0000 + i);
        m.load_cr3(m.cr3);
    }
    assert!(m.s.st.stats.flood_unshadows >= 1);
    assert!(!m.s.pool().is_shadowed(pt));
    let before = m.s.st.stats.pt_writes;
    m.write(pt << 12, 1);
    assert_eq!(
        m.s.st.stats.pt_writes, before,
        "an unshadowed page traps no more"
    );
}

#[test]
fn faults_prefetch_neighbours_that_the_guest_has_accessed() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    let pt = TABLES + 2;
    for i in 1..8 {
        m.g.mem[(pt * 512 + i) as usize] = ((DATA + i) << 12) | P | RW | US | A;
    }
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    assert_eq!(m.s.st.stats.prefetched, 7);
    let (r, hit) = m.access(gva + 0x3000, rd());
    assert_eq!((r, hit), (Ok((DATA + 3) << 12), true));
}

#[test]
fn a_large_page_is_shadowed_by_direct_pieces() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    // PD entry 1: a 2-MiB page at guest-physical 0 (all of guest memory).
    let pd = TABLES + 1;
    m.g.mem[(pd * 512 + 1) as usize] = P | RW | US | PS;
    let big = gva + (1 << 21);
    assert_eq!(m.access(big + 0x5123, rd()).0, Ok(0x5123));
    // Writes to a shadowed table through the large page trap too.
    let before = m.s.st.stats.pt_writes;
    assert_eq!(m.access(big + (pd << 12), wr_user()).0, Ok(pd << 12));
    assert_eq!(m.s.st.stats.pt_writes, before + 1);
}

#[test]
fn a_full_pool_reclaims_the_least_recently_used() {
    let mut m = Machine::new(12, 2);
    for k in 0..8 {
        map_private(&mut m, k);
    }
    for k in 0..8 {
        m.load_cr3((ROOTS + k) << 12);
        assert_eq!(m.access(1 << 39, rd()).0, Ok((DATA + k) << 12));
    }
    assert!(m.s.st.stats.reclaimed > 0);
}

/// A random guest operation.
#[derive(Clone, Debug)]
enum Op {
    Access {
        va: usize,
        kind: u8,
        user: bool,
    },
    Write {
        frame: u64,
        index: usize,
        value: u64,
    },
    Invlpg {
        va: usize,
    },
    Cr3 {
        root: u64,
        flush: bool,
    },
    /// INVPCID of all contexts (types 2 and 3; type 1 for the one PCID in use).
    FlushAll,
    /// One bit of an entry on the last access's path flips (P, R/W, U/S, A, D, PS, XD,
    /// a reserved bit), then the guest flushes.
    Flip {
        level: usize,
        bit: usize,
    },
    /// Another vCPU stores into a table during the next operation ([`Machine::race`]).
    Race {
        frame: u64,
        index: usize,
        value: u64,
    },
    Ctx {
        wp: bool,
        nxe: bool,
        smep: bool,
        smap: bool,
    },
}

const IDX: [u64; 4] = [0, 1, 2, 511];

/// 32-bit paging: page-directory entries the tests use (all four quadrants, both halves
/// of a page table), and page-table entries.
const PDES: [u64; 9] = [1, 2, 255, 256, 511, 512, 767, 768, 1023];
const PTES: [u64; 5] = [0, 1, 511, 512, 1023];
/// Entries the tests rewrite in a 32-bit table.
const IDX32: [u64; 10] = [0, 1, 2, 255, 256, 511, 512, 767, 768, 1023];

fn va_of(sel: usize, mode: u8) -> u64 {
    let top = 1 + (sel % 3) as u64;
    let s = sel / 3;
    match mode {
        MODE_LONG4 => {
            (top << 39) | (IDX[s % 4] << 30) | (IDX[(s / 4) % 4] << 21) | (IDX[(s / 16) % 4] << 12)
        }
        MODE_PAE => (top << 30) | (IDX[s % 4] << 21) | (IDX[(s / 4) % 4] << 12),
        _ => (PDES[sel % 9] << 22) | (PTES[(sel / 9) % 5] << 12),
    }
}

/// The entry a write op rewrites, in a root (top-level table) or another table.
fn write_index(mode: u8, root: bool, i: usize) -> usize {
    match (mode, root) {
        (MODE_BITS32, true) => PDES[i % 9] as usize,
        (MODE_BITS32, false) => IDX32[i % 10] as usize,
        (_, true) => 1 + i % 3,
        _ => IDX[i % 4] as usize,
    }
}

fn value() -> impl Strategy<Value = u64> {
    let flags = (
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(rw, us, a, d, xd)| {
            P | if rw { RW } else { 0 }
                | if us { US } else { 0 }
                | if a { A } else { 0 }
                | if d { D } else { 0 }
                | if xd { XD } else { 0 }
        });
    prop_oneof![
        2 => Just(0u64),
        6 => (TABLES..TABLES + NTABLES, flags.clone()).prop_map(|(f, fl)| (f << 12) | fl),
        3 => (DATA..GPAGES, flags.clone()).prop_map(|(f, fl)| (f << 12) | fl),
        1 => (0u64..2, flags.clone()).prop_map(|(f, fl)| (f << 21) | fl | PS),
        1 => (GPAGES..GPAGES + 8, flags).prop_map(|(f, fl)| (f << 12) | fl),
        1 => any::<u64>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..192, 0u8..3, any::<bool>())
            .prop_map(|(va, kind, user)| Op::Access { va, kind, user }),
        5 => (
            prop_oneof![
                3 => TABLES..TABLES + NTABLES,
                1 => ROOTS..ROOTS + NROOTS,
            ],
            0usize..90,
            value()
        )
            .prop_map(|(frame, index, value)| Op::Write { frame, index, value }),
        1 => (0usize..192).prop_map(|va| Op::Invlpg { va }),
        1 => Just(Op::FlushAll),
        2 => (0usize..4, 0usize..8).prop_map(|(level, bit)| Op::Flip { level, bit }),
        2 => (TABLES..TABLES + NTABLES, 0usize..90, value())
            .prop_map(|(frame, index, value)| Op::Race { frame, index, value }),
        2 => (ROOTS..ROOTS + NROOTS, any::<bool>())
            .prop_map(|(root, flush)| Op::Cr3 { root, flush }),
        1 => (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>())
            .prop_map(|(wp, nxe, smep, smap)| Op::Ctx { wp, nxe, smep, smap }),
    ]
}

/// An access by the guest to test address `va`, checked against the reference (unless
/// the TLB `may_be_stale` and the shadow gave it without an exit, or another vCPU's
/// store landed during it): the result, and the A flags (and D for a write) set on the
/// entries it used. Returns those entries when the reference translates.
fn check_access(
    m: &mut Machine,
    va: usize,
    acc: Access,
    may_be_stale: bool,
) -> Result<Option<Vec<u64>>, TestCaseError> {
    let mode = m.mode;
    let gva = va_of(va, mode);
    let want = m.reference(gva, acc);
    let (got, hit) = m.access(gva, acc);
    // Another vCPU's store that landed during the access: either result.
    let raced = m.g.race.as_ref().is_some_and(|r| r.landed);
    if !raced && (!hit || !may_be_stale) {
        let want_r = want.clone().map(|(gpa, _)| gpa);
        prop_assert_eq!(
            got,
            want_r,
            "{:#x} {:?} ({} exit)",
            gva,
            acc,
            if hit { "no" } else { "after an" }
        );
        if let Ok((_, used)) = &want {
            // The access left the guest's A flags set, and D for a write. (PAE PDPTEs
            // have no A flag.)
            let first = usize::from(mode == MODE_PAE);
            for &e in &used[first..] {
                let v = rd_entry(&m.g.mem, e, m.esize()).unwrap();
                prop_assert!(v & A != 0, "A at {:#x}", e);
            }
            if acc.write {
                let leaf = *used.last().unwrap();
                let v = rd_entry(&m.g.mem, leaf, m.esize()).unwrap();
                prop_assert!(v & D != 0, "D at {:#x}", leaf);
            }
        }
    }
    Ok(want.ok().map(|(_, used)| used))
}

fn run_ops(
    pages: usize,
    roots: usize,
    emulate: bool,
    mode: u8,
    ops: &[Op],
) -> Result<(), TestCaseError> {
    run_ops_grown(pages, pages, roots, emulate, mode, ops, SYNC_BUDGET)
}

/// `run_ops` on a pool whose table pages exist only up to `first` at the start and grow
/// (doubling) every 16 operations, as the module grows them between run sections.
fn run_ops_grown(
    pages: usize,
    first: usize,
    roots: usize,
    emulate: bool,
    mode: u8,
    ops: &[Op],
    budget: u32,
) -> Result<(), TestCaseError> {
    let mut m = Machine::with_mode(pages, roots, mode);
    m.budget = budget;
    m.s.st.sp_cap = first as u32;
    m.s.tables.3 = first as u32;
    m.s.st.emulate_writes = emulate;
    let mut seq = 1u64;
    let mut last_write = 0u64;
    let mut last_flush = 0u64;
    let mut invlpg_at = [0u64; 192];
    // The entries the last successful access went through (the reference's walk), and
    // that access.
    let mut last_path: Vec<u64> = Vec::new();
    let mut last_access = None;
    for op in ops {
        // INVLPG's O(1) check counts the upper-level shadows out of sync.
        let upper = m.s.unsync[..m.s.st.n_unsync]
            .iter()
            .filter(|i| m.s.sps[i.index()].role.mid_level())
            .count();
        assert_eq!(
            upper, m.s.st.n_unsync_mid,
            "upper-level shadows out of sync"
        );
        // Two steps per operation: what the operation does, then a store of another
        // vCPU that raced it (which may land after anything the operation did).
        seq += 2;
        let racing = m.g.race.is_some();
        if seq.is_multiple_of(32) && (m.s.st.sp_cap as usize) < pages {
            m.s.st.sp_cap = (m.s.st.sp_cap * 2).min(pages as u32);
            m.s.tables.3 = m.s.st.sp_cap;
        }
        // Which shadow each page holds, and the remote flushes so far: a page that
        // holds another shadow after the operation went through a flush first (another
        // vCPU may have been translating through it).
        let held: Vec<_> = m.s.sps.iter().map(|s| (s.valid, s.gfn, s.role)).collect();
        let flushes = m.s.tables.1;
        match *op {
            Op::Access { va, kind, user } => {
                let acc = Access {
                    write: kind == 1,
                    user,
                    fetch: kind == 2,
                };
                // A TLB may be stale for a page whose tables changed since the last
                // flush that covered it (MOV CR3, or INVLPG of that page).
                let may_be_stale = last_write > last_flush && invlpg_at[va] < last_write;
                if let Some(used) = check_access(&mut m, va, acc, may_be_stale)? {
                    last_path = used;
                    last_access = Some((va, acc));
                }
            }
            Op::Write {
                frame,
                index,
                value,
            } => {
                let root = (ROOTS..ROOTS + NROOTS).contains(&frame);
                let i = write_index(mode, root, index) as u64;
                // One write in three as an instruction the vCPU cannot emulate.
                m.unemulable = (seq / 2).is_multiple_of(3);
                m.write((frame << 12) + u64::from(m.esize()) * i, value);
                m.unemulable = false;
                last_write = seq;
                if mode == MODE_PAE && root {
                    // PDPTEs are registers loaded by MOV CR3: an OS reloads CR3 after
                    // changing them (and the reference reads them from memory).
                    let cr3 = m.cr3;
                    m.load_cr3(cr3);
                    last_flush = seq;
                }
            }
            Op::Invlpg { va } => {
                m.invlpg(va_of(va, mode));
                invlpg_at[va] = seq;
            }
            Op::FlushAll => {
                m.flush_all();
                last_flush = seq;
            }
            Op::Flip { level, bit } => {
                // Not a PAE PDPTE (a register MOV CR3 loads; the write below reloads).
                let first = usize::from(mode == MODE_PAE);
                if last_path.len() > first {
                    let at = last_path[first + level % (last_path.len() - first)];
                    let bits: &[u8] = if m.esize() == 4 {
                        &[0, 1, 2, 5, 6, 7, 8, 12]
                    } else {
                        &[0, 1, 2, 5, 6, 7, 63, 51]
                    };
                    let v =
                        rd_entry(&m.g.mem, at, m.esize()).unwrap() ^ (1 << bits[bit % bits.len()]);
                    m.write(at, v);
                    last_write = seq;
                    let cr3 = m.cr3;
                    m.load_cr3(cr3);
                    last_flush = seq;
                    // The same access again: what the flipped bit means now.
                    if let Some((va, acc)) = last_access {
                        check_access(&mut m, va, acc, false)?;
                    }
                }
            }
            Op::Race {
                frame,
                index,
                value,
            } => {
                let i = write_index(mode, false, index) as u64;
                m.race((frame << 12) + u64::from(m.esize()) * i, value);
                last_write = seq;
            }
            Op::Cr3 { root, flush } => {
                m.load_cr3_pcid(root << 12, flush);
                if flush {
                    last_flush = seq;
                }
            }
            Op::Ctx {
                wp,
                nxe,
                smep,
                smap,
            } => {
                m.ctx = PermCtx {
                    wp,
                    nxe,
                    smep,
                    smap,
                    ..m.ctx
                };
                m.load_cr3(m.cr3);
                last_flush = seq;
            }
        }
        if racing && !matches!(op, Op::Race { .. }) {
            m.end_race();
            last_write = seq + 1;
        }
        if m.s.tables.1 == flushes {
            for (i, (sp, &(valid, gfn, role))) in m.s.sps.iter().zip(held.iter()).enumerate() {
                prop_assert!(
                    !valid || !sp.valid || (sp.gfn, sp.role) == (gfn, role),
                    "page {} reused for another shadow without a remote flush",
                    i
                );
            }
        }
        // Nothing is reused from an older generation than the one published.
        prop_assert!(m.s.tables.1 == 0 || m.s.tables.2 <= m.s.st.generation);
    }
    // Every shadow is consistent with the pool's books: unsync list and flags agree.
    let n = m.s.pool().unsync_count();
    let flagged = m.s.sps.iter().filter(|s| s.valid && s.unsync).count();
    prop_assert_eq!(n, flagged);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn shadow_agrees_with_the_reference(ops in proptest::collection::vec(op(), 1..120)) {
        run_ops(96, 16, false, MODE_LONG4, &ops)?;
    }

    #[test]
    fn a_pool_that_grows_its_pages_agrees(ops in proptest::collection::vec(op(), 1..120)) {
        run_ops_grown(96, 12, 8, true, MODE_LONG4, &ops, SYNC_BUDGET)?;
    }

    /// Every flushing instruction's sync one shadow per call, the instruction run
    /// again until it is done.
    #[test]
    fn syncs_in_steps_agree(ops in proptest::collection::vec(op(), 1..120), emulate: bool) {
        run_ops_grown(96, 96, 16, emulate, MODE_LONG4, &ops, 1)?;
    }

    #[test]
    fn syncs_in_steps_in_a_tiny_pool(ops in proptest::collection::vec(op(), 1..120), mode in 0u8..3) {
        run_ops_grown(10, 10, 2, true, mode, &ops, 1)?;
    }

    #[test]
    fn a_tiny_pool_agrees_too(ops in proptest::collection::vec(op(), 1..120)) {
        run_ops(10, 2, false, MODE_LONG4, &ops)?;
    }

    #[test]
    fn emulated_upper_level_writes_agree_too(ops in proptest::collection::vec(op(), 1..120)) {
        run_ops(96, 16, true, MODE_LONG4, &ops)?;
    }

    #[test]
    fn emulated_writes_in_a_tiny_pool(ops in proptest::collection::vec(op(), 1..120)) {
        run_ops(10, 2, true, MODE_LONG4, &ops)?;
    }

    #[test]
    fn pae_guests_agree(ops in proptest::collection::vec(op(), 1..120), emulate: bool) {
        run_ops(96, 16, emulate, MODE_PAE, &ops)?;
    }

    #[test]
    fn pae_guests_in_a_tiny_pool(ops in proptest::collection::vec(op(), 1..120), emulate: bool) {
        run_ops(10, 2, emulate, MODE_PAE, &ops)?;
    }

    #[test]
    fn bits32_guests_agree(ops in proptest::collection::vec(op(), 1..120), emulate: bool) {
        run_ops(96, 16, emulate, MODE_BITS32, &ops)?;
    }

    #[test]
    fn bits32_guests_in_a_tiny_pool(ops in proptest::collection::vec(op(), 1..120), emulate: bool) {
        run_ops(10, 2, emulate, MODE_BITS32, &ops)?;
    }
}

#[test]
fn prefetch_never_maps_a_shadowed_table_writable() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    // The kernel's PTEs of frames TABLES..TABLES+8 are accessed and dirty, as after
    // earlier writes; none is in the shadow yet.
    for f in TABLES..TABLES + 8 {
        m.g.mem[(3 * 512 + f) as usize] |= A | D;
    }
    // A kernel access to an unshadowed neighbour prefetches the group.
    let free = TABLES + 5;
    assert_eq!(m.access(free << 12, rd()).0, Ok(free << 12));
    assert!(m.s.st.stats.prefetched >= 7);
    let before = m.s.st.stats.pt_writes;
    m.write((TABLES + 2) << 12, 0);
    assert_eq!(
        m.s.st.stats.pt_writes,
        before + 1,
        "the PT write did not trap"
    );
}

#[test]
fn repeated_mmio_takes_no_walk() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    let pt = TABLES + 2;
    // PTE 1: a page beyond guest RAM (a device).
    m.g.mem[(pt * 512 + 1) as usize] = ((GPAGES + 3) << 12) | P | RW | US | A | D;
    let dev = gva + 0x1000;
    assert_eq!(
        m.access(dev + 8, rd()),
        (Ok(((GPAGES + 3) << 12) + 8), false)
    );
    assert_eq!(m.s.st.stats.mmio_fast, 0);
    assert_eq!(
        m.access(dev + 16, wr_user()),
        (Ok(((GPAGES + 3) << 12) + 16), true)
    );
    assert_eq!(m.s.st.stats.mmio_fast, 1);
    // The cached rights still apply: a read-only device page refuses a user write
    // through the slow path, with the guest's error code.
    m.write((pt << 12) + 8, ((GPAGES + 3) << 12) | P | US | A | D);
    m.invlpg(dev);
    assert_eq!(m.access(dev, rd()).0, Ok((GPAGES + 3) << 12));
    assert_eq!(m.access(dev, wr_user()), (Err(1 | 2 | 4), false));
}

/// A guest that clears the accessed flag of a page-directory entry (Linux's LRU aging
/// does) and flushes sees it set again by the next access, as the CPU's walk sets it:
/// the shadow link is dropped when A goes, not kept for the same table.
#[test]
fn a_cleared_upper_level_accessed_flag_is_set_again() {
    let mut m = Machine::new(64, 16);
    m.s.st.emulate_writes = true;
    let gva = map_private(&mut m, 0);
    let pde_at = ((TABLES + 1) * 512) as usize;
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    let pde = m.g.mem[pde_at];
    assert_ne!(pde & PTE_A, 0, "the walk set PDE.A");
    m.write((TABLES + 1) << 12, pde & !PTE_A);
    m.invlpg(gva);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    assert_ne!(
        m.g.mem[pde_at] & PTE_A,
        0,
        "PDE.A set again by the next access"
    );
}

/// A 2-MiB page whose dirty flag the guest cleared (and flushed) gets it again on the
/// next write: a clean large page's shadow pieces are not writable (KVM's rule), and a
/// dirty one's shadow is not shared with the clean one's.
#[test]
fn a_cleaned_large_page_gets_dirty_again() {
    let mut m = Machine::new(64, 16);
    m.s.st.emulate_writes = true;
    let (pdpt, pd) = (TABLES, TABLES + 1);
    let flags = P | RW | US;
    m.g.mem[(ROOTS * 512 + 1) as usize] = (pdpt << 12) | flags;
    m.g.mem[(pdpt * 512) as usize] = (pd << 12) | flags;
    // 2 MiB at guest-physical 0 (all of the test's guest memory).
    let pde_at = (pd * 512) as usize;
    m.g.mem[pde_at] = flags | PTE_PS;
    let gva = (1u64 << 39) | (DATA << 12);
    let wr = Access {
        write: true,
        ..Access::default()
    };
    // A read first: the page stays clean, and its shadow must not let a write through.
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    assert_eq!(m.g.mem[pde_at] & PTE_D, 0);
    assert_eq!(m.access(gva, wr).0, Ok(DATA << 12));
    let pde = m.g.mem[pde_at];
    assert_ne!(pde & PTE_D, 0, "the first write set PDE.D");
    // The guest cleans the page (clears D), flushes its TLB (MOV CR3), and writes
    // again.
    m.write(pd << 12, pde & !PTE_D);
    let cr3 = m.cr3;
    m.load_cr3(cr3);
    assert_eq!(m.access(gva, wr).0, Ok(DATA << 12));
    assert_ne!(
        m.g.mem[pde_at] & PTE_D,
        0,
        "PDE.D set again by the next write"
    );
}

/// The same with a read-only large page that the kernel writes under CR0.WP = 0 (the
/// shadow's pieces are then writable for supervisor writes, not for user accesses):
/// once the guest cleans it and flushes, the next write faults and sets D again. Found
/// by the long property run (a clean and a dirty read-only page had one role).
#[test]
fn a_read_only_large_page_cleaned_under_wp0_gets_dirty_again() {
    for mode in [MODE_LONG4, MODE_BITS32] {
        let mut m = Machine::with_mode(64, 16, mode);
        m.ctx.wp = false;
        let cr3 = m.cr3;
        m.load_cr3(cr3);
        // The root's last page-directory entry (a 2-MiB or 4-MiB page at 0, read-only).
        let (gva, pde_at, pde) = if mode == MODE_LONG4 {
            let (pdpt, pd) = (TABLES, TABLES + 1);
            m.g.mem[(ROOTS * 512 + 1) as usize] = (pdpt << 12) | P | RW;
            m.g.mem[(pdpt * 512) as usize] = (pd << 12) | P | RW;
            ((1u64 << 39) | (DATA << 12), pd << 12, P | PTE_PS)
        } else {
            (
                (1023u64 << 22) | (DATA << 12),
                (ROOTS << 12) + 4 * 1023,
                P | PTE_PS,
            )
        };
        let esize = m.esize();
        m.g.write_entry(pde_at, esize, pde);
        let wr = Access {
            write: true,
            ..Access::default()
        };
        assert_eq!(m.access(gva, wr).0, Ok(DATA << 12), "mode {mode}");
        let dirty = m.g.read_entry(pde_at, esize).unwrap();
        assert_ne!(dirty & PTE_D, 0, "mode {mode}: the write set D");
        m.write(pde_at, dirty & !PTE_D);
        m.load_cr3(cr3);
        assert_eq!(m.access(gva, wr).0, Ok(DATA << 12), "mode {mode}");
        assert_ne!(
            m.g.read_entry(pde_at, esize).unwrap() & PTE_D,
            0,
            "mode {mode}: D set again by the next write"
        );
    }
}

/// A new guest memory map drops every shadow (their entries hold the old map's host
/// frames): the first user of the new map resets the pool, a user of the old one is
/// refused, and every vCPU's root is from an older generation then.
#[test]
fn a_new_memory_map_drops_every_shadow() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    let generation = m.s.st.generation;
    assert!(m.s.st.stats.pages_in_use > 1);
    assert_eq!(m.s.pool().take_map(0), MapCheck::Current);
    assert_eq!(m.s.pool().take_map(1), MapCheck::Reset);
    assert_eq!(m.s.st.stats.pages_in_use, 0);
    assert_ne!(
        m.s.st.generation, generation,
        "roots of the old map are stale"
    );
    assert_eq!(m.s.pool().take_map(0), MapCheck::Older);
    assert_eq!(m.s.pool().take_map(1), MapCheck::Current);
    // The vCPU loads its root again (its generation is old) and translates as before.
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
}

#[test]
fn upper_level_writes_are_emulated_and_stay_in_sync() {
    let mut m = Machine::new(64, 16);
    m.s.st.emulate_writes = true;
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    // Point the PD entry at another PT (TABLES + 9) that maps DATA + 7.
    m.g.mem[((TABLES + 9) * 512) as usize] = ((DATA + 7) << 12) | P | RW | US;
    m.write((TABLES + 1) << 12, ((TABLES + 9) << 12) | P | RW | US);
    assert!(m.emulated);
    assert_eq!(m.s.st.stats.pt_emulated, 1);
    assert_eq!(
        m.s.pool().unsync_count(),
        0,
        "an upper-level table stays in sync"
    );
    // The link was dropped in place: the next access walks the new PT, no flush needed
    // (a real TLB could still give the old page here; the shadow never does).
    assert_eq!(m.access(gva, rd()), (Ok((DATA + 7) << 12), false));
    // A leaf table's write unsyncs as before.
    m.write((TABLES + 9) << 12, ((DATA + 8) << 12) | P | RW | US);
    assert!(!m.emulated);
    assert_eq!(m.s.pool().unsync_count(), 1);
}

#[test]
fn a_cached_root_written_over_and_over_goes_out_of_sync() {
    let mut m = Machine::new(64, 16);
    m.s.st.emulate_writes = true;
    let first = m.cr3;
    // A second address space, loaded once: its root stays in the cache (pinned) after
    // the switch back, as a dead process's page directory does until it is reused.
    let gva = map_private(&mut m, 1);
    let root = (ROOTS + 1) << 12;
    m.load_cr3(root);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 1) << 12));
    m.load_cr3(first);
    // The guest reuses the page for a new address space: its first writes are emulated
    // (a cached root stays in sync), until FLOOD_LIMIT of them came without a walk
    // through it...
    for k in 0..u64::from(FLOOD_LIMIT) {
        m.write(root + 8 * (100 + k), 0);
        assert!(m.emulated, "write {k} is emulated");
    }
    // ...then it goes out of sync, and writes reach it without exits.
    m.write(root + 8 * 200, 0);
    assert!(!m.emulated);
    assert_eq!(m.s.pool().unsync_count(), 1);
    let w = Access {
        write: true,
        ..Access::default()
    };
    assert_eq!(m.access(root + 8 * 201, w), (Ok(root + 8 * 201), true));
    // The new process's page directory: entry 1 gone, entry 2 -> the old PDPT. Loading
    // it brings the cached root up to date.
    m.write(root + 8, 0);
    m.write(root + 16, ((TABLES + 3) << 12) | P | RW | US);
    m.load_cr3(root);
    assert_eq!(m.s.pool().unsync_count(), 0);
    assert_eq!(m.access(gva, rd()).0, Err(0));
    assert_eq!(m.access(2 << 39, rd()).0, Ok((DATA + 1) << 12));
    // In use again (walked), it is back to emulated writes.
    m.write(root + 8 * 300, 0);
    assert!(m.emulated);
}

#[test]
fn a_flush_syncs_what_its_root_reaches_and_a_new_link_what_it_brings() {
    let mut m = Machine::new(64, 16);
    m.s.st.emulate_writes = true;
    // Address space a: gva -> DATA, gva + 4 KiB -> DATA + 1, through a's private tables.
    let gva = map_private(&mut m, 0);
    let pt = TABLES + 2;
    m.g.mem[(pt * 512 + 1) as usize] = ((DATA + 1) << 12) | P | RW | US;
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    assert_eq!(m.access(gva + 0x1000, rd()).0, Ok((DATA + 1) << 12));
    // On address space b, which does not reach a's tables, the guest changes a's PT
    // and flushes: only what b reaches is synced, a's PT stays out of sync.
    let b = (ROOTS + 1) << 12;
    m.load_cr3(b);
    m.write((pt << 12) + 8, ((DATA + 6) << 12) | P | RW | US | A);
    m.load_cr3(b);
    assert_eq!(m.s.pool().unsync_count(), 1);
    let resyncs = m.s.st.stats.resyncs;
    // b links a's PDPT: the shadows it brings along come up to date first (the change
    // was made before b's last flush), not only the entry a fault refills.
    m.write(b + 8, (TABLES << 12) | P | RW | US);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    assert_eq!(m.access(gva + 0x1000, rd()), (Ok((DATA + 6) << 12), true));
    assert_eq!(m.s.pool().unsync_count(), 0);
    assert_eq!(m.s.st.stats.resyncs, resyncs + 1);
}

#[test]
fn bits32_quadrants_and_halves() {
    let mut m = Machine::with_mode(64, 16, MODE_BITS32);
    let pt = TABLES;
    // PDE 768 (quadrant 3) -> pt; PTEs 1 (lower half) and 1023 (upper half) -> data.
    m.g.write_entry((ROOTS << 12) + 4 * 768, 4, (pt << 12) | P | RW | US);
    m.g.write_entry((pt << 12) + 4, 4, ((DATA + 1) << 12) | P | RW | US);
    m.g.write_entry((pt << 12) + 4 * 1023, 4, ((DATA + 2) << 12) | P | RW | US);
    let (lo, hi) = ((768 << 22) | (1 << 12), (768 << 22) | (1023 << 12));
    assert_eq!(m.access(lo, rd()).0, Ok((DATA + 1) << 12));
    assert_eq!(m.access(hi, rd()).0, Ok((DATA + 2) << 12));
    assert_eq!(m.access(lo + 0x1000, rd()).0, Err(0));
    // The guest PT has two shadows (one per 2 MiB half), the PD one per quadrant used.
    let halves: Vec<u32> =
        m.s.sps
            .iter()
            .filter(|s| s.valid && s.gfn == pt)
            .map(|s| s.role.quadrant())
            .collect();
    assert_eq!(halves.len(), 2, "{halves:?}");
    // A write to the upper half's PTE goes unsync; a CR3 load brings the new page.
    m.write((pt << 12) + 4 * 1023, ((DATA + 3) << 12) | P | RW | US);
    m.load_cr3(m.cr3);
    assert_eq!(m.access(hi, rd()).0, Ok((DATA + 3) << 12));
    // A 4-MiB page (PSE) at PDE 1: guest-physical 0..4 MiB (2 MiB of it RAM).
    m.g.write_entry((ROOTS << 12) + 4, 4, P | RW | US | PS);
    m.load_cr3(m.cr3);
    assert_eq!(m.access((1 << 22) + 0x12345, rd()).0, Ok(0x12345));
    assert_eq!(m.access((1 << 22) + 0x25_0000, rd()).0, Ok(0x25_0000)); // MMIO
}

/// Each vCPU has its own PDPTE registers: another vCPU's MOV CR3 to the same PDPT,
/// whose memory changed meanwhile (Linux PAE reuses PDPTs for new processes), loads
/// the new entries for that vCPU only; this one keeps translating through the ones it
/// loaded, INVLPG or not, until its own next load.
#[test]
fn pae_pdpte_registers_are_per_vcpu() {
    let mut m = Machine::with_mode(64, 16, MODE_PAE);
    let (pd, pt, pd2, pt2) = (TABLES, TABLES + 1, TABLES + 2, TABLES + 3);
    m.g.mem[(ROOTS * 512 + 2) as usize] = (pd << 12) | P;
    m.g.mem[(pd * 512 + 5) as usize] = (pt << 12) | P | RW | US;
    m.g.mem[(pt * 512 + 7) as usize] = ((DATA + 4) << 12) | P | RW | US;
    m.g.mem[(pd2 * 512 + 5) as usize] = (pt2 << 12) | P | RW | US;
    m.g.mem[(pt2 * 512 + 7) as usize] = ((DATA + 9) << 12) | P | RW | US;
    let cr3 = m.cr3;
    m.load_cr3(cr3);
    let gva = (2 << 30) | (5 << 21) | (7 << 12);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 4) << 12));
    m.g.mem[(ROOTS * 512 + 2) as usize] = (pd2 << 12) | P;
    // vCPU 1 loads the PDPT as it is now.
    let vcpu0 = (m.root, m.pdptes);
    m.vcpu = 1;
    m.load_cr3(cr3);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 9) << 12));
    // Back on vCPU 0, which has not reloaded CR3.
    m.vcpu = 0;
    (m.root, m.pdptes) = vcpu0;
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 4) << 12));
    m.invlpg(gva);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 4) << 12));
    m.load_cr3(cr3);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 9) << 12));
}

#[test]
fn pae_root_is_the_pdpte_registers() {
    let mut m = Machine::with_mode(64, 16, MODE_PAE);
    let (pd, pt) = (TABLES, TABLES + 1);
    m.g.mem[(ROOTS * 512 + 2) as usize] = (pd << 12) | P;
    m.g.mem[(pd * 512 + 5) as usize] = (pt << 12) | P | RW | US;
    m.g.mem[(pt * 512 + 7) as usize] = ((DATA + 4) << 12) | P | RW | US;
    m.load_cr3(m.cr3);
    let gva = (2 << 30) | (5 << 21) | (7 << 12);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 4) << 12));
    // A reserved bit in a PDPTE: that gigabyte faults (RSVD from the walk).
    m.g.mem[(ROOTS * 512 + 3) as usize] = (pd << 12) | P | RW;
    m.load_cr3(m.cr3);
    assert_eq!(m.access(3 << 30, rd()).0, Err(1 | 8));
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 4) << 12));
}

#[test]
fn paging_off_is_a_direct_map_that_still_write_protects_tables() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    // The same VM with paging off (another vCPU, or this one later): identity, and a
    // write to a shadowed table traps.
    m.mode = MODE_NONE;
    m.load_cr3(0);
    assert_eq!(m.access(0x5123, rd()), (Ok(0x5123), false));
    assert_eq!(m.access(0x5123, rd()), (Ok(0x5123), true));
    assert_eq!(m.access(GPAGES << 12, rd()).0, Ok(GPAGES << 12)); // MMIO
    let before = m.s.st.stats.pt_writes;
    m.write((TABLES + 2) << 12, ((DATA + 3) << 12) | P | RW | US);
    assert_eq!(m.s.st.stats.pt_writes, before + 1);
    m.mode = MODE_LONG4;
    m.load_cr3(ROOTS << 12);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 3) << 12));
}

/// Guest tables with a large fan-in: 100 entries of a PML4 point at one PDPT, 100 of
/// its entries at one PD, 100 of the PD's at one PT, so that 10^6 paths lead up from the
/// PT. The PT goes out of sync in one address space; a flushing CR3 load of another
/// asks whether it is under the new root, and whether anything pinned reaches it: each
/// search must cost what the pool holds, not the number of paths.
#[test]
fn parent_searches_cost_the_pool_not_the_paths() {
    let mut m = Machine::new(512, 8);
    let (pml4, pdpt, pd, pt) = (ROOTS + 1, TABLES, TABLES + 1, TABLES + 2);
    for k in 1..=100u64 {
        m.g.mem[(pml4 * 512 + k) as usize] = (pdpt << 12) | P | RW;
        m.g.mem[(pdpt * 512 + k) as usize] = (pd << 12) | P | RW;
        m.g.mem[(pd * 512 + k) as usize] = (pt << 12) | P | RW;
    }
    for k in 0..512u64 {
        m.g.mem[(pt * 512 + k) as usize] = ((DATA + k % 64) << 12) | P | RW;
    }
    m.load_cr3(pml4 << 12);
    let read = Access::default();
    for k in 1..=100u64 {
        let gva = (k << 39) | (k << 30) | (k << 21);
        assert_eq!(m.access(gva, read).0, Ok(DATA << 12));
    }
    // A write to the PT (through the identity map) makes its shadow out of sync.
    m.write((pt << 12) + 8, ((DATA + 1) << 12) | P | RW);
    assert!(m.s.pool().unsync_count() > 0);
    let before = m.s.st.stats.parent_visits;
    m.load_cr3(ROOTS << 12);
    let visits = m.s.st.stats.parent_visits - before;
    assert!(
        visits <= 2 * m.s.links.len() as u64,
        "{visits} parent visits for one CR3 load"
    );
}

/// A device page read first, through a clean PTE, then written: the write walks and
/// sets the PTE's dirty flag, as the CPU's walk does (the cached MMIO entry does not
/// let a write through before the leaf is dirty).
#[test]
fn a_clean_device_page_gets_dirty_on_its_first_write() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    let pte_at = ((TABLES + 2) * 512) as usize;
    m.g.mem[pte_at] = ((GPAGES + 3) << 12) | P | RW | US | A;
    assert_eq!(m.access(gva, rd()).0, Ok((GPAGES + 3) << 12));
    assert_eq!(m.access(gva, rd()), (Ok((GPAGES + 3) << 12), true));
    assert_eq!(m.g.mem[pte_at] & D, 0);
    assert_eq!(m.access(gva, wr_user()).0, Ok((GPAGES + 3) << 12));
    assert_ne!(m.g.mem[pte_at] & D, 0, "the first write set D");
    // Dirty now: writes need no walk.
    let fast = m.s.st.stats.mmio_fast;
    assert_eq!(m.access(gva, wr_user()), (Ok((GPAGES + 3) << 12), true));
    assert_eq!(m.s.st.stats.mmio_fast, fast + 1);
}

/// Eight vCPUs, each switching among its own eight address spaces: the roots they hold
/// for the lock-free switch stay within the root cache's size together (a vCPU's share
/// of it), so the pool keeps room for the trees under them and never resets.
#[test]
fn vcpus_hold_their_share_of_the_root_cache() {
    let mut m = Machine::new(64, 16);
    let vcpus = 8u32;
    let mut hints = [RootHints::new(); 8];
    for round in 0..2 {
        for (v, h) in hints.iter_mut().enumerate() {
            for k in 0..8u64 {
                // Each vCPU its own roots: the same tables under its own paging controls.
                let c = v as u64;
                m.ctx = PermCtx {
                    wp: c & 1 != 0,
                    smep: c & 2 != 0,
                    smap: c & 4 != 0,
                    ..m.ctx
                };
                m.load_cr3((ROOTS + k) << 12);
                assert_eq!(
                    m.access(0, rd()).0,
                    Ok(0),
                    "round {round} vCPU {v} root {k}"
                );
                let (cr3, root) = (m.cr3, m.root());
                h.remember(&mut m.s.pool(), cr3, c, root, vcpus);
            }
        }
    }
    let held: usize = hints.iter().map(|h| h.held()).sum();
    assert!(
        held <= 16,
        "{held} roots held for 8 vCPUs with a cache of 16"
    );
    assert_eq!(m.s.st.stats.resets, 0, "the pool reset");
}

mod access_c;
mod smp;

/// Instruction counts of the fault path (run under valgrind's callgrind, `--ignored`):
/// `RVMM_FAULTS` first touches of 4-KiB pages in one page table.
#[test]
#[ignore = "a cost probe, for callgrind"]
fn cost_probe_first_touch() {
    let n: u64 = std::env::var("RVMM_FAULTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut m = Machine::new(1024, 16);
    let gva = map_private(&mut m, 0);
    let pt = TABLES + 2;
    for i in 1..256u64 {
        m.g.mem[(pt * 512 + i) as usize] = ((DATA + i) << 12) | P | RW | US;
    }
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    for i in 1..=n {
        assert_eq!(m.access(gva + 4096 * i, rd()).0, Ok((DATA + i) << 12));
    }
}

/// The xAPIC page maps the APIC-access page while it is set, with the guest's rights;
/// each change drops the entries of the old choice (MMIO ones included).
#[test]
fn apic_access_page_maps_while_set() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    let pt = TABLES + 2;
    let apic_gfn = GPAGES + 3;
    let frame = GPAGES + 100;
    m.g.mem[(pt * 512 + 1) as usize] = (apic_gfn << 12) | P | RW | US | A | D;
    let dev = gva + 0x1000;
    // Device memory first: the fault reports MMIO, then the MMIO entry answers.
    assert_eq!(
        m.access(dev + 0x20, rd()),
        (Ok((apic_gfn << 12) + 0x20), false)
    );
    assert_eq!(
        m.access(dev + 0x30, rd()),
        (Ok((apic_gfn << 12) + 0x30), true)
    );
    let a = ApicAccess {
        gfn: apic_gfn,
        hpa: HOST_OFF + (frame << 12),
    };
    let resets = m.s.st.stats.resets;
    assert!(m.s.pool().set_apic_access(Some(a)));
    assert!(!m.s.pool().set_apic_access(Some(a)));
    assert_eq!(m.s.st.stats.resets, resets + 1);
    // One fault maps the frame; then the CPU reaches it without an exit, user writes
    // included (the guest's entry allows them).
    assert_eq!(
        m.access(dev + 0x20, rd()),
        (Ok((frame << 12) + 0x20), false)
    );
    assert_eq!(
        m.access(dev + 0xb0, wr_user()),
        (Ok((frame << 12) + 0xb0), true)
    );
    // INVLPG refills the entry from the guest's (a resync likewise): no fault after.
    m.invlpg(dev);
    assert_eq!(m.access(dev + 0x30, rd()), (Ok((frame << 12) + 0x30), true));
    // The guest's rights hold: read-only for the user now.
    m.write((pt << 12) + 8, (apic_gfn << 12) | P | US | A | D);
    m.invlpg(dev);
    assert_eq!(m.access(dev, rd()).0, Ok(frame << 12));
    assert_eq!(m.access(dev, wr_user()), (Err(1 | 2 | 4), false));
    // Other device frames stay MMIO.
    m.g.mem[(pt * 512 + 2) as usize] = ((apic_gfn + 1) << 12) | P | RW | US | A | D;
    assert_eq!(m.access(dev + 0x1000, rd()).0, Ok((apic_gfn + 1) << 12));
    // Unset: the mapping is gone from the shadow, and the frame is device memory again.
    assert!(m.s.pool().set_apic_access(None));
    assert_eq!(
        m.access(dev + 0x20, rd()),
        (Ok((apic_gfn << 12) + 0x20), false)
    );
    assert_eq!(m.s.pool().apic_access(), None);
}

/// The counters `make bench` reports for the sync path: which flush asked for a sync,
/// how many out-of-sync shadows it looked at (under the root or not), how many present
/// entries the resyncs recomputed and how many of those changed; and faults fixed in
/// direct shadows (a guest large page).
#[test]
fn sync_and_fault_counters_say_who_asked_and_what_it_cost() {
    let mut m = Machine::new(64, 16);
    let flags = P | RW | US;
    for k in 0..2 {
        let gva = map_private(&mut m, k);
        m.load_cr3((ROOTS + k) << 12);
        assert_eq!(m.access(gva, rd()).0, Ok((DATA + k) << 12));
    }
    let (pt0, pt1) = (TABLES + 2, TABLES + 5);
    // Address space 1 remaps its page; address space 0 adds a second one.
    m.write(pt1 << 12, ((DATA + 5) << 12) | flags);
    m.write((pt0 << 12) + 8, ((DATA + 6) << 12) | flags);
    assert_eq!(m.s.pool().unsync_count(), 2);
    let s0 = m.s.st.stats;
    // Back to address space 0: both shadows are looked at, its own is resynced (one
    // present entry, unchanged: entry 1 was never in the shadow).
    m.load_cr3(ROOTS << 12);
    let s1 = m.s.st.stats;
    assert_eq!(
        s1.syncs[SyncCause::Cr3 as usize],
        s0.syncs[SyncCause::Cr3 as usize] + 1
    );
    assert_eq!(s1.sync_scanned - s0.sync_scanned, 2);
    assert_eq!(s1.resyncs - s0.resyncs, 1);
    assert_eq!(s1.resync_entries - s0.resync_entries, 1);
    assert_eq!(s1.resync_changed, s0.resync_changed);
    assert_eq!(m.s.pool().unsync_count(), 1);
    // Address space 1: its shadow's one present entry changed.
    m.load_cr3((ROOTS + 1) << 12);
    let s2 = m.s.st.stats;
    assert_eq!(
        s2.syncs[SyncCause::Cr3 as usize],
        s1.syncs[SyncCause::Cr3 as usize] + 1
    );
    assert_eq!(s2.sync_scanned - s1.sync_scanned, 1);
    assert_eq!(s2.resync_entries - s1.resync_entries, 1);
    assert_eq!(s2.resync_changed - s1.resync_changed, 1);
    assert_eq!(m.access(1 << 39, rd()).0, Ok((DATA + 5) << 12));
    // Nothing out of sync: a flush scans nothing and counts no sync.
    m.load_cr3((ROOTS + 1) << 12);
    m.invlpg(1 << 39);
    m.flush_all();
    let s3 = m.s.st.stats;
    assert_eq!(s3.syncs, s2.syncs);
    assert_eq!(s3.sync_scanned, s2.sync_scanned);
    // INVLPG syncs upper levels: with only a leaf table out of sync it looks at
    // nothing.
    m.write(pt1 << 12, ((DATA + 7) << 12) | flags);
    m.write((pt1 << 12) + 8, ((DATA + 8) << 12) | flags);
    m.invlpg(1 << 39);
    let s4 = m.s.st.stats;
    assert_eq!(s4.syncs, s3.syncs);
    assert_eq!(s4.sync_scanned, s3.sync_scanned);
    assert_eq!(m.s.pool().unsync_count(), 1);
    // An upper-level table out of sync (its writes not emulated here): INVLPG syncs it.
    let upper = m.s.st.stats.unsyncs_upper;
    let root = m.root();
    assert!(!m.s.pool().sync_needed(root, true));
    m.write(((TABLES + 4) << 12) + 16, 0);
    assert_eq!(m.s.pool().unsync_count(), 2);
    assert!(m.s.pool().sync_needed(root, true));
    assert_eq!(m.s.st.stats.unsyncs_upper, upper + 1);
    m.invlpg(1 << 39);
    let s5 = m.s.st.stats;
    assert_eq!(
        s5.syncs[SyncCause::Invlpg as usize],
        s4.syncs[SyncCause::Invlpg as usize] + 1
    );
    assert_eq!(s5.sync_scanned - s4.sync_scanned, 2);
    assert_eq!(m.s.pool().unsync_count(), 1);
    // A flush of every context syncs the leaf too.
    m.flush_all();
    let s6 = m.s.st.stats;
    assert_eq!(
        s6.syncs[SyncCause::FlushAll as usize],
        s5.syncs[SyncCause::FlushAll as usize] + 1
    );
    assert_eq!(m.s.pool().unsync_count(), 0);
    // A 2-MiB guest page is shadowed by a direct shadow: its faults count as direct.
    m.g.mem[((TABLES + 4) * 512 + 1) as usize] = PS | flags;
    let direct = m.s.st.stats.faults_direct;
    let fixed = m.s.st.stats.faults_fixed;
    assert_eq!(
        m.access((1 << 39) | (1 << 21) | (3 << 12), rd()).0,
        Ok(3 << 12)
    );
    assert_eq!(m.s.st.stats.faults_direct, direct + 1);
    assert_eq!(m.s.st.stats.faults_fixed, fixed + 1);
    assert_eq!(m.access(1 << 39, wr_user()).0, Ok((DATA + 7) << 12));
    assert_eq!(m.s.st.stats.faults_direct, direct + 1);
}

/// INVLPG refreshes a leaf entry from the guest's PTE: an out-of-sync table's new
/// entry is in place for the next access, without an exit.
#[test]
fn invlpg_refreshes_out_of_sync_leaves() {
    let mut m = Machine::new(64, 16);
    let gva = map_private(&mut m, 0);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    m.write((TABLES + 2) << 12, ((DATA + 3) << 12) | P | RW | US | A);
    m.invlpg(gva);
    assert_eq!(m.access(gva, rd()), (Ok((DATA + 3) << 12), true));
}

/// A write the vCPU cannot emulate (a string instruction zeroing a freed table)
/// unprotects the table: an upper-level table nothing pins is unshadowed (its parent's
/// entry dropped, refilled by the next fault), a leaf table and a cached root go out of
/// sync. Another root out of sync is nothing INVLPG has to look at.
#[test]
fn unprotect_unshadows_upper_levels_and_invlpg_ignores_other_roots() {
    let mut m = Machine::new(64, 16);
    for k in 0..2 {
        let gva = map_private(&mut m, k);
        m.load_cr3((ROOTS + k) << 12);
        assert_eq!(m.access(gva, rd()).0, Ok((DATA + k) << 12));
    }
    let (pd1, pt1) = (TABLES + 4, TABLES + 5);
    assert!(m.s.pool().is_shadowed(pd1));
    m.s.pool().unprotect(pd1);
    m.settle();
    assert!(
        !m.s.pool().is_shadowed(pd1),
        "the page directory is unshadowed"
    );
    assert_eq!(m.s.pool().unsync_count(), 0);
    m.s.pool().unprotect(pt1);
    assert_eq!(
        m.s.pool().unsync_count(),
        1,
        "the page table goes out of sync"
    );
    // Address space 0's root (cached, pinned) goes out of sync.
    m.s.pool().unprotect(ROOTS);
    assert!(m.s.pool().is_shadowed(ROOTS));
    assert_eq!(m.s.pool().unsync_count(), 2);
    // In address space 1, INVLPG finds nothing to sync: the other root is not under
    // its root, and the page table is a leaf.
    let root = m.root();
    assert!(!m.s.pool().sync_needed(root, true));
    let before = m.s.st.stats;
    m.invlpg(1 << 39);
    assert_eq!(m.s.st.stats.syncs, before.syncs);
    assert_eq!(m.s.st.stats.sync_scanned, before.sync_scanned);
    // The unshadowed directory is shadowed again by the next fault through it.
    assert_eq!(m.access(1 << 39, rd()).0, Ok((DATA + 1) << 12));
    assert!(m.s.pool().is_shadowed(pd1));
    // (The page table came back in sync when it was linked in again.) Back in
    // address space 0, its root comes back in sync.
    m.load_cr3(ROOTS << 12);
    assert_eq!(m.access(1 << 39, rd()).0, Ok(DATA << 12));
    assert_eq!(m.s.pool().unsync_count(), 0);
}

/// A CR3 load skips the sync when nothing below its root went out of sync since the
/// root's last complete sync. A new shadow that joins its table's shadows out of sync
/// (the same table reached through a read-only path: another role) counts as out of
/// sync below its new root: a flushing CR3 load there must sync it, even after a
/// complete sync under another root.
#[test]
fn a_new_shadow_out_of_sync_flags_its_root() {
    let mut m = Machine::new(64, 16);
    let flags = P | RW | US;
    let pt = TABLES + 2;
    // Address space 0: root -> PDPT -> PD -> PT, writable. Address space 1: its own
    // PDPT and PD, and the same PT, read-only.
    for (k, pdpt, pd, pde) in [
        (0, TABLES, TABLES + 1, flags),
        (1, TABLES + 3, TABLES + 4, P | US),
    ] {
        m.g.mem[((ROOTS + k) * 512 + 1) as usize] = (pdpt << 12) | flags;
        m.g.mem[(pdpt * 512) as usize] = (pd << 12) | flags;
        m.g.mem[(pd * 512) as usize] = (pt << 12) | pde;
    }
    m.g.mem[(pt * 512) as usize] = (DATA << 12) | flags;
    let gva = 1u64 << 39;
    m.load_cr3(ROOTS << 12);
    assert_eq!(m.access(gva, rd()).0, Ok(DATA << 12));
    // The PT goes out of sync; address space 1 then shadows it too (out of sync).
    m.write(pt << 12, ((DATA + 1) << 12) | flags);
    m.load_cr3((ROOTS + 1) << 12);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 1) << 12));
    assert_eq!(m.s.pool().unsync_count(), 2);
    // A store that does not exit (the table is writable), then a complete sync under
    // root 0, which leaves address space 1's shadow alone.
    m.write(pt << 12, ((DATA + 2) << 12) | flags);
    m.load_cr3(ROOTS << 12);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 2) << 12));
    // Back in address space 1 after a flushing CR3 load: the new PTE, not the stale one.
    m.load_cr3((ROOTS + 1) << 12);
    assert_eq!(m.access(gva, rd()).0, Ok((DATA + 2) << 12));
    // With nothing out of sync under it, a CR3 load there looks at nothing.
    let before = m.s.st.stats;
    m.load_cr3((ROOTS + 1) << 12);
    assert_eq!(m.s.st.stats.sync_scanned, before.sync_scanned);
}
