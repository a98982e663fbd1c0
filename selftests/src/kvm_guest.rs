// SPDX-License-Identifier: GPL-2.0

//! A one-instruction KVM guest (real mode, `hlt` at 0x1000), used to check that KVM
//! still finds its own VMCS current after rvmm used VMX on the same CPU.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

const MEM_SIZE: usize = 0x10000;
const ENTRY: u64 = 0x1000;

pub struct HltGuest {
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: *mut libc::c_void,
}

impl HltGuest {
    pub fn new() -> Result<Self, String> {
        let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
        let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
        // SAFETY: fresh anonymous mapping owned by this struct until drop.
        let mem = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if mem == libc::MAP_FAILED {
            return Err("mmap guest memory".into());
        }
        // SAFETY: ENTRY is inside the mapping; 0xf4 is HLT.
        unsafe { *(mem as *mut u8).add(ENTRY as usize) = 0xf4 };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: mem as u64,
        };
        // SAFETY: the mapping outlives the VM (unmapped in drop, after the fds close).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
        let vcpu = vm
            .create_vcpu(0)
            .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
        let mut sregs = vcpu
            .get_sregs()
            .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs)
            .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
        Ok(Self { _vm: vm, vcpu, mem })
    }

    /// Loads the vCPU (and so its VMCS) on this CPU without running it.
    pub fn touch_vcpu(&self) -> Result<(), String> {
        self.vcpu
            .get_regs()
            .map(|_| ())
            .map_err(|e| format!("KVM_GET_REGS: {e}"))
    }

    /// Runs `hlt` at 0x1000 and checks the HLT exit and RIP.
    pub fn run_once(&mut self) -> Result<(), String> {
        let mut regs = self
            .vcpu
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS: {e}"))?;
        regs.rip = ENTRY;
        regs.rflags = 2;
        self.vcpu
            .set_regs(&regs)
            .map_err(|e| format!("KVM_SET_REGS: {e}"))?;
        match self.vcpu.run().map_err(|e| format!("KVM_RUN: {e}"))? {
            VcpuExit::Hlt => {}
            other => return Err(format!("KVM_RUN: want a HLT exit, got {other:?}")),
        }
        let rip = self
            .vcpu
            .get_regs()
            .map_err(|e| format!("KVM_GET_REGS: {e}"))?
            .rip;
        if rip != ENTRY + 1 {
            return Err(format!(
                "guest RIP {rip:#x} after HLT, want {:#x}",
                ENTRY + 1
            ));
        }
        Ok(())
    }
}

impl Drop for HltGuest {
    fn drop(&mut self) {
        // KVM copes with a memslot's memory going away while the VM lives (its MMU
        // notifier drops the mappings); no guest runs after this.
        // SAFETY: our mapping, no longer used by this process.
        unsafe { libc::munmap(self.mem, MEM_SIZE) };
    }
}
